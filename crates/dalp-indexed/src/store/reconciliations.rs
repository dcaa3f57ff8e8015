//! Reconciliation against the node: candidates, samples and recorded results.

use super::*;

impl IndexedStore {
    /// Tokens with indexed balances or supply at or below `block`, least recently
    /// reconciled first (never reconciled before all others).
    #[tracing::instrument(target = "dalp_store", name = "indexed.reconcile_candidates", skip_all)]
    pub async fn reconcile_candidates(
        &self,
        chain_id: i64,
        block: i64,
        limit: i64,
    ) -> Result<Vec<Address>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let rows = client
            .query_typed(
                "SELECT t.token FROM (SELECT DISTINCT token FROM dalp_indexed.supply_history
                                        WHERE chain_id = $1 AND block_number <= $2) t
                   LEFT JOIN dalp_indexed.reconciliations r ON r.chain_id = $1 AND r.token = t.token
                  ORDER BY r.checked_at NULLS FIRST, t.token LIMIT $3",
                &[
                    (&chain_id, Type::INT8),
                    (&block, Type::INT8),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| to20(r.get::<_, &[u8]>(0))).collect())
    }

    /// Up to `n` random holders of `token` (ever), each with its indexed balance after
    /// `block`.
    #[tracing::instrument(target = "dalp_store", name = "indexed.sample_balances", skip_all)]
    pub async fn sample_balances(
        &self,
        chain_id: i64,
        token: &Address,
        block: i64,
        n: i64,
    ) -> Result<Vec<(Address, String)>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let rows = client
            .query_typed(
                "SELECT s.account, coalesce(h.balance, 0)::text
                   FROM (SELECT account FROM dalp_indexed.balances
                          WHERE chain_id = $1 AND token = $2 ORDER BY random() LIMIT $4) s
                   LEFT JOIN LATERAL (
                        SELECT balance FROM dalp_indexed.balance_history h
                         WHERE h.chain_id = $1 AND h.token = $2 AND h.account = s.account
                           AND h.block_number <= $3
                         ORDER BY h.block_number DESC LIMIT 1) h ON true",
                &[
                    (&chain_id, Type::INT8),
                    (&token, Type::BYTEA),
                    (&block, Type::INT8),
                    (&n, Type::INT8),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (to20(r.get::<_, &[u8]>(0)), r.get(1)))
            .collect())
    }

    /// Keeps `r` as the token's newest reconciliation; a newly found disagreement is
    /// audited.
    #[tracing::instrument(
        target = "dalp_store",
        name = "indexed.record_reconciliation",
        skip_all
    )]
    pub async fn record_reconciliation(
        &self,
        chain_id: i64,
        token: &Address,
        r: &crate::reconcile::TokenReconciliation,
        drifted: &[Address],
    ) -> Result<(), IndexError> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.record_reconciliation").await?;
        let drifted: Vec<Vec<u8>> = drifted.iter().map(|a| a.to_vec()).collect();
        let balances_checked = r.balances_checked as i32;
        let was_in_agreement: Option<bool> = tx
            .typed_query_one(
                "WITH old AS (SELECT in_agreement FROM dalp_indexed.reconciliations
                               WHERE chain_id = $1 AND token = $2 FOR UPDATE),
                      up AS (INSERT INTO dalp_indexed.reconciliations AS c
                               (chain_id, token, block_number, checked_at, indexed_supply, node_supply,
                                balances_checked, drifted_accounts, in_agreement)
                             VALUES ($1, $2, $3, now(), $4::text::numeric, $5::text::numeric, $6, $7, $8)
                             ON CONFLICT (chain_id, token) DO UPDATE SET
                                block_number = EXCLUDED.block_number, checked_at = EXCLUDED.checked_at,
                                indexed_supply = EXCLUDED.indexed_supply, node_supply = EXCLUDED.node_supply,
                                balances_checked = EXCLUDED.balances_checked,
                                drifted_accounts = EXCLUDED.drifted_accounts,
                                in_agreement = EXCLUDED.in_agreement)
                 SELECT (SELECT in_agreement FROM old)",
                &[
                    &chain_id,
                    &token,
                    &r.block,
                    &r.indexed_supply,
                    &r.node_supply,
                    &balances_checked,
                    &drifted,
                    &r.in_agreement,
                ],
            )
            .await?
            .get(0);
        if !r.in_agreement && was_in_agreement != Some(false) {
            tx.record(
                &RequestContext::service("indexer")
                    .event("indexed.reconcile.drift", "token")
                    .resource(&r.token)
                    .outcome(dalp_audit::Outcome::Error)
                    .details(json!({
                        "chain_id": chain_id,
                        "block": r.block,
                        "indexed_supply": r.indexed_supply,
                        "node_supply": r.node_supply,
                        "drifted_accounts": r.drifted_accounts,
                    })),
            )
            .await?;
            tx.commit().await?;
        } else {
            tx.commit_unaudited(
                "a reconciliation in agreement, or drift already reported: its row is the record",
            )
            .await?;
        }
        Ok(())
    }

    /// The newest reconciliation of every token of `chain_id`, disagreements first.
    #[tracing::instrument(target = "dalp_store", name = "indexed.reconciliations", skip_all)]
    pub async fn reconciliations(
        &self,
        chain_id: i64,
    ) -> Result<Vec<crate::reconcile::TokenReconciliation>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let rows = client
            .query_typed(
                "SELECT token, block_number, indexed_supply::text, node_supply::text, balances_checked,
                        drifted_accounts, in_agreement, checked_at
                   FROM dalp_indexed.reconciliations WHERE chain_id = $1
                  ORDER BY in_agreement, token",
                &[(&chain_id, Type::INT8)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| crate::reconcile::TokenReconciliation {
                token: hex0x(r.get::<_, &[u8]>(0)),
                block: r.get(1),
                indexed_supply: r.get(2),
                node_supply: r.get(3),
                balances_checked: r.get::<_, i32>(4) as usize,
                drifted_accounts: r
                    .get::<_, Vec<Vec<u8>>>(5)
                    .iter()
                    .map(|a| hex0x(a))
                    .collect(),
                in_agreement: r.get(6),
                checked_at: Some(r.get(7)),
            })
            .collect())
    }
}
