-- Object audit: pgAudit logs every statement touching a table this role may read, so each
-- read or write of personal data leaves an AUDIT line in the server log.
GRANT SELECT ON dalp_identity.users, dalp_identity.kyc_profiles, dalp_identity.mfa_totp,
    dalp_identity.mfa_backup_codes, dalp_identity.password_credentials TO dalp_pgaudit;
