//! Key rotation: every data key re-wrapped under the newest key-encryption key.

use super::*;

impl IdentityStore {
    /// Makes a new KEK active and re-wraps every data key under it, in small batches;
    /// readers keep working throughout because old KEKs stay available.
    #[tracing::instrument(target = "dalp_store", name = "identity.rotate_keys", skip_all)]
    pub async fn rotate_keys(
        &self,
        ctx: &RequestContext,
        on_progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<RotationReport> {
        let active = self.keys.rotate().await?;
        let mut conn = self.writer.checkout().await?;
        let total: i64 = conn
            .typed_query_one(
                "SELECT count(*) FROM dalp_identity.data_keys WHERE kek_id <> $1",
                &[&active],
            )
            .await?
            .get(0);
        let mut done = 0u64;
        loop {
            let tx = conn.begin("identity.rotate_keys").await?;
            let rows = tx
                .typed_query(
                    "SELECT id, kek_id, wrapped FROM dalp_identity.data_keys WHERE kek_id <> $1
                      ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED",
                    &[&active],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let dek = self
                    .keys
                    .unwrap(&WrappedKey {
                        kek_id: r.get(1),
                        blob: r.get(2),
                    })
                    .await?;
                let w = self.keys.wrap(&dek).await?;
                tx.typed_execute(
                    "UPDATE dalp_identity.data_keys SET kek_id = $2, wrapped = $3, rotated_at = now() WHERE id = $1",
                    &[&r.get::<_, Uuid>(0), &w.kek_id, &w.blob],
                )
                .await?;
            }
            done += rows.len() as u64;
            tx.commit_unaudited(
                "re-wrapping a batch of data keys; the rotation is audited once it is complete",
            )
            .await?;
            on_progress(done, total as u64);
        }
        let mut tx = conn.begin("identity.rotate_keys").await?;
        tx.record(
            &ctx.event("identity.keys.rotate", "key_encryption_key")
                .resource(&active)
                .details(json!({ "rewrapped": done })),
        )
        .await?;
        tx.commit().await?;
        Ok(RotationReport {
            active_kek: active,
            rewrapped: done,
        })
    }
}
