-- Assets get their identifiers and a version for optimistic concurrency; every change
-- leaves a version row (who, when, before, after).
ALTER TABLE dalp_assets.assets
    ADD COLUMN base_type        text    NOT NULL DEFAULT 'bond'
        CHECK (base_type IN ('bond', 'equity', 'fund', 'stablecoin', 'deposit', 'real_estate', 'precious_metal')),
    ADD COLUMN isin             text    UNIQUE CHECK (isin ~ '^[A-Z]{2}[A-Z0-9]{9}[0-9]$'),
    ADD COLUMN country_numeric  smallint CHECK (country_numeric BETWEEN 1 AND 999),
    ADD COLUMN chain_id         bigint  CHECK (chain_id > 0),
    ADD COLUMN contract_address text    CHECK (contract_address ~ '^0x[0-9a-f]{40}$'),
    ADD COLUMN version          integer NOT NULL DEFAULT 1 CHECK (version > 0),
    ADD COLUMN updated_at       timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN updated_by       text    NOT NULL DEFAULT 'migration',
    ADD CONSTRAINT assets_symbol_format CHECK (symbol ~ '^[A-Z0-9][A-Z0-9.-]{0,11}$'),
    ADD CONSTRAINT assets_contract_pair CHECK ((chain_id IS NULL) = (contract_address IS NULL)),
    ADD CONSTRAINT assets_contract_unique UNIQUE (chain_id, contract_address);
ALTER TABLE dalp_assets.assets ALTER COLUMN base_type DROP DEFAULT;

-- Append-only for the service: versions are written, never changed.
CREATE TABLE dalp_assets.asset_versions (
    asset_id   uuid        NOT NULL,
    version    integer     NOT NULL CHECK (version > 0),
    operation  text        NOT NULL CHECK (operation IN ('insert', 'update', 'delete')),
    changed_by text        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    before     jsonb,
    after      jsonb,
    PRIMARY KEY (asset_id, version)
);

GRANT SELECT, INSERT ON dalp_assets.asset_versions TO dalp_assets_svc;
GRANT SELECT ON dalp_assets.asset_versions TO dalp_readonly;
