-- Indexed chain state: blocks, transactions, event logs (raw and decoded), token transfers,
-- balances now and at any past block, total supply history and role events.
--
-- High-volume tables (transactions, logs, transfers, balance_history) are range-partitioned
-- by block time, one partition per month. Their rows carry no foreign keys: they are written
-- only by the ingest transaction, which keeps them consistent with `blocks`, and RI triggers
-- would cost a row-by-row check on every bulk COPY.

ALTER TABLE dalp_indexed.chains ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE dalp_indexed.checkpoints
    ADD COLUMN head_number bigint CHECK (head_number >= 0),
    ADD CONSTRAINT checkpoints_finalized_le_block CHECK (finalized_number <= block_number);

-- The canonical chain as ingested: one row per block, parent links checked on ingest.
CREATE TABLE dalp_indexed.blocks (
    chain_id    bigint      NOT NULL REFERENCES dalp_indexed.chains (chain_id),
    number      bigint      NOT NULL CHECK (number >= 0),
    hash        bytea       NOT NULL CHECK (length(hash) = 32),
    parent_hash bytea       NOT NULL CHECK (length(parent_hash) = 32),
    block_time  timestamptz NOT NULL,
    tx_count    integer     NOT NULL CHECK (tx_count >= 0),
    log_count   integer     NOT NULL CHECK (log_count >= 0),
    PRIMARY KEY (chain_id, number)
);

CREATE TABLE dalp_indexed.transactions (
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL,
    block_time   timestamptz NOT NULL,
    tx_index     integer     NOT NULL CHECK (tx_index >= 0),
    hash         bytea       NOT NULL CHECK (length(hash) = 32),
    from_address bytea       NOT NULL CHECK (length(from_address) = 20),
    to_address   bytea       CHECK (length(to_address) = 20),
    -- 1 success, 0 reverted, NULL unknown (pre-Byzantium or not fetched).
    status       smallint    CHECK (status IN (0, 1)),
    PRIMARY KEY (chain_id, block_time, block_number, tx_index)
) PARTITION BY RANGE (block_time);
CREATE INDEX transactions_hash_idx ON dalp_indexed.transactions (chain_id, hash);

CREATE TABLE dalp_indexed.logs (
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL,
    block_time   timestamptz NOT NULL,
    log_index    integer     NOT NULL CHECK (log_index >= 0),
    tx_hash      bytea       NOT NULL CHECK (length(tx_hash) = 32),
    tx_index     integer     NOT NULL CHECK (tx_index >= 0),
    address      bytea       NOT NULL CHECK (length(address) = 20),
    topic0       bytea       CHECK (length(topic0) = 32),
    topic1       bytea       CHECK (length(topic1) = 32),
    topic2       bytea       CHECK (length(topic2) = 32),
    topic3       bytea       CHECK (length(topic3) = 32),
    data         bytea       NOT NULL,
    -- Decoded form of the events we understand (Transfer, Approval, RoleGranted, RoleRevoked,
    -- Paused, Unpaused); NULL for others.
    event        text        CHECK (event IN ('Transfer', 'Approval', 'RoleGranted', 'RoleRevoked', 'Paused', 'Unpaused')),
    decoded      jsonb,
    PRIMARY KEY (chain_id, block_time, block_number, log_index)
) PARTITION BY RANGE (block_time);
CREATE INDEX logs_address_idx ON dalp_indexed.logs (chain_id, address, block_number);

-- ERC-20 transfers; mints have from = 0x0, burns to = 0x0.
CREATE TABLE dalp_indexed.transfers (
    chain_id     bigint        NOT NULL,
    block_number bigint        NOT NULL,
    block_time   timestamptz   NOT NULL,
    log_index    integer       NOT NULL,
    tx_hash      bytea         NOT NULL CHECK (length(tx_hash) = 32),
    token        bytea         NOT NULL CHECK (length(token) = 20),
    from_address bytea         NOT NULL CHECK (length(from_address) = 20),
    to_address   bytea         NOT NULL CHECK (length(to_address) = 20),
    value        numeric(78,0) NOT NULL
        CHECK (value >= 0 AND value <= 115792089237316195423570985008687907853269984665640564039457584007913129639935),
    PRIMARY KEY (chain_id, block_time, block_number, log_index)
) PARTITION BY RANGE (block_time);
CREATE INDEX transfers_token_idx ON dalp_indexed.transfers (chain_id, token, block_number, log_index);
CREATE INDEX transfers_from_idx ON dalp_indexed.transfers (chain_id, from_address, block_number);
CREATE INDEX transfers_to_idx ON dalp_indexed.transfers (chain_id, to_address, block_number);

