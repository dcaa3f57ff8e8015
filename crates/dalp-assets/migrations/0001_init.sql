-- Asset configuration: the first table. Later migrations add templates, compliance modules,
-- settings, currencies and FX rates with versioned change history.
CREATE SCHEMA dalp_assets;

CREATE TABLE dalp_assets.assets (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    organisation_id uuid        NOT NULL,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 50),
    symbol          text        NOT NULL CHECK (length(symbol) BETWEEN 1 AND 12),
    decimals        smallint    NOT NULL CHECK (decimals BETWEEN 0 AND 18),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX assets_organisation_idx ON dalp_assets.assets (organisation_id);

GRANT USAGE ON SCHEMA dalp_assets TO dalp_assets_svc, dalp_readonly;
GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_assets.assets TO dalp_assets_svc;
GRANT SELECT ON dalp_assets.assets TO dalp_readonly;
