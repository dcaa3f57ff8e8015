//! KYC profiles, encrypted under a per-user data key.

use super::*;

impl IdentityStore {
    /// Writes a user's KYC profile, encrypted under a fresh data key.
    #[tracing::instrument(target = "dalp_store", name = "identity.put_kyc", skip_all)]
    pub async fn put_kyc(
        &self,
        ctx: &RequestContext,
        user_id: Uuid,
        profile: &KycProfile,
    ) -> Result<()> {
        profile.validate()?;
        let dek = crypto::new_dek();
        let wrapped = self.keys.wrap(&dek).await?;
        let plaintext = serde_json::to_vec(profile).expect("KYC profile serializes");
        let enc = crypto::seal(&dek, &plaintext, kyc_aad(user_id).as_bytes());
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.put_kyc").await?;
        if tx
            .typed_query_opt(
                "SELECT 1 FROM dalp_identity.users WHERE id = $1",
                &[&user_id],
            )
            .await?
            .is_none()
        {
            return Err(IdentityError::NotFound("user"));
        }
        let old: Option<Uuid> = tx
            .typed_query_opt(
                "SELECT data_key_id FROM dalp_identity.kyc_profiles WHERE user_id = $1 FOR UPDATE",
                &[&user_id],
            )
            .await?
            .map(|r| r.get(0));
        let dk: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.data_keys (kek_id, wrapped) VALUES ($1, $2) RETURNING id",
                &[&wrapped.kek_id, &wrapped.blob],
            )
            .await?
            .get(0);
        tx.typed_execute(
            "INSERT INTO dalp_identity.kyc_profiles (user_id, data_key_id, payload_enc, updated_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id) DO UPDATE SET data_key_id = EXCLUDED.data_key_id, payload_enc = EXCLUDED.payload_enc,
                 updated_at = now(), updated_by = EXCLUDED.updated_by",
            &[&user_id, &dk, &enc, &ctx.actor],
        )
        .await?;
        if let Some(old) = old {
            tx.typed_execute("DELETE FROM dalp_identity.data_keys WHERE id = $1", &[&old])
                .await?;
        }
        tx.record(&ctx.event("identity.kyc.write", "kyc_profile")
                .resource(user_id)
                .details(json!({ "fields": ["first_name", "last_name", "date_of_birth", "country", "residency_status", "national_id"] })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Reads and decrypts a KYC profile; the read itself is audited in the same transaction.
    #[tracing::instrument(target = "dalp_store", name = "identity.get_kyc", skip_all)]
    pub async fn get_kyc(&self, ctx: &RequestContext, user_id: Uuid) -> Result<KycProfile> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.get_kyc").await?;
        let row = tx
            .typed_query_opt(
                "SELECT d.kek_id, d.wrapped, k.payload_enc FROM dalp_identity.kyc_profiles k
                   JOIN dalp_identity.data_keys d ON d.id = k.data_key_id WHERE k.user_id = $1",
                &[&user_id],
            )
            .await?
            .ok_or(IdentityError::NotFound("KYC profile"))?;
        let dek = self
            .keys
            .unwrap(&WrappedKey {
                kek_id: row.get(0),
                blob: row.get(1),
            })
            .await?;
        let plaintext = crypto::open(&dek, row.get::<_, &[u8]>(2), kyc_aad(user_id).as_bytes())?;
        let profile: KycProfile = serde_json::from_slice(&plaintext)
            .map_err(|_| IdentityError::Crypto(CryptoError::Decrypt))?;
        tx.record(
            &ctx.event("identity.kyc.read", "kyc_profile")
                .resource(user_id),
        )
        .await?;
        tx.commit().await?;
        Ok(profile)
    }
}
