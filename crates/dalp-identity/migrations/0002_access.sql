-- Users, credentials, sessions, API keys, roles, MFA and encrypted KYC profiles.

ALTER TABLE dalp_identity.users
    ADD COLUMN wallet_address text UNIQUE CHECK (wallet_address ~ '^0x[0-9a-f]{40}$'),
    ADD COLUMN banned_reason  text CHECK (length(banned_reason) <= 500),
    ADD COLUMN banned_until   timestamptz,
    ADD COLUMN banned         boolean     NOT NULL DEFAULT false,
    ADD COLUMN last_login_at  timestamptz,
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT users_email_length CHECK (length(email) <= 254);

-- argon2id PHC strings only.
CREATE TABLE dalp_identity.password_credentials (
    user_id    uuid        PRIMARY KEY REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    hash       text        NOT NULL CHECK (hash LIKE '$argon2id$%'),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Only SHA-256 of the bearer token is stored. A session is "pending" until its second factor
-- is verified; pending sessions may only complete MFA.
CREATE TABLE dalp_identity.sessions (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid        NOT NULL REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    token_hash    bytea       NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    refreshed_at  timestamptz NOT NULL DEFAULT now(),
    fresh_until   timestamptz NOT NULL,
    mfa_pending   boolean     NOT NULL DEFAULT false,
    ip            inet,
    user_agent    text        CHECK (length(user_agent) <= 512),
    revoked_at    timestamptz
) WITH (fillfactor = 85);
CREATE INDEX sessions_user_idx ON dalp_identity.sessions (user_id);

CREATE TABLE dalp_identity.api_keys (
    id                    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id               uuid        NOT NULL REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    name                  text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix                text        NOT NULL,
    key_hash              bytea       NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    scope                 text        NOT NULL CHECK (scope IN ('read', 'read-write')),
    rate_limit_per_minute integer     NOT NULL DEFAULT 600 CHECK (rate_limit_per_minute BETWEEN 1 AND 100000),
    expires_at            timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    revoked_at            timestamptz
);
CREATE INDEX api_keys_user_idx ON dalp_identity.api_keys (user_id);

CREATE TABLE dalp_identity.platform_roles (
    user_id    uuid        NOT NULL REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    role       text        NOT NULL CHECK (role IN ('admin', 'auditor', 'systemManager', 'tokenManager',
                               'complianceManager', 'claimPolicyManager', 'claimIssuer', 'identityManager')),
    granted_by text        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, role)
);

CREATE TABLE dalp_identity.organisation_members (
    organisation_id uuid NOT NULL REFERENCES dalp_identity.organisations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    PRIMARY KEY (organisation_id, user_id)
);
CREATE INDEX organisation_members_user_idx ON dalp_identity.organisation_members (user_id);

-- Envelope encryption: each protected record has its own data key, stored only wrapped by a
-- key-encryption key (KEK) that lives outside the database (key file or KMS).
CREATE TABLE dalp_identity.data_keys (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    kek_id     text        NOT NULL,
    wrapped    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    rotated_at timestamptz
);
CREATE INDEX data_keys_kek_idx ON dalp_identity.data_keys (kek_id);

CREATE TABLE dalp_identity.mfa_totp (
    user_id         uuid        PRIMARY KEY REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    data_key_id     uuid        NOT NULL REFERENCES dalp_identity.data_keys (id),
    secret_enc      bytea       NOT NULL,
    confirmed_at    timestamptz,
    last_used_step  bigint      NOT NULL DEFAULT 0
);
CREATE INDEX mfa_totp_data_key_idx ON dalp_identity.mfa_totp (data_key_id);

CREATE TABLE dalp_identity.mfa_backup_codes (
    user_id   uuid        NOT NULL REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    code_hash bytea       NOT NULL CHECK (length(code_hash) = 32),
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- All KYC fields, as one AES-256-GCM ciphertext under the record's data key.
CREATE TABLE dalp_identity.kyc_profiles (
    user_id     uuid        PRIMARY KEY REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    data_key_id uuid        NOT NULL REFERENCES dalp_identity.data_keys (id),
    payload_enc bytea       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text        NOT NULL
);
CREATE INDEX kyc_profiles_data_key_idx ON dalp_identity.kyc_profiles (data_key_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON
    dalp_identity.password_credentials, dalp_identity.sessions, dalp_identity.api_keys,
    dalp_identity.platform_roles, dalp_identity.organisation_members, dalp_identity.data_keys,
    dalp_identity.mfa_totp, dalp_identity.mfa_backup_codes, dalp_identity.kyc_profiles
    TO dalp_identity_svc;
