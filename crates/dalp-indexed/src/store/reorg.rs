//! Reorgs and rewinds: back to a common ancestor, undoing balances and supply.

use super::*;

impl IndexedStore {
    /// Rolls the stored chain back to block `fork` (everything above it goes: rows,
    /// balances, supply, checkpoint), e.g. to re-index from there. Refused below the
    /// finalized block, like a reorg that deep, and on a diverged chain (the follower must
    /// not quietly carry on).
    pub async fn rewind(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        fork: i64,
    ) -> Result<Reorg, IndexError> {
        self.rewind_with(ctx, chain_id, fork, false).await
    }

    /// An operator's rewind (`dalp index rewind`): with `beyond_finality` it may go below the
    /// finalized block — down to `-1`, which empties the chain's index for a re-index — and
    /// it ends a divergence, since the operator has decided where the index resumes.
    #[tracing::instrument(target = "dalp_store", name = "indexed.rewind", skip_all)]
    pub async fn rewind_with(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        fork: i64,
        beyond_finality: bool,
    ) -> Result<Reorg, IndexError> {
        if fork < -1 {
            return Err(Invalid::new("to", "must be -1 (re-index) or a block number").into());
        }
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.rewind").await?;
        let (finality_depth, cp) = lock_chain_any(&tx, chain_id).await?;
        if !beyond_finality {
            refuse_if_diverged(&tx, chain_id).await?;
        }
        let (n, _, finalized) =
            cp.ok_or_else(|| IndexError::NotFound(format!("a checkpoint of chain {chain_id}")))?;
        let depth = if beyond_finality {
            (n - fork).max(0)
        } else {
            reorg_depth(fork, n, finalized, finality_depth)?
        };
        // Below the first indexed block, everything goes.
        let lowest: i64 = tx
            .typed_query_one(
                "SELECT coalesce(min(number), 0) FROM dalp_indexed.blocks WHERE chain_id = $1",
                &[&chain_id],
            )
            .await?
            .get(0);
        self.rollback(&tx, chain_id, fork.max(lowest - 1)).await?;
        let cleared = tx
            .typed_execute(
                "UPDATE dalp_indexed.chains SET diverged_at = NULL, diverged_block = NULL, diverged_reason = NULL
                  WHERE chain_id = $1 AND diverged_at IS NOT NULL",
                &[&chain_id],
            )
            .await?;
        tx.record(
            &ctx.event("indexed.blocks.rewind", "chain")
                .resource(chain_id)
                .details(json!({
                    "fork": fork,
                    "depth": depth,
                    "beyond_finality": beyond_finality,
                    "divergence_cleared": cleared > 0,
                })),
        )
        .await?;
        tx.commit().await?;
        Ok(Reorg { fork, depth })
    }

    /// Removes everything above block `fork` and restores balances, supply and checkpoint.
    pub(super) async fn rollback(
        &self,
        tx: &Transaction<'_>,
        chain_id: i64,
        fork: i64,
    ) -> Result<(), IndexError> {
        // Block times never decrease along the chain, so every removed row is at or after
        // the first removed block's time: the bound prunes partitions.
        let Some(since) = tx
            .typed_query_opt(
                "SELECT block_time FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                &[&chain_id, &(fork + 1)],
            )
            .await?
            .map(|r| r.get::<_, DateTime<Utc>>(0))
        else {
            return Ok(());
        };
        for table in ["transactions", "logs", "transfers"] {
            tx.typed_execute(
                &format!(
                    "DELETE FROM dalp_indexed.{table} WHERE chain_id = $1 AND block_time >= $2 AND block_number > $3"
                ),
                &[&chain_id, &since, &fork],
            )
            .await?;
        }
        let gone = tx
            .typed_query(
                "WITH gone AS (
                     DELETE FROM dalp_indexed.balance_history
                      WHERE chain_id = $1 AND block_time >= $2 AND block_number > $3
                  RETURNING token, account)
                 SELECT array_agg(token), array_agg(account)
                   FROM (SELECT DISTINCT token, account FROM gone) d",
                &[&chain_id, &since, &fork],
            )
            .await?;
        let tokens: Option<Vec<Vec<u8>>> = gone[0].get(0);
        let accounts: Option<Vec<Vec<u8>>> = gone[0].get(1);
        // Each touched balance becomes its newest remaining history row, or goes.
        tx.typed_execute(
            "WITH latest AS (
                 SELECT p.token, p.account, h.balance, h.block_number
                   FROM unnest($2::bytea[], $3::bytea[]) AS p(token, account)
                   LEFT JOIN LATERAL (
                        SELECT balance, block_number FROM dalp_indexed.balance_history h
                         WHERE h.chain_id = $1 AND h.token = p.token AND h.account = p.account
                         ORDER BY block_number DESC LIMIT 1) h ON true),
             upd AS (
                 UPDATE dalp_indexed.balances b SET balance = l.balance, block_number = l.block_number
                   FROM latest l
                  WHERE l.balance IS NOT NULL AND b.chain_id = $1 AND b.token = l.token AND b.account = l.account)
             DELETE FROM dalp_indexed.balances b USING latest l
              WHERE l.balance IS NULL AND b.chain_id = $1 AND b.token = l.token AND b.account = l.account",
            &[&chain_id, &tokens.unwrap_or_default(), &accounts.unwrap_or_default()],
        )
        .await?;
        for table in ["supply_history", "role_events"] {
            tx.typed_execute(
                &format!(
                    "DELETE FROM dalp_indexed.{table} WHERE chain_id = $1 AND block_number > $2"
                ),
                &[&chain_id, &fork],
            )
            .await?;
        }
        tx.typed_execute(
            "DELETE FROM dalp_indexed.blocks WHERE chain_id = $1 AND number > $2",
            &[&chain_id, &fork],
        )
        .await?;
        // The checkpoint moves to the fork block (or goes, if nothing below it is indexed).
        let fork_hash = tx
            .typed_query_opt(
                "SELECT hash FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                &[&chain_id, &fork],
            )
            .await?;
        match fork_hash {
            Some(r) => {
                let h: Vec<u8> = r.get(0);
                tx.typed_execute(
                    "UPDATE dalp_indexed.checkpoints SET block_number = $2, block_hash = $3,
                            finalized_number = least(finalized_number, $2), updated_at = now()
                      WHERE chain_id = $1",
                    &[&chain_id, &fork, &h],
                )
                .await?;
            }
            None => {
                tx.typed_execute(
                    "DELETE FROM dalp_indexed.checkpoints WHERE chain_id = $1",
                    &[&chain_id],
                )
                .await?;
            }
        }
        Ok(())
    }
}
