-- The workflow engine: runs are the unit of work and the queue at once. Hot paths are
-- designed for HOT updates: heartbeats touch only lease_expires_at, which no index covers;
-- the claim index is partial, so finished runs leave it; fillfactor leaves room on each page
-- for the new row versions.

ALTER TABLE dalp_workflows.runs
    ADD COLUMN correlation_id   text        CHECK (length(correlation_id) <= 200),
    ADD COLUMN priority         smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    ADD COLUMN run_at           timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN max_attempts     integer     NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    ADD COLUMN lease_owner      text        CHECK (length(lease_owner) <= 200),
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN concurrency_key  text        CHECK (length(concurrency_key) <= 200),
    ADD COLUMN waiting_for      text        CHECK (length(waiting_for) <= 200),
    ADD COLUMN signal           jsonb,
    ADD COLUMN output           jsonb,
    ADD COLUMN error            text        CHECK (length(error) <= 4000),
    ADD COLUMN started_at       timestamptz,
    ADD COLUMN finished_at      timestamptz,
    ADD CONSTRAINT runs_kind_check CHECK (kind ~ '^[a-z][a-z0-9_.-]{0,99}$'),
    ADD CONSTRAINT runs_key_check CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    ADD CONSTRAINT runs_lease_check CHECK ((status = 'running') = (lease_owner IS NOT NULL));
ALTER TABLE dalp_workflows.runs SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02,
                                     autovacuum_vacuum_insert_scale_factor = 0.05);

-- Claimable: pending or sleeping runs whose time has come.
CREATE INDEX runs_ready_idx ON dalp_workflows.runs (priority DESC, run_at, id)
    WHERE status IN ('pending', 'sleeping');
-- Running runs (for expired leases); heartbeats do not change an indexed column.
CREATE INDEX runs_running_idx ON dalp_workflows.runs (id) WHERE status = 'running';
CREATE INDEX runs_attention_idx ON dalp_workflows.runs (status, updated_at)
    WHERE status IN ('failed', 'dead_letter', 'waiting');
-- Retention: finished runs by age (dalp workflows purge).
CREATE INDEX runs_finished_idx ON dalp_workflows.runs (finished_at)
    WHERE status IN ('completed', 'cancelled');
CREATE INDEX runs_correlation_idx ON dalp_workflows.runs (correlation_id) WHERE correlation_id IS NOT NULL;

-- One run at a time per concurrency key: a slot row exists while a keyed run is running.
CREATE TABLE dalp_workflows.concurrency_slots (
    concurrency_key text PRIMARY KEY,
    run_id          uuid NOT NULL REFERENCES dalp_workflows.runs (id) ON DELETE CASCADE
);
CREATE INDEX concurrency_slots_run_idx ON dalp_workflows.concurrency_slots (run_id);

-- The step journal: a completed step's result under its stable operation id. A resumed
-- run replays these instead of executing the step again.
CREATE TABLE dalp_workflows.steps (
    run_id     uuid        NOT NULL REFERENCES dalp_workflows.runs (id) ON DELETE CASCADE,
    op_id      text        NOT NULL CHECK (length(op_id) BETWEEN 1 AND 200),
    result     jsonb       NOT NULL,
    attempt    integer     NOT NULL,
    worker     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, op_id)
);

-- Side effects of the engine's self-test workflow (`dalp workflows selftest`): one row per
-- executed step, so a test can count executions.
CREATE TABLE dalp_workflows.selftest_effects (
    run_id   uuid        NOT NULL REFERENCES dalp_workflows.runs (id) ON DELETE CASCADE,
    op_id    text        NOT NULL,
    worker   text        NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX selftest_effects_run_idx ON dalp_workflows.selftest_effects (run_id);

-- Transaction requests and their lifecycle.
CREATE TABLE dalp_workflows.tx_requests (
    id              uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    organisation_id uuid          NOT NULL,
    chain_id        bigint        NOT NULL CHECK (chain_id > 0),
    sender          bytea         NOT NULL CHECK (length(sender) = 20),
    to_address      bytea         CHECK (length(to_address) = 20),
    value           numeric(78,0) NOT NULL DEFAULT 0 CHECK (value >= 0),
    data            bytea         NOT NULL DEFAULT '',
    idempotency_key text          NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    status          text          NOT NULL DEFAULT 'RECEIVED' CHECK (status IN
                        ('RECEIVED', 'QUEUED', 'PREPARING', 'PENDING_APPROVAL', 'SIGNING', 'BROADCASTING',
                         'CONFIRMING', 'COMPLETED', 'FAILED', 'DEAD_LETTER', 'CANCELLED')),
    nonce           bigint        CHECK (nonce >= 0),
    gas_limit       bigint        CHECK (gas_limit > 0),
    tx_hash         bytea         CHECK (length(tx_hash) = 32),
    error           text          CHECK (length(error) <= 4000),
    -- Set when a confirmation timed out: check the chain again at this time.
    recheck_at      timestamptz,
    created_by      text          NOT NULL,
    created_at      timestamptz   NOT NULL DEFAULT now(),
    updated_at      timestamptz   NOT NULL DEFAULT now()
) WITH (fillfactor = 80);
CREATE INDEX tx_requests_dedup_idx ON dalp_workflows.tx_requests (sender, chain_id, idempotency_key, created_at);
CREATE INDEX tx_requests_status_idx ON dalp_workflows.tx_requests (status, updated_at)
    WHERE status NOT IN ('COMPLETED', 'CANCELLED');
CREATE UNIQUE INDEX tx_requests_nonce_idx ON dalp_workflows.tx_requests (chain_id, sender, nonce)
    WHERE nonce IS NOT NULL;

CREATE TABLE dalp_workflows.tx_transitions (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id   uuid        NOT NULL REFERENCES dalp_workflows.tx_requests (id) ON DELETE CASCADE,
    from_status  text,
    to_status    text        NOT NULL,
    actor        text        NOT NULL,
    detail       jsonb       NOT NULL DEFAULT '{}',
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tx_transitions_request_idx ON dalp_workflows.tx_transitions (request_id, id);

-- Next nonce per (chain, signer); nonces of requests that ended before broadcast return to
-- released_nonces and are handed out again first, so the sequence has no gaps.
CREATE TABLE dalp_workflows.signer_nonces (
    chain_id   bigint NOT NULL CHECK (chain_id > 0),
    signer     bytea  NOT NULL CHECK (length(signer) = 20),
    next_nonce bigint NOT NULL DEFAULT 0 CHECK (next_nonce >= 0),
    PRIMARY KEY (chain_id, signer)
) WITH (fillfactor = 50);
CREATE TABLE dalp_workflows.released_nonces (
    chain_id bigint NOT NULL,
    signer   bytea  NOT NULL,
    nonce    bigint NOT NULL,
    PRIMARY KEY (chain_id, signer, nonce),
    FOREIGN KEY (chain_id, signer) REFERENCES dalp_workflows.signer_nonces (chain_id, signer)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_workflows.concurrency_slots, dalp_workflows.steps,
    dalp_workflows.selftest_effects, dalp_workflows.tx_requests, dalp_workflows.tx_transitions,
    dalp_workflows.signer_nonces, dalp_workflows.released_nonces TO dalp_workflows_svc;
GRANT SELECT ON dalp_workflows.concurrency_slots, dalp_workflows.steps,
    dalp_workflows.selftest_effects, dalp_workflows.tx_requests, dalp_workflows.tx_transitions,
    dalp_workflows.signer_nonces, dalp_workflows.released_nonces TO dalp_readonly;
