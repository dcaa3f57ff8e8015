-- Identity: the first tables. Later migrations add credentials, sessions, API keys, MFA, KYC.
CREATE SCHEMA dalp_identity;

CREATE TABLE dalp_identity.organisations (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    slug       text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name       text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Personal data: not readable by the reporting role.
CREATE TABLE dalp_identity.users (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    email      text        NOT NULL UNIQUE CHECK (email = lower(email) AND position('@' IN email) > 1),
    name       text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

GRANT USAGE ON SCHEMA dalp_identity TO dalp_identity_svc, dalp_readonly;
GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_identity.organisations, dalp_identity.users TO dalp_identity_svc;
GRANT SELECT ON dalp_identity.organisations TO dalp_readonly;
