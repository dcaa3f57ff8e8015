//! The second factor: TOTP enrolment, backup codes, verification and lockout.

use super::*;

impl IdentityStore {
    pub(super) async fn load_totp(&self, user_id: Uuid) -> Result<Option<(Vec<u8>, bool, i64)>> {
        let client = dalp_db::pool::checkout(&self.pool, "identity").await?;
        let row = client
            .typed_query_opt(
                "SELECT d.kek_id, d.wrapped, t.secret_enc, t.confirmed_at IS NOT NULL, t.last_used_step
                   FROM dalp_identity.mfa_totp t JOIN dalp_identity.data_keys d ON d.id = t.data_key_id
                  WHERE t.user_id = $1",
                &[&user_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let dek = self
            .keys
            .unwrap(&WrappedKey {
                kek_id: row.get(0),
                blob: row.get(1),
            })
            .await?;
        let secret = crypto::open(&dek, row.get::<_, &[u8]>(2), totp_aad(user_id).as_bytes())?;
        Ok(Some((secret, row.get(3), row.get(4))))
    }

    /// Starts (or restarts, while unconfirmed) TOTP enrolment.
    #[tracing::instrument(target = "dalp_store", name = "identity.enroll_totp", skip_all)]
    pub async fn enroll_totp(&self, ctx: &RequestContext, p: &Principal) -> Result<TotpEnrolment> {
        if let Some((_, true, _)) = self.load_totp(p.user_id).await? {
            return Err(IdentityError::Conflict("TOTP is already enrolled".into()));
        }
        let secret = totp::generate_secret();
        let dek = crypto::new_dek();
        let wrapped = self.keys.wrap(&dek).await?;
        let enc = crypto::seal(&dek, &secret, totp_aad(p.user_id).as_bytes());
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.enroll_totp").await?;
        let dk: Uuid = tx
            .typed_query_one(
                "INSERT INTO dalp_identity.data_keys (kek_id, wrapped) VALUES ($1, $2) RETURNING id",
                &[&wrapped.kek_id, &wrapped.blob],
            )
            .await?
            .get(0);
        tx.typed_execute(
            "INSERT INTO dalp_identity.mfa_totp (user_id, data_key_id, secret_enc) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE SET data_key_id = EXCLUDED.data_key_id, secret_enc = EXCLUDED.secret_enc, last_used_step = 0",
            &[&p.user_id, &dk, &enc],
        )
        .await?;
        tx.record(&ctx.event("identity.mfa.enroll", "user").resource(p.user_id))
            .await?;
        tx.commit().await?;
        Ok(TotpEnrolment {
            secret: totp::secret_base32(&secret),
            otpauth_uri: totp::otpauth_uri(&secret, &p.email),
        })
    }

    /// Confirms enrolment with a first code; returns the one-time backup codes. A pending
    /// session (an admin's first login) is completed by it.
    #[tracing::instrument(target = "dalp_store", name = "identity.confirm_totp", skip_all)]
    pub async fn confirm_totp(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        code: &str,
    ) -> Result<Vec<String>> {
        let Some((secret, confirmed, last)) = self.load_totp(p.user_id).await? else {
            return Err(IdentityError::NotFound("TOTP enrolment"));
        };
        if confirmed {
            return Err(IdentityError::Conflict("TOTP is already enrolled".into()));
        }
        let step = totp::verify(&secret, code, Utc::now().timestamp() as u64, last as u64)
            .ok_or(IdentityError::InvalidCode)?;
        let codes = totp::generate_backup_codes();
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.confirm_totp").await?;
        tx.typed_execute(
            "UPDATE dalp_identity.mfa_totp SET confirmed_at = now(), last_used_step = $2 WHERE user_id = $1",
            &[&p.user_id, &(step as i64)],
        )
        .await?;
        tx.typed_execute(
            "DELETE FROM dalp_identity.mfa_backup_codes WHERE user_id = $1",
            &[&p.user_id],
        )
        .await?;
        for c in &codes {
            tx.typed_execute(
                "INSERT INTO dalp_identity.mfa_backup_codes (user_id, code_hash) VALUES ($1, $2)",
                &[&p.user_id, &totp::hash_backup_code(c)],
            )
            .await?;
        }
        Self::complete_pending(&tx, p).await?;
        tx.record(
            &ctx.event("identity.mfa.confirm", "user")
                .resource(p.user_id),
        )
        .await?;
        tx.invalidate(p.tags());
        tx.commit().await?;
        Ok(codes)
    }

    pub(super) async fn complete_pending(tx: &Transaction<'_>, p: &Principal) -> Result<()> {
        if let Credential::Session {
            id,
            mfa_pending: true,
            ..
        } = &p.credential
        {
            let now = Utc::now();
            tx.typed_execute(
                "UPDATE dalp_identity.sessions SET mfa_pending = false, expires_at = $2, refreshed_at = $3, fresh_until = $4 WHERE id = $1",
                &[id, &(now + SESSION_TTL), &now, &(now + FRESH_FOR)],
            )
            .await?;
            tx.typed_execute(
                "UPDATE dalp_identity.users SET last_login_at = now() WHERE id = $1",
                &[&p.user_id],
            )
            .await?;
        }
        Ok(())
    }

    /// Completes a pending session with a TOTP code or an unused backup code.
    #[tracing::instrument(target = "dalp_store", name = "identity.verify_mfa", skip_all)]
    pub async fn verify_mfa(&self, ctx: &RequestContext, p: &Principal, code: &str) -> Result<()> {
        let Credential::Session {
            mfa_pending: true, ..
        } = &p.credential
        else {
            return Err(IdentityError::Conflict(
                "this session needs no second factor".into(),
            ));
        };
        let Credential::Session { id: session, .. } = &p.credential else {
            unreachable!("matched above")
        };
        let totp_state = self.load_totp(p.user_id).await?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("identity.verify_mfa").await?;
        // Attempts of one user are serialised on their lockout row, so concurrent guesses
        // cannot slip past the limit; the limit holds for every API process.
        tx.typed_execute(
            "INSERT INTO dalp_identity.mfa_lockouts (user_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&p.user_id],
        )
        .await?;
        let until: Option<DateTime<Utc>> = tx
            .typed_query_one(
                "SELECT locked_until FROM dalp_identity.mfa_lockouts WHERE user_id = $1 FOR UPDATE",
                &[&p.user_id],
            )
            .await?
            .get::<_, Option<DateTime<Utc>>>(0)
            .filter(|u| *u > Utc::now());
        if let Some(until) = until {
            drop(tx);
            self.audit_alone(
                ctx.event("identity.mfa.verify", "user")
                    .outcome(Outcome::Denied)
                    .details(json!({ "reason": "locked", "locked_until": until })),
                Some(p.user_id),
            )
            .await?;
            return Err(IdentityError::MfaLocked { until });
        }
        let mut method = None;
        if let Some((secret, true, last)) = &totp_state {
            if let Some(step) = totp::verify(
                secret,
                code.trim(),
                Utc::now().timestamp() as u64,
                *last as u64,
            ) {
                // Conditional on the step, so two concurrent uses of one code cannot both pass.
                let n = tx
                    .typed_execute(
                        "UPDATE dalp_identity.mfa_totp SET last_used_step = $2 WHERE user_id = $1 AND last_used_step < $2",
                        &[&p.user_id, &(step as i64)],
                    )
                    .await?;
                if n == 1 {
                    method = Some("totp");
                }
            }
        }
        if method.is_none() {
            let n = tx
                .typed_execute(
                    "UPDATE dalp_identity.mfa_backup_codes SET used_at = now() WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
                    &[&p.user_id, &totp::hash_backup_code(code)],
                )
                .await?;
            if n == 1 {
                method = Some("backup_code");
            }
        }
        let Some(method) = method else {
            return self.mfa_failure(ctx, tx, p, *session).await;
        };
        tx.typed_execute(
            "DELETE FROM dalp_identity.mfa_lockouts WHERE user_id = $1",
            &[&p.user_id],
        )
        .await?;
        Self::complete_pending(&tx, p).await?;
        tx.record(
            &ctx.event("identity.mfa.verify", "user")
                .resource(p.user_id)
                .details(json!({ "method": method })),
        )
        .await?;
        tx.invalidate(p.tags());
        tx.commit().await?;
        Ok(())
    }

    /// Counts a wrong second-factor code in `tx` (which holds the user's lockout row):
    /// audits it, revokes the session at its last attempt and locks the user out after
    /// [`MFA_USER_ATTEMPTS`] in a row. Always an error.
    pub(super) async fn mfa_failure(
        &self,
        ctx: &RequestContext,
        mut tx: Write<'_>,
        p: &Principal,
        session: Uuid,
    ) -> Result<()> {
        let session_failures: i32 = tx
            .typed_query_one(
                "UPDATE dalp_identity.sessions SET mfa_failures = mfa_failures + 1 WHERE id = $1 RETURNING mfa_failures",
                &[&session],
            )
            .await?
            .get(0);
        let row = tx
            .typed_query_one(
                "UPDATE dalp_identity.mfa_lockouts SET failures = failures + 1, updated_at = now()
                  WHERE user_id = $1 RETURNING failures, lockouts",
                &[&p.user_id],
            )
            .await?;
        let (failures, lockouts): (i32, i32) = (row.get(0), row.get(1));
        let mut details = json!({ "reason": "invalid_code", "session_failures": session_failures, "user_failures": failures });
        let mut tags = Vec::new();
        if failures >= MFA_USER_ATTEMPTS {
            let minutes = (1i64 << lockouts.min(20)).min(MFA_MAX_LOCKOUT_MINUTES);
            let until: DateTime<Utc> = tx
                .typed_query_one(
                    "UPDATE dalp_identity.mfa_lockouts
                        SET failures = 0, lockouts = lockouts + 1,
                            locked_until = now() + $2 * interval '1 minute', updated_at = now()
                      WHERE user_id = $1 RETURNING locked_until",
                    &[&p.user_id, &(minutes as f64)],
                )
                .await?
                .get(0);
            tx.record(&ctx.event("identity.mfa.lockout", "user")
                    .resource(p.user_id)
                    .outcome(Outcome::Denied)
                    .details(json!({ "locked_until": until, "minutes": minutes, "lockout": lockouts + 1 })),
            )
            .await?;
            details["locked_until"] = json!(until);
        }
        let revoked = session_failures >= MFA_SESSION_ATTEMPTS;
        if revoked {
            tx.typed_execute(
                "UPDATE dalp_identity.sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                &[&session],
            )
            .await?;
            tx.record(
                &ctx.event("identity.session.revoke", "session")
                    .resource(session)
                    .details(json!({ "reason": "too many wrong second-factor codes" })),
            )
            .await?;
            tags.push(format!("session:{session}"));
        }
        tx.record(
            &ctx.event("identity.mfa.verify", "user")
                .resource(p.user_id)
                .outcome(Outcome::Denied)
                .details(details),
        )
        .await?;
        tx.invalidate(tags);
        tx.commit().await?;
        Err(if revoked {
            IdentityError::MfaSessionRevoked
        } else {
            IdentityError::InvalidCode
        })
    }
}