-- One row per (token, account, block) whose balance changed: the balance after that block.
-- The balance at block N is the newest row at or below N. Balances are relative to the first
-- indexed block; indexed from the token's deployment they are exact (and never negative).
CREATE TABLE dalp_indexed.balance_history (
    chain_id     bigint        NOT NULL,
    token        bytea         NOT NULL CHECK (length(token) = 20),
    account      bytea         NOT NULL CHECK (length(account) = 20),
    block_number bigint        NOT NULL,
    block_time   timestamptz   NOT NULL,
    balance      numeric(79,0) NOT NULL,
    PRIMARY KEY (chain_id, token, account, block_number, block_time)
) PARTITION BY RANGE (block_time);

-- Current balances: the newest balance_history row of each (token, account).
CREATE TABLE dalp_indexed.balances (
    chain_id     bigint        NOT NULL REFERENCES dalp_indexed.chains (chain_id),
    token        bytea         NOT NULL CHECK (length(token) = 20),
    account      bytea         NOT NULL CHECK (length(account) = 20),
    balance      numeric(79,0) NOT NULL,
    block_number bigint        NOT NULL,
    PRIMARY KEY (chain_id, token, account)
);
CREATE INDEX balances_holders_idx ON dalp_indexed.balances (chain_id, token, balance DESC, account DESC);
CREATE INDEX balances_account_idx ON dalp_indexed.balances (chain_id, account);

-- Total supply after each block that minted or burned.
CREATE TABLE dalp_indexed.supply_history (
    chain_id     bigint        NOT NULL REFERENCES dalp_indexed.chains (chain_id),
    token        bytea         NOT NULL CHECK (length(token) = 20),
    block_number bigint        NOT NULL,
    total_supply numeric(79,0) NOT NULL,
    PRIMARY KEY (chain_id, token, block_number)
);

CREATE TABLE dalp_indexed.role_events (
    chain_id     bigint  NOT NULL REFERENCES dalp_indexed.chains (chain_id),
    block_number bigint  NOT NULL,
    log_index    integer NOT NULL,
    contract     bytea   NOT NULL CHECK (length(contract) = 20),
    role         bytea   NOT NULL CHECK (length(role) = 32),
    account      bytea   NOT NULL CHECK (length(account) = 20),
    sender       bytea   NOT NULL CHECK (length(sender) = 20),
    granted      boolean NOT NULL,
    PRIMARY KEY (chain_id, block_number, log_index)
);
CREATE INDEX role_events_contract_idx ON dalp_indexed.role_events (chain_id, contract, role);

-- Creates the monthly partitions of `p_table` covering [p_from, p_to]. SECURITY DEFINER so
-- the indexer can ingest blocks of any age without owning the tables; it can create nothing
-- else. Names match the partition manager's (`<table>_pYYYYMM`).
CREATE FUNCTION dalp_indexed.ensure_partitions(p_table text, p_from timestamptz, p_to timestamptz)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    m       timestamptz;
    created integer := 0;
    part    text;
BEGIN
    IF p_table NOT IN ('transactions', 'logs', 'transfers', 'balance_history') THEN
        RAISE EXCEPTION 'ensure_partitions: % is not a partitioned indexed table', p_table;
    END IF;
    IF p_from IS NULL OR p_to IS NULL OR p_to < p_from OR p_to - p_from > interval '50 years' THEN
        RAISE EXCEPTION 'ensure_partitions: bad range % .. %', p_from, p_to;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('dalp_indexed.ensure_partitions'));
    m := date_trunc('month', p_from);
    WHILE m <= p_to LOOP
        part := p_table || '_p' || to_char(m, 'YYYYMM');
        IF to_regclass(format('dalp_indexed.%I', part)) IS NULL THEN
            EXECUTE format('CREATE TABLE dalp_indexed.%I PARTITION OF dalp_indexed.%I FOR VALUES FROM (%L) TO (%L)',
                           part, p_table, m, m + interval '1 month');
            created := created + 1;
        END IF;
        m := m + interval '1 month';
    END LOOP;
    RETURN created;
END $$;
REVOKE ALL ON FUNCTION dalp_indexed.ensure_partitions(text, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dalp_indexed.ensure_partitions(text, timestamptz, timestamptz) TO dalp_indexer_svc;

SELECT dalp_indexed.ensure_partitions(t, now(), now() + interval '3 months')
  FROM unnest(ARRAY['transactions', 'logs', 'transfers', 'balance_history']) AS t;

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_indexed.blocks, dalp_indexed.transactions,
    dalp_indexed.logs, dalp_indexed.transfers, dalp_indexed.balance_history,
    dalp_indexed.balances, dalp_indexed.supply_history, dalp_indexed.role_events
    TO dalp_indexer_svc;
GRANT SELECT ON dalp_indexed.blocks, dalp_indexed.transactions, dalp_indexed.logs,
    dalp_indexed.transfers, dalp_indexed.balance_history, dalp_indexed.balances,
    dalp_indexed.supply_history, dalp_indexed.role_events
    TO dalp_readonly;
