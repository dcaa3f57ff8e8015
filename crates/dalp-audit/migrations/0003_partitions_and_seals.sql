-- Monthly partitions, the transaction id each event was written in (for sealing), the sealed
-- hash chain and the record of retention drops. Existing events keep their ids.

ALTER TABLE dalp_audit.events RENAME TO events_v2;
ALTER TABLE dalp_audit.events_v2 RENAME CONSTRAINT events_pkey TO events_v2_pkey;

CREATE TABLE dalp_audit.events (
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    -- Top-level transaction of the writer; the sealer seals only transactions that ended.
    txid            xid8        NOT NULL DEFAULT pg_current_xact_id(),
    actor           text        NOT NULL CHECK (length(actor) <= 200),
    organisation_id uuid,
    action          text        NOT NULL CHECK (length(action) <= 100),
    resource_type   text        NOT NULL CHECK (length(resource_type) <= 100),
    resource_id     text        CHECK (length(resource_id) <= 200),
    outcome         text        NOT NULL CHECK (outcome IN ('success', 'denied', 'error')),
    request_id      text        CHECK (length(request_id) <= 200),
    source_ip       inet,
    details         jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX events_txid_idx ON dalp_audit.events (txid);
CREATE INDEX events_occurred_idx ON dalp_audit.events (occurred_at);
CREATE INDEX events_actor_idx ON dalp_audit.events (actor, occurred_at);
CREATE INDEX events_action_idx ON dalp_audit.events (action, occurred_at);

-- Partitions from the oldest existing event to three months ahead; the partition manager
-- keeps them ahead from here on.
DO $$
DECLARE
    m date := date_trunc('month', coalesce((SELECT min(occurred_at) FROM dalp_audit.events_v2), now()) AT TIME ZONE 'UTC');
BEGIN
    WHILE m <= (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months')::date LOOP
        EXECUTE format(
            'CREATE TABLE dalp_audit.%I PARTITION OF dalp_audit.events FOR VALUES FROM (%L) TO (%L)',
            'events_p' || to_char(m, 'YYYYMM'),
            (m::timestamp AT TIME ZONE 'UTC'), ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
        m := (m + interval '1 month')::date;
    END LOOP;
END $$;

INSERT INTO dalp_audit.events (id, occurred_at, txid, actor, organisation_id, action, resource_type,
                               resource_id, outcome, request_id, source_ip, details)
OVERRIDING SYSTEM VALUE
SELECT id, occurred_at, '1'::xid8, actor, organisation_id, action, resource_type,
       resource_id, outcome, request_id, source_ip, details
  FROM dalp_audit.events_v2;
SELECT setval(pg_get_serial_sequence('dalp_audit.events', 'id'),
              greatest((SELECT max(id) FROM dalp_audit.events_v2), 1));
DROP TABLE dalp_audit.events_v2;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON dalp_audit.events
    FOR EACH ROW EXECUTE FUNCTION dalp_audit.refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON dalp_audit.events
    FOR EACH STATEMENT EXECUTE FUNCTION dalp_audit.refuse_change();

-- The chain. Batch n seals events first_seq..last_seq (gap-free across batches) in the order
-- of event_ids; all events of transactions below xmin_upper are sealed by it or earlier.
CREATE TABLE dalp_audit.seal_batches (
    batch_no     bigint      PRIMARY KEY CHECK (batch_no > 0),
    first_seq    bigint      NOT NULL CHECK (first_seq > 0),
    last_seq     bigint      NOT NULL,
    event_ids    bigint[]    NOT NULL,
    event_times  timestamptz[] NOT NULL,
    event_hashes bytea[]     NOT NULL,
    xmin_upper   xid8        NOT NULL,
    merkle_root  bytea       NOT NULL,
    prev_hash    bytea       NOT NULL,
    batch_hash   bytea       NOT NULL,
    key_id       text        NOT NULL,
    signature    bytea       NOT NULL,
    sealed_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (last_seq - first_seq + 1 = cardinality(event_ids)),
    CHECK (cardinality(event_ids) = cardinality(event_times) AND cardinality(event_ids) = cardinality(event_hashes))
);

-- Whole partitions dropped by the partition manager under the retention policy.
CREATE TABLE dalp_audit.retention_log (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name     text        NOT NULL,
    partition_name text        NOT NULL,
    range_from     timestamptz NOT NULL,
    range_to       timestamptz NOT NULL,
    rows_dropped   bigint      NOT NULL,
    dropped_at     timestamptz NOT NULL DEFAULT now(),
    dropped_by     text        NOT NULL DEFAULT session_user
);

CREATE TRIGGER seal_batches_append_only BEFORE UPDATE OR DELETE ON dalp_audit.seal_batches
    FOR EACH ROW EXECUTE FUNCTION dalp_audit.refuse_change();
CREATE TRIGGER seal_batches_no_truncate BEFORE TRUNCATE ON dalp_audit.seal_batches
    FOR EACH STATEMENT EXECUTE FUNCTION dalp_audit.refuse_change();
CREATE TRIGGER retention_log_append_only BEFORE UPDATE OR DELETE ON dalp_audit.retention_log
    FOR EACH ROW EXECUTE FUNCTION dalp_audit.refuse_change();
CREATE TRIGGER retention_log_no_truncate BEFORE TRUNCATE ON dalp_audit.retention_log
    FOR EACH STATEMENT EXECUTE FUNCTION dalp_audit.refuse_change();

GRANT USAGE ON SCHEMA dalp_audit TO dalp_audit_sealer;
GRANT INSERT ON dalp_audit.events TO dalp_identity_svc, dalp_assets_svc, dalp_indexer_svc, dalp_workflows_svc;
GRANT SELECT ON dalp_audit.events, dalp_audit.seal_batches, dalp_audit.retention_log TO dalp_auditor;
GRANT SELECT ON dalp_audit.events, dalp_audit.retention_log TO dalp_audit_sealer;
GRANT SELECT, INSERT ON dalp_audit.seal_batches TO dalp_audit_sealer;
