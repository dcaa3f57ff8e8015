-- Writers cannot forge an event's metadata: the id is drawn by the database (a writer that
-- supplies one is refused; the identity column, which OVERRIDING SYSTEM VALUE could bypass,
-- becomes a plain column filled by the trigger), the transaction id is the writer's own
-- transaction, and the time is the transaction's start (the column default). Every event a
-- writer can create therefore gets sealed, in order, at its real time. (The superuser can
-- still bypass triggers; `dalp audit verify` detects what it forges: duplicate ids,
-- transaction ids not issued yet, rows below the seal watermark.)
DO $$
DECLARE
    next bigint := coalesce((SELECT max(id) FROM dalp_audit.events), 0) + 1;
BEGIN
    EXECUTE format('CREATE SEQUENCE dalp_audit.event_ids AS bigint START WITH %s', next);
END $$;
ALTER TABLE dalp_audit.events ALTER COLUMN id DROP IDENTITY;

-- Runs as the writer (no SECURITY DEFINER: no per-row privilege switch on the hot path).
-- Writers may draw ids (USAGE, below) but not set the sequence, and the trigger refuses any id
-- they supply. Names are schema-qualified.
CREATE FUNCTION dalp_audit.stamp_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS NOT NULL THEN
        RAISE EXCEPTION 'dalp_audit.events: the id is assigned by the database, not the writer'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.txid OPERATOR(pg_catalog.<>) pg_catalog.pg_current_xact_id() THEN
        RAISE EXCEPTION 'dalp_audit.events: txid is the writing transaction''s own, not the writer''s choice'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.occurred_at OPERATOR(pg_catalog.<>) pg_catalog.now() THEN
        RAISE EXCEPTION 'dalp_audit.events: occurred_at is the transaction time, not the writer''s choice'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.id := pg_catalog.nextval('dalp_audit.event_ids');
    RETURN NEW;
END;
$$;
GRANT USAGE ON SEQUENCE dalp_audit.event_ids
    TO dalp_identity_svc, dalp_assets_svc, dalp_indexer_svc, dalp_workflows_svc;

CREATE TRIGGER events_stamp BEFORE INSERT ON dalp_audit.events
    FOR EACH ROW EXECUTE FUNCTION dalp_audit.stamp_event();

-- The sealer reads events in (txid, id) order from its watermark: with this index a batch
-- is an index range read, also when it catches up with a large backlog (the txid-only index
-- made each batch sort the whole backlog).
CREATE INDEX events_txid_id_idx ON dalp_audit.events (txid, id);
DROP INDEX dalp_audit.events_txid_idx;
