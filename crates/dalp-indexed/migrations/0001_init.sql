-- Indexed chain state: chains and their checkpoints. Later migrations add partitioned
-- blocks, transactions, logs, transfers and balance history.
CREATE SCHEMA dalp_indexed;

CREATE TABLE dalp_indexed.chains (
    chain_id       bigint  PRIMARY KEY CHECK (chain_id > 0),
    name           text    NOT NULL,
    finality_depth integer NOT NULL DEFAULT 64 CHECK (finality_depth >= 0)
);

CREATE TABLE dalp_indexed.checkpoints (
    chain_id          bigint      PRIMARY KEY REFERENCES dalp_indexed.chains (chain_id),
    block_number      bigint      NOT NULL CHECK (block_number >= 0),
    block_hash        bytea       NOT NULL CHECK (length(block_hash) = 32),
    finalized_number  bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

GRANT USAGE ON SCHEMA dalp_indexed TO dalp_indexer_svc, dalp_readonly;
GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_indexed.chains, dalp_indexed.checkpoints TO dalp_indexer_svc;
GRANT SELECT ON dalp_indexed.chains, dalp_indexed.checkpoints TO dalp_readonly;
