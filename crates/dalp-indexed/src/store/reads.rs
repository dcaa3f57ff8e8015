//! Reads: balances, holders, transfers, and a balance or supply at a block.

use super::*;

impl IndexedStore {
    /// Current balances of `account` across tokens.
    #[tracing::instrument(target = "dalp_store", name = "indexed.balances_of", skip_all)]
    pub async fn balances_of(
        &self,
        chain_id: i64,
        account: &Address,
    ) -> Result<Vec<Balance>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        let rows = client
            .query_typed(
                "SELECT token, account, balance::text, block_number FROM dalp_indexed.balances
                  WHERE chain_id = $1 AND account = $2 AND balance <> 0 ORDER BY token",
                &[(&chain_id, Type::INT8), (&account, Type::BYTEA)],
            )
            .await?;
        Ok(rows.iter().map(balance_row).collect())
    }

    /// Holders of `token`, largest first; `after` is the last (balance, account) of the
    /// previous page.
    #[tracing::instrument(target = "dalp_store", name = "indexed.holders", skip_all)]
    pub async fn holders(
        &self,
        chain_id: i64,
        token: &Address,
        limit: i64,
        after: Option<(&str, &Address)>,
    ) -> Result<Vec<Balance>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        let (after_balance, after_account) = match after {
            Some((b, a)) => (Some(b.to_string()), Some(a.to_vec())),
            None => (None, None),
        };
        let rows = client
            .query_typed(
                // Qualified: a bare `balance` in ORDER BY would sort the text output column.
                "SELECT b.token, b.account, b.balance::text, b.block_number FROM dalp_indexed.balances b
                  WHERE b.chain_id = $1 AND b.token = $2 AND b.balance > 0
                    AND ($3::text IS NULL OR (b.balance, b.account) < ($3::numeric, $4::bytea))
                  ORDER BY b.balance DESC, b.account DESC LIMIT $5",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&after_balance, Type::TEXT),
                    (&after_account, Type::BYTEA),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(balance_row).collect())
    }

    /// Transfers of a token or an account, newest first.
    #[tracing::instrument(target = "dalp_store", name = "indexed.transfers", skip_all)]
    pub async fn transfers(
        &self,
        chain_id: i64,
        filter: TransferFilter<'_>,
        q: &TransferQuery,
    ) -> Result<Vec<TransferRow>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        let (sql, addr) = transfers_sql(filter);
        let (before_block, before_log) = match q.before {
            Some((b, l)) => (Some(b), Some(l)),
            None => (None, None),
        };
        let rows = client
            .query_typed(
                &sql,
                &[
                    (&chain_id, Type::INT8),
                    (&addr, Type::BYTEA),
                    (&q.since, Type::TIMESTAMPTZ),
                    (&q.until, Type::TIMESTAMPTZ),
                    (&before_block, Type::INT8),
                    (&before_log, Type::INT4),
                    (&q.limit, Type::INT8),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TransferRow {
                block_number: r.get(0),
                block_time: r.get(1),
                log_index: r.get(2),
                tx_hash: hex0x(r.get::<_, &[u8]>(3)),
                token: hex0x(r.get::<_, &[u8]>(4)),
                from: hex0x(r.get::<_, &[u8]>(5)),
                to: hex0x(r.get::<_, &[u8]>(6)),
                value: r.get(7),
            })
            .collect())
    }

    /// The balance of `account` in `token` after block `block` ("0" before any transfer).
    #[tracing::instrument(target = "dalp_store", name = "indexed.balance_at", skip_all)]
    pub async fn balance_at(
        &self,
        chain_id: i64,
        token: &Address,
        account: &Address,
        block: i64,
    ) -> Result<String, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        self.indexed_up_to(&**client, chain_id, block).await?;
        let row = client
            .query_typed(
                "SELECT balance::text FROM dalp_indexed.balance_history
                  WHERE chain_id = $1 AND token = $2 AND account = $3 AND block_number <= $4
                  ORDER BY block_number DESC LIMIT 1",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&account, Type::BYTEA),
                    (&block, Type::INT8),
                ],
            )
            .await?;
        Ok(row.first().map(|r| r.get(0)).unwrap_or_else(|| "0".into()))
    }

    /// Total supply of `token` after block `block` (mints minus burns since indexing began).
    #[tracing::instrument(target = "dalp_store", name = "indexed.supply_at", skip_all)]
    pub async fn supply_at(
        &self,
        chain_id: i64,
        token: &Address,
        block: i64,
    ) -> Result<String, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        self.chain_in(&**client, chain_id).await?;
        self.indexed_up_to(&**client, chain_id, block).await?;
        let row = client
            .query_typed(
                "SELECT total_supply::text FROM dalp_indexed.supply_history
                  WHERE chain_id = $1 AND token = $2 AND block_number <= $3
                  ORDER BY block_number DESC LIMIT 1",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&block, Type::INT8),
                ],
            )
            .await?;
        Ok(row.first().map(|r| r.get(0)).unwrap_or_else(|| "0".into()))
    }

    /// Row counts of every table for `chain_id` (tests and `dalp index status`).
    #[tracing::instrument(target = "dalp_store", name = "indexed.counts", skip_all)]
    pub async fn counts(&self, chain_id: i64) -> Result<Vec<(String, i64)>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let mut out = Vec::new();
        for table in [
            "blocks",
            "transactions",
            "logs",
            "transfers",
            "balance_history",
            "balances",
            "supply_history",
            "role_events",
        ] {
            let n: i64 = client
                .query_typed(
                    &format!("SELECT count(*) FROM dalp_indexed.{table} WHERE chain_id = $1"),
                    &[(&chain_id, Type::INT8)],
                )
                .await?[0]
                .get(0);
            out.push((table.to_string(), n));
        }
        Ok(out)
    }
}
