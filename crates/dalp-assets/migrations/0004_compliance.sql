-- Asset lifecycle and compliance module configuration with four-eyes approval.
ALTER TABLE dalp_assets.assets
    ADD COLUMN status text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published'));

-- The ordered module list of an asset, versioned like everything here.
CREATE TABLE dalp_assets.compliance_configs (
    asset_id   uuid        PRIMARY KEY REFERENCES dalp_assets.assets (id) ON DELETE CASCADE,
    modules    jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(modules) = 'array'),
    version    integer     NOT NULL DEFAULT 1 CHECK (version > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text        NOT NULL
);

CREATE TABLE dalp_assets.compliance_versions (
    asset_id   uuid        NOT NULL,
    version    integer     NOT NULL CHECK (version > 0),
    changed_by text        NOT NULL,
    approved_by text,
    changed_at timestamptz NOT NULL DEFAULT now(),
    before     jsonb,
    after      jsonb       NOT NULL,
    PRIMARY KEY (asset_id, version)
);

-- Proposed changes to a published asset's modules wait for a second person.
CREATE TABLE dalp_assets.compliance_changes (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    asset_id     uuid        NOT NULL REFERENCES dalp_assets.assets (id) ON DELETE CASCADE,
    base_version integer     NOT NULL CHECK (base_version >= 0),
    modules      jsonb       NOT NULL CHECK (jsonb_typeof(modules) = 'array'),
    proposed_by  text        NOT NULL,
    proposed_at  timestamptz NOT NULL DEFAULT now(),
    status       text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'rejected', 'superseded')),
    decided_by   text,
    decided_at   timestamptz,
    CHECK (decided_by IS NULL OR decided_by <> proposed_by)
);
CREATE INDEX compliance_changes_asset_idx ON dalp_assets.compliance_changes (asset_id) WHERE status = 'pending';

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_assets.compliance_configs, dalp_assets.compliance_changes TO dalp_assets_svc;
GRANT SELECT, INSERT ON dalp_assets.compliance_versions TO dalp_assets_svc;
GRANT SELECT ON dalp_assets.compliance_configs, dalp_assets.compliance_changes, dalp_assets.compliance_versions TO dalp_readonly;
