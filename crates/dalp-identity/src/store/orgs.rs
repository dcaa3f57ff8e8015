//! Organisations, the tenants every other domain refers to.

use super::*;

impl IdentityStore {
    /// Creates an organisation with `owner` as its owner; returns its id.
    #[tracing::instrument(target = "dalp_store", name = "identity.create_organisation", skip_all)]
    pub async fn create_organisation(
        &self,
        ctx: &RequestContext,
        slug: &str,
        name: &str,
        owner: Uuid,
    ) -> Result<Uuid> {
        let slug = dalp_types::parse_slug("slug", slug)?;
        let name = parse_name("name", name)?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.create_organisation").await?;
        let id: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.organisations (slug, name) VALUES ($1, $2) RETURNING id",
                &[&slug, &name],
            )
            .await?
            .get(0);
        tx.typed_execute(
            "INSERT INTO dalp_identity.organisation_members (organisation_id, user_id, role) VALUES ($1, $2, 'owner')",
            &[&id, &owner],
        )
        .await?;
        tx.record(
            &ctx.event("identity.organisation.create", "organisation")
                .resource(id)
                .details(json!({ "slug": slug })),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The id of the organisation with `slug`, if any.
    #[tracing::instrument(
        target = "dalp_store",
        name = "identity.organisation_by_slug",
        skip_all
    )]
    pub async fn organisation_by_slug(&self, slug: &str) -> Result<Option<Uuid>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        Ok(client
            .typed_query_opt(
                "SELECT id FROM dalp_identity.organisations WHERE slug = $1",
                &[&slug],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Whether an organisation has this id. Other domains reference organisations by id
    /// without reading this schema; the API asks here before it stores such a reference.
    #[tracing::instrument(target = "dalp_store", name = "identity.organisation_exists", skip_all)]
    pub async fn organisation_exists(&self, id: Uuid) -> Result<bool> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        Ok(client
            .typed_query_opt(
                "SELECT 1 FROM dalp_identity.organisations WHERE id = $1",
                &[&id],
            )
            .await?
            .is_some())
    }
}
