-- Second-factor attempts are limited in the database, so every API process shares the
-- limits: a pending session is revoked after 5 wrong codes, and a user is locked out of
-- second-factor checks after every 5 consecutive wrong codes (1 minute, doubling per lockout,
-- at most 24 hours) until a code is accepted.
ALTER TABLE dalp_identity.sessions
    ADD COLUMN mfa_failures integer NOT NULL DEFAULT 0 CHECK (mfa_failures >= 0);

CREATE TABLE dalp_identity.mfa_lockouts (
    user_id      uuid        PRIMARY KEY REFERENCES dalp_identity.users (id) ON DELETE CASCADE,
    -- Wrong codes since the last accepted one or the last lockout.
    failures     integer     NOT NULL DEFAULT 0 CHECK (failures >= 0),
    -- Lockouts since the last accepted code (the next one lasts 2^lockouts minutes).
    lockouts     integer     NOT NULL DEFAULT 0 CHECK (lockouts >= 0),
    locked_until timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_identity.mfa_lockouts TO dalp_identity_svc;
