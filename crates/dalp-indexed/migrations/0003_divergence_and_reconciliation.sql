-- A chain whose node no longer has dalp's blocks within the finality depth (node reset,
-- another chain behind the same URL) is marked diverged: ingest stops until an operator
-- re-points the indexer or rewinds, and every status and read says so.
ALTER TABLE dalp_indexed.chains
    ADD COLUMN diverged_at     timestamptz,
    ADD COLUMN diverged_block  bigint,
    ADD COLUMN diverged_reason text CHECK (length(diverged_reason) <= 1000),
    ADD CONSTRAINT chains_divergence_whole
        CHECK ((diverged_at IS NULL) = (diverged_reason IS NULL));

-- The newest reconciliation of each token against the node's own view at a finalized block:
-- totalSupply() and balanceOf() for a sample of holders, compared with what dalp indexed.
CREATE TABLE dalp_indexed.reconciliations (
    chain_id          bigint      NOT NULL REFERENCES dalp_indexed.chains (chain_id),
    token             bytea       NOT NULL CHECK (length(token) = 20),
    block_number      bigint      NOT NULL CHECK (block_number >= 0),
    checked_at        timestamptz NOT NULL DEFAULT now(),
    indexed_supply    numeric(78, 0) NOT NULL,
    -- NULL: the contract has no totalSupply() (not an ERC-20); balances are still compared.
    node_supply       numeric(78, 0),
    balances_checked  integer     NOT NULL CHECK (balances_checked >= 0),
    drifted_accounts  bytea[]     NOT NULL DEFAULT '{}',
    in_agreement      boolean     NOT NULL,
    PRIMARY KEY (chain_id, token)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_indexed.reconciliations TO dalp_indexer_svc;
GRANT SELECT ON dalp_indexed.reconciliations TO dalp_readonly;
