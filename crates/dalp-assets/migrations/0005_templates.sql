-- Instrument templates: system (organisation_id NULL) or per organisation; draft, then
-- published with immutable key fields. Assets may follow a template and carry metadata
-- validated against its schema.
CREATE TABLE dalp_assets.templates (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    organisation_id uuid,
    slug            text        NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    base_type       text        NOT NULL
        CHECK (base_type IN ('bond', 'equity', 'fund', 'stablecoin', 'deposit', 'real_estate', 'precious_metal')),
    asset_class     text        NOT NULL
        CHECK (asset_class IN ('fixed_income', 'flexible_income', 'cash_equivalent', 'real_asset')),
    features        text[]      NOT NULL DEFAULT '{}',
    metadata_schema jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(metadata_schema) = 'array'),
    status          text        NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published')),
    version         integer     NOT NULL DEFAULT 1 CHECK (version > 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text        NOT NULL,
    UNIQUE NULLS NOT DISTINCT (organisation_id, slug)
);

-- Published templates keep their key fields, whoever writes (the store checks first; this
-- is the backstop).
CREATE FUNCTION dalp_assets.template_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.status = 'published' THEN
            RAISE EXCEPTION 'template % is published and cannot be deleted', OLD.slug USING ERRCODE = 'check_violation';
        END IF;
        RETURN OLD;
    END IF;
    IF OLD.status = 'published' AND (NEW.status <> 'published' OR NEW.slug IS DISTINCT FROM OLD.slug
        OR NEW.base_type IS DISTINCT FROM OLD.base_type OR NEW.asset_class IS DISTINCT FROM OLD.asset_class
        OR NEW.features IS DISTINCT FROM OLD.features OR NEW.metadata_schema IS DISTINCT FROM OLD.metadata_schema
        OR NEW.organisation_id IS DISTINCT FROM OLD.organisation_id) THEN
        RAISE EXCEPTION 'template % is published: its key fields cannot change', OLD.slug USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER templates_published_guard BEFORE UPDATE OR DELETE ON dalp_assets.templates
    FOR EACH ROW EXECUTE FUNCTION dalp_assets.template_guard();

CREATE TABLE dalp_assets.template_versions (
    template_id uuid        NOT NULL,
    version     integer     NOT NULL CHECK (version > 0),
    changed_by  text        NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    before      jsonb,
    after       jsonb       NOT NULL,
    PRIMARY KEY (template_id, version)
);

CREATE TABLE dalp_assets.template_hidden (
    organisation_id uuid NOT NULL,
    template_id     uuid NOT NULL REFERENCES dalp_assets.templates (id) ON DELETE CASCADE,
    PRIMARY KEY (organisation_id, template_id)
);
CREATE INDEX template_hidden_template_idx ON dalp_assets.template_hidden (template_id);

ALTER TABLE dalp_assets.assets
    ADD COLUMN template_id uuid REFERENCES dalp_assets.templates (id),
    ADD COLUMN metadata    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object');
CREATE INDEX assets_template_idx ON dalp_assets.assets (template_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_assets.templates, dalp_assets.template_hidden TO dalp_assets_svc;
GRANT SELECT, INSERT ON dalp_assets.template_versions TO dalp_assets_svc;
GRANT SELECT ON dalp_assets.templates, dalp_assets.template_hidden, dalp_assets.template_versions TO dalp_readonly;
