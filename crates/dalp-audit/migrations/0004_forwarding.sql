-- Durable cursors of SIEM forwarders (the last sequence delivered), and an index to find
-- the batches after a sequence.
CREATE TABLE dalp_audit.forward_cursors (
    name       text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    last_seq   bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX seal_batches_last_seq_idx ON dalp_audit.seal_batches (last_seq);

GRANT SELECT, INSERT, UPDATE ON dalp_audit.forward_cursors TO dalp_audit_sealer;
GRANT SELECT ON dalp_audit.forward_cursors TO dalp_auditor;
