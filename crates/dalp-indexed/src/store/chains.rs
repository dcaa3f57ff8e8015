//! Chains: registration, sync status and divergence.

use super::*;

impl IndexedStore {
    /// Registers a chain, or confirms it is registered with the same settings.
    #[tracing::instrument(target = "dalp_store", name = "indexed.register_chain", skip_all)]
    pub async fn register_chain(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        name: &str,
        finality_depth: i32,
    ) -> Result<Chain, IndexError> {
        dalp_types::ChainId::parse(chain_id).map_err(|e| e.for_field("chain_id"))?;
        let name = dalp_types::parse_text("name", name, 100)?;
        let name = name.as_str();
        if !(0..=100_000).contains(&finality_depth) {
            return Err(Invalid::new("finality_depth", "must be between 0 and 100000").into());
        }
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.register_chain").await?;
        let inserted = tx
            .typed_execute(
                "INSERT INTO dalp_indexed.chains (chain_id, name, finality_depth) VALUES ($1, $2, $3)
                 ON CONFLICT (chain_id) DO NOTHING",
                &[&chain_id, &name, &finality_depth],
            )
            .await?;
        let chain = Chain {
            chain_id,
            name: name.to_string(),
            finality_depth,
        };
        if inserted == 0 {
            let existing = self.chain_in(&**tx, chain_id).await?;
            if existing != chain {
                return Err(IndexError::ChainConflict(chain_id));
            }
            return Ok(existing);
        }
        tx.record(
            &ctx.event("indexed.chain.register", "chain")
                .resource(chain_id)
                .details(json!({ "name": name, "finality_depth": finality_depth })),
        )
        .await?;
        tx.commit().await?;
        Ok(chain)
    }

    /// Refuses `block` when the index has not reached it (a read "at" it would answer with
    /// the state of an older block).
    pub(super) async fn indexed_up_to<C: GenericClient>(
        &self,
        client: &C,
        chain_id: i64,
        block: i64,
    ) -> Result<(), IndexError> {
        let checkpoint: Option<i64> = client
            .query_typed(
                "SELECT block_number FROM dalp_indexed.checkpoints WHERE chain_id = $1",
                &[(&chain_id, Type::INT8)],
            )
            .await?
            .first()
            .map(|r| r.get(0));
        if checkpoint.is_none_or(|c| block > c) {
            return Err(IndexError::NotIndexedYet {
                chain: chain_id,
                block,
                checkpoint,
            });
        }
        Ok(())
    }

    pub(super) async fn chain_in<C: GenericClient>(
        &self,
        client: &C,
        chain_id: i64,
    ) -> Result<Chain, IndexError> {
        let row = client
            .query_typed(
                "SELECT name, finality_depth FROM dalp_indexed.chains WHERE chain_id = $1",
                &[(&chain_id, Type::INT8)],
            )
            .await?
            .into_iter()
            .next()
            .ok_or(IndexError::UnknownChain(chain_id))?;
        Ok(Chain {
            chain_id,
            name: row.get(0),
            finality_depth: row.get(1),
        })
    }

    #[tracing::instrument(target = "dalp_store", name = "indexed.chains", skip_all)]
    pub async fn chains(&self) -> Result<Vec<Chain>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        Ok(client
            .query_typed(
                "SELECT chain_id, name, finality_depth FROM dalp_indexed.chains ORDER BY chain_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| Chain {
                chain_id: r.get(0),
                name: r.get(1),
                finality_depth: r.get(2),
            })
            .collect())
    }

    /// The stored hash of block `number`, if it is indexed.
    #[tracing::instrument(target = "dalp_store", name = "indexed.block_hash", skip_all)]
    pub async fn block_hash(&self, chain_id: i64, number: i64) -> Result<Option<Hash>, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        let row = client
            .query_typed(
                "SELECT hash FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                &[(&chain_id, Type::INT8), (&number, Type::INT8)],
            )
            .await?;
        Ok(row.first().map(|r| {
            let h: Vec<u8> = r.get(0);
            Hash::try_from(h.as_slice()).expect("CHECK length(hash) = 32")
        }))
    }

    #[tracing::instrument(target = "dalp_store", name = "indexed.status", skip_all)]
    pub async fn status(&self, chain_id: i64) -> Result<SyncStatus, IndexError> {
        let client = dalp_db::pool::checkout(&self.pool, "indexed").await?;
        // One round trip: the chain row (with its divergence) and its checkpoint, if any.
        let r = client
            .query_typed(
                "SELECT c.name, c.finality_depth, c.diverged_at, c.diverged_block, c.diverged_reason,
                        p.block_number, p.block_hash, p.finalized_number, p.head_number, p.updated_at
                   FROM dalp_indexed.chains c
                   LEFT JOIN dalp_indexed.checkpoints p ON p.chain_id = c.chain_id
                  WHERE c.chain_id = $1",
                &[(&chain_id, Type::INT8)],
            )
            .await?
            .into_iter()
            .next()
            .ok_or(IndexError::UnknownChain(chain_id))?;
        let diverged = r
            .get::<_, Option<DateTime<Utc>>>(2)
            .map(|since| Divergence {
                since,
                block: r.get::<_, Option<i64>>(3).unwrap_or(-1),
                reason: r.get(4),
                next: divergence_next_step(chain_id),
            });
        let checkpoint: Option<i64> = r.get(5);
        let head: Option<i64> = r.get(8);
        Ok(SyncStatus {
            chain_id,
            name: r.get(0),
            finality_depth: r.get(1),
            checkpoint,
            checkpoint_hash: r.get::<_, Option<&[u8]>>(6).map(hex0x),
            finalized: r.get(7),
            head,
            lag: head.zip(checkpoint).map(|(h, c)| (h - c).max(0)),
            updated_at: r.get(9),
            state: if diverged.is_some() {
                "diverged"
            } else {
                "following"
            },
            diverged,
        })
    }

    /// Marks the chain diverged (see [`IndexError::Diverged`]); the first finding stays.
    #[tracing::instrument(target = "dalp_store", name = "indexed.mark_diverged", skip_all)]
    pub async fn mark_diverged(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        block: i64,
        reason: &str,
    ) -> Result<(), IndexError> {
        let reason: String = reason.chars().filter(|c| *c != '\0').take(1000).collect();
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.mark_diverged").await?;
        let n = tx
            .typed_execute(
                "UPDATE dalp_indexed.chains SET diverged_at = now(), diverged_block = $2, diverged_reason = $3
                  WHERE chain_id = $1 AND diverged_at IS NULL",
                &[&chain_id, &block, &reason],
            )
            .await?;
        if n == 0 {
            tx.commit_unaudited("already marked diverged: nothing changed")
                .await?;
            return Ok(());
        }
        tx.record(
            &ctx.event("indexed.chain.diverged", "chain")
                .resource(chain_id)
                .outcome(dalp_audit::Outcome::Error)
                .details(json!({ "block": block, "reason": reason })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
