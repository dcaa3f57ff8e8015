-- Audit: append-only activity records. Later migrations partition by time and add sealing.
CREATE SCHEMA dalp_audit;

CREATE TABLE dalp_audit.events (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at   timestamptz NOT NULL DEFAULT now(),
    actor         text        NOT NULL,
    organisation_id uuid,
    action        text        NOT NULL,
    resource_type text        NOT NULL,
    resource_id   text,
    outcome       text        NOT NULL CHECK (outcome IN ('success', 'denied', 'error')),
    details       jsonb       NOT NULL DEFAULT '{}'
);

-- Privileges already forbid UPDATE/DELETE/TRUNCATE to every writer; this also stops the
-- owner, so removing rows needs a deliberate migration, never an ad-hoc statement.
CREATE FUNCTION dalp_audit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dalp_audit.% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON dalp_audit.events
    FOR EACH ROW EXECUTE FUNCTION dalp_audit.refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON dalp_audit.events
    FOR EACH STATEMENT EXECUTE FUNCTION dalp_audit.refuse_change();

GRANT USAGE ON SCHEMA dalp_audit TO dalp_identity_svc, dalp_assets_svc, dalp_indexer_svc, dalp_workflows_svc, dalp_auditor;
GRANT INSERT ON dalp_audit.events TO dalp_identity_svc, dalp_assets_svc, dalp_indexer_svc, dalp_workflows_svc;
GRANT SELECT ON dalp_audit.events TO dalp_auditor;
