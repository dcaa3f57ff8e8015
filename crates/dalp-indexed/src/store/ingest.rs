//! Ingest: a batch of blocks, their logs and the balance ledger in one transaction (binary COPY), with the monthly partitions they need.

use super::*;

impl IndexedStore {
    /// Makes sure the partitions of `months` ([`month_key`]s) exist (cached per month).
    pub(super) async fn ensure_partitions(
        &self,
        tx: &Transaction<'_>,
        months: &[i32],
    ) -> Result<(), IndexError> {
        let missing: Vec<i32> = {
            let known = self.months.lock().expect("months lock");
            months
                .iter()
                .copied()
                .filter(|m| !known.contains(m))
                .collect()
        };
        for m in missing {
            let start = month_start(m);
            for table in PARTITIONED {
                tx.typed_execute(
                    "SELECT dalp_indexed.ensure_partitions($1, $2, $3)",
                    &[&table, &start, &start],
                )
                .await?;
            }
        }
        // Remembered by `remember_months` once the transaction commits: a rolled-back
        // transaction takes its partitions with it.
        Ok(())
    }

    pub(super) fn remember_months(&self, months: &[i32]) {
        self.months
            .lock()
            .expect("months lock")
            .extend(months.iter().copied());
    }

    /// Forgets which partitions exist (after the partition manager dropped some).
    pub fn forget_partitions(&self) {
        self.months.lock().expect("months lock").clear();
    }

    /// Ingests a batch of consecutive blocks (see the module docs). `head` is the newest
    /// block the sender has seen on the chain, for lag reporting.
    #[tracing::instrument(target = "dalp_store", name = "indexed.ingest", skip_all)]
    pub async fn ingest(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        blocks: &[Block],
        head: Option<i64>,
    ) -> Result<IngestOutcome, IndexError> {
        let result = self.ingest_once(ctx, chain_id, blocks, head).await;
        if let Err(IndexError::Db(e)) = &result {
            // The partition manager dropped a month we remembered: forget, and let the
            // caller's retry create it again.
            if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
                && e.as_db_error()
                    .is_some_and(|d| d.message().contains("no partition"))
            {
                self.forget_partitions();
            }
        }
        result
    }

    pub(super) async fn ingest_once(
        &self,
        ctx: &RequestContext,
        chain_id: i64,
        blocks: &[Block],
        head: Option<i64>,
    ) -> Result<IngestOutcome, IndexError> {
        if blocks.is_empty() {
            return Err(Invalid::new("blocks", "a batch needs at least one block").into());
        }
        check_chain(blocks)?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("indexed.ingest").await?;
        let (finality_depth, cp) = lock_chain(&tx, chain_id).await?;
        let first = blocks[0].number;
        let last = blocks[blocks.len() - 1].number;
        let mut outcome = IngestOutcome::default();
        let mut start = 0usize; // index of the first block to write
        if let Some((n, ref cp_hash, finalized)) = cp {
            if first > n + 1 {
                return Err(IndexError::Gap {
                    chain: chain_id,
                    indexed: n,
                    got: first,
                });
            }
            let lowest: Option<i64> = tx
                .typed_query_one(
                    "SELECT min(number) FROM dalp_indexed.blocks WHERE chain_id = $1",
                    &[&chain_id],
                )
                .await?
                .get(0);
            if let Some(lowest) = lowest.filter(|l| first < *l) {
                return Err(Invalid::new(
                    "number",
                    format!("chain {chain_id} is indexed from block {lowest}; a batch cannot start below it (at {first})"),
                )
                .into());
            }
            // The stored parent of the batch must be the batch's parent.
            let parent = if first == n + 1 {
                Some((cp_hash.clone(), None))
            } else {
                tx.typed_query_opt(
                    "SELECT hash, block_time FROM dalp_indexed.blocks WHERE chain_id = $1 AND number = $2",
                    &[&chain_id, &(first - 1)],
                )
                .await?
                .map(|r| (r.get::<_, Vec<u8>>(0), Some(r.get::<_, DateTime<Utc>>(1))))
            };
            if let Some((hash, _)) = &parent {
                if hash.as_slice() != &blocks[0].parent_hash[..] {
                    return Err(IndexError::ParentMismatch { number: first });
                }
            }
            // Compare the overlap with what is stored; the first difference is the fork.
            let stored: HashMap<i64, Vec<u8>> = tx
                .typed_query(
                    "SELECT number, hash FROM dalp_indexed.blocks WHERE chain_id = $1 AND number BETWEEN $2 AND $3",
                    &[&chain_id, &first, &n.min(last)],
                )
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut fork = None;
            for (i, b) in blocks.iter().enumerate().take_while(|(_, b)| b.number <= n) {
                match stored.get(&b.number) {
                    Some(h) if h.as_slice() == &b.hash[..] => {
                        outcome.skipped += 1;
                        start = i + 1;
                    }
                    _ => {
                        fork = Some(b.number - 1);
                        start = i;
                        break;
                    }
                }
            }
            if let Some(fork) = fork {
                let depth = reorg_depth(fork, n, finalized, finality_depth)?;
                self.rollback(&tx, chain_id, fork).await?;
                outcome.reorg = Some(Reorg { fork, depth });
            }
            if let Some((_, Some(parent_time))) = parent {
                if blocks[0].time < parent_time {
                    return Err(Invalid::new(
                        "timestamp",
                        format!("blocks[0]: block {first} is older than its stored parent"),
                    )
                    .into());
                }
            }
        }
        let new = &blocks[start..];
        // The months the new blocks fall in, not every month between the first and the
        // last: a dev chain's genesis at time 0 (or years before block 1) needs one
        // partition for it, not one per month since.
        let mut months: Vec<i32> = new.iter().map(|b| month_key(b.time)).collect();
        months.sort_unstable();
        months.dedup();
        if !new.is_empty() {
            self.ensure_partitions(&tx, &months).await?;
            let written = self.write_blocks(&tx, chain_id, new).await?;
            outcome.logs = written.0;
            outcome.transfers = written.1;
            outcome.applied = new.len();
        }
        let tip = blocks.last().expect("non-empty");
        if !new.is_empty() {
            tx.typed_execute(
                "INSERT INTO dalp_indexed.checkpoints AS c
                     (chain_id, block_number, block_hash, finalized_number, head_number, updated_at)
                 VALUES ($1, $2, $3, greatest($2::int8 - $4::int8, 0), $5, now())
                 ON CONFLICT (chain_id) DO UPDATE SET
                     block_number = EXCLUDED.block_number,
                     block_hash = EXCLUDED.block_hash,
                     finalized_number = least(greatest(c.finalized_number, EXCLUDED.finalized_number), EXCLUDED.block_number),
                     head_number = greatest(coalesce(EXCLUDED.head_number, c.head_number), EXCLUDED.block_number),
                     updated_at = now()",
                &[&chain_id, &tip.number, &tip.hash, &i64::from(finality_depth), &head],
            )
            .await?;
            outcome.checkpoint = tip.number;
        } else {
            // Everything was already stored: nothing changes but the reported head.
            if let Some(h) = head {
                tx.typed_execute(
                    "UPDATE dalp_indexed.checkpoints SET head_number = $2
                      WHERE chain_id = $1 AND coalesce(head_number, -1) < $2",
                    &[&chain_id, &h],
                )
                .await?;
            }
            outcome.checkpoint = cp.as_ref().map(|c| c.0).unwrap_or(tip.number);
        }
        if outcome.applied > 0 || outcome.reorg.is_some() {
            tx.record(
                &ctx.event("indexed.blocks.ingest", "chain")
                    .resource(chain_id)
                    .details(json!({
                        "from": first, "to": last, "applied": outcome.applied,
                        "skipped": outcome.skipped, "logs": outcome.logs,
                        "transfers": outcome.transfers, "reorg": outcome.reorg,
                    })),
            )
            .await?;
            tx.commit().await?;
        } else {
            tx.commit_unaudited("only the node's head height moved; no block was applied")
                .await?;
        }
        self.remember_months(&months);
        if let Some(r) = &outcome.reorg {
            tracing::warn!(
                chain_id,
                fork = r.fork,
                depth = r.depth,
                "reorg rolled back"
            );
        }
        Ok(outcome)
    }

    /// Writes `blocks` (already checked to extend the stored chain). Returns (logs, transfers).
    pub(super) async fn write_blocks(
        &self,
        tx: &Transaction<'_>,
        chain_id: i64,
        blocks: &[Block],
    ) -> Result<(usize, usize), IndexError> {
        let mut logs = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            for (j, l) in b.logs.iter().enumerate() {
                let decoded = decode(l, &format!("blocks[{i}].logs[{j}]"))?;
                logs.push(LogRow {
                    number: b.number,
                    time: b.time,
                    log: l,
                    decoded,
                });
            }
        }
        let ledger = self.ledger(tx, chain_id, &logs).await?;

        let counts: Vec<(i32, i32)> = blocks
            .iter()
            .map(|b| (b.transactions.len() as i32, b.logs.len() as i32))
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.blocks (chain_id, number, hash, parent_hash, block_time, tx_count, log_count) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::BYTEA, Type::BYTEA, Type::TIMESTAMPTZ, Type::INT4, Type::INT4],
            blocks.iter().zip(&counts),
            |(b, (t, l))| {
                vec![&chain_id, &b.number, &b.hash, &b.parent_hash, &b.time, t, l]
            },
        )
        .await?;

        let txs: Vec<_> = blocks
            .iter()
            .flat_map(|b| b.transactions.iter().map(move |t| (b, t, t.to)))
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.transactions (chain_id, block_number, block_time, tx_index, hash, from_address, to_address, status) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::INT4, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::INT2],
            txs.iter(),
            |(b, t, to)| {
                vec![&chain_id, &b.number, &b.time, &t.index, &t.hash, &t.from, to, &t.status]
            },
        )
        .await?;

        let log_cols: Vec<_> = logs
            .iter()
            .map(|r| {
                let topic = |k: usize| r.log.topics.get(k).map(|t| &t[..]);
                (
                    [topic(0), topic(1), topic(2), topic(3)],
                    r.decoded.as_ref().map(|d| d.name()),
                    r.decoded.as_ref().map(|d| d.to_json()),
                )
            })
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.logs (chain_id, block_number, block_time, log_index, tx_hash, tx_index, address, topic0, topic1, topic2, topic3, data, event, decoded) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::INT4, Type::BYTEA, Type::INT4, Type::BYTEA,
              Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::TEXT, Type::JSONB],
            logs.iter().zip(&log_cols),
            |(r, (topics, event, decoded))| {
                vec![&chain_id, &r.number, &r.time, &r.log.log_index, &r.log.tx_hash, &r.log.tx_index,
                     &r.log.address, &topics[0], &topics[1], &topics[2], &topics[3], &r.log.data, event, decoded]
            },
        )
        .await?;

        let transfers: Vec<_> = logs
            .iter()
            .filter_map(|r| match &r.decoded {
                Some(Decoded::Transfer(t)) => Some((r, t, Numeric(BigInt::from(t.value.clone())))),
                _ => None,
            })
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.transfers (chain_id, block_number, block_time, log_index, tx_hash, token, from_address, to_address, value) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ, Type::INT4, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::NUMERIC],
            transfers.iter(),
            |(r, t, v)| {
                vec![&chain_id, &r.number, &r.time, &r.log.log_index, &r.log.tx_hash,
                     &t.token, &t.from, &t.to, v]
            },
        )
        .await?;

        let roles: Vec<_> = logs
            .iter()
            .filter_map(|r| match &r.decoded {
                Some(Decoded::Role(c)) => Some((r, c)),
                _ => None,
            })
            .collect();
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.role_events (chain_id, block_number, log_index, contract, role, account, sender, granted) FROM STDIN BINARY",
            &[Type::INT8, Type::INT8, Type::INT4, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BYTEA, Type::BOOL],
            roles.iter(),
            |(r, c)| {
                vec![&chain_id, &r.number, &r.log.log_index, &c.contract, &c.role,
                     &c.account, &c.sender, &c.granted]
            },
        )
        .await?;

        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.balance_history (chain_id, token, account, block_number, block_time, balance) FROM STDIN BINARY",
            &[Type::INT8, Type::BYTEA, Type::BYTEA, Type::INT8, Type::TIMESTAMPTZ, Type::NUMERIC],
            ledger.history.iter(),
            |(token, account, n, t, v)| vec![&chain_id, token, account, n, t, v],
        )
        .await?;
        copy(
            tx,
            self.mode,
            "COPY dalp_indexed.supply_history (chain_id, token, block_number, total_supply) FROM STDIN BINARY",
            &[Type::INT8, Type::BYTEA, Type::INT8, Type::NUMERIC],
            ledger.supply.iter(),
            |(token, n, v)| vec![&chain_id, token, n, v],
        )
        .await?;

        if !ledger.balances.is_empty() {
            let mut tokens = Vec::with_capacity(ledger.balances.len());
            let mut accounts = Vec::with_capacity(ledger.balances.len());
            let mut values = Vec::with_capacity(ledger.balances.len());
            let mut numbers = Vec::with_capacity(ledger.balances.len());
            for ((t, a), (v, n)) in &ledger.balances {
                tokens.push(&t[..]);
                accounts.push(&a[..]);
                values.push(v.to_string());
                numbers.push(*n);
            }
            tx.typed_execute(
                "INSERT INTO dalp_indexed.balances (chain_id, token, account, balance, block_number)
                 SELECT $1, t, a, v::numeric, n FROM unnest($2::bytea[], $3::bytea[], $4::text[], $5::int8[]) AS u(t, a, v, n)
                 ON CONFLICT (chain_id, token, account)
                 DO UPDATE SET balance = EXCLUDED.balance, block_number = EXCLUDED.block_number",
                &[&chain_id, &tokens, &accounts, &values, &numbers],
            )
            .await?;
        }
        Ok((logs.len(), transfers.len()))
    }

    /// Runs the batch's transfers over the stored balances and supply.
    pub(super) async fn ledger(
        &self,
        tx: &Transaction<'_>,
        chain_id: i64,
        logs: &[LogRow<'_>],
    ) -> Result<Ledger, IndexError> {
        let transfers: Vec<(i64, DateTime<Utc>, &crate::decode::Transfer)> = logs
            .iter()
            .filter_map(|r| match &r.decoded {
                Some(Decoded::Transfer(t)) => Some((r.number, r.time, t)),
                _ => None,
            })
            .collect();
        let mut ledger = Ledger::default();
        if transfers.is_empty() {
            return Ok(ledger);
        }
        let mut pairs: HashSet<(Address, Address)> = HashSet::new();
        let mut supply_tokens: HashSet<Address> = HashSet::new();
        for (_, _, t) in &transfers {
            for account in [t.from, t.to] {
                if account == ZERO {
                    supply_tokens.insert(t.token);
                } else {
                    pairs.insert((t.token, account));
                }
            }
        }
        let (tokens, accounts): (Vec<&[u8]>, Vec<&[u8]>) =
            pairs.iter().map(|(t, a)| (&t[..], &a[..])).unzip();
        for row in tx
            .typed_query(
                "SELECT b.token, b.account, b.balance::text
                   FROM unnest($2::bytea[], $3::bytea[]) AS p(token, account)
                   JOIN dalp_indexed.balances b
                     ON b.chain_id = $1 AND b.token = p.token AND b.account = p.account",
                &[&chain_id, &tokens, &accounts],
            )
            .await?
        {
            let key = (to20(row.get(0)), to20(row.get(1)));
            ledger.balances.insert(key, (parse_big(row.get(2)), 0));
        }
        let supply_list: Vec<&[u8]> = supply_tokens.iter().map(|t| &t[..]).collect();
        let mut supply: HashMap<Address, BigInt> = HashMap::new();
        for row in tx
            .typed_query(
                "SELECT DISTINCT ON (token) token, total_supply::text FROM dalp_indexed.supply_history
                  WHERE chain_id = $1 AND token = ANY($2) ORDER BY token, block_number DESC",
                &[&chain_id, &supply_list],
            )
            .await?
        {
            supply.insert(to20(row.get(0)), parse_big(row.get(1)));
        }

        // Per block: apply its transfers, then record each touched pair's balance once.
        let mut touched: Vec<(Address, Address)> = Vec::new();
        let mut touched_supply: Vec<Address> = Vec::new();
        let mut i = 0;
        while i < transfers.len() {
            let (number, time, _) = transfers[i];
            touched.clear();
            touched_supply.clear();
            while i < transfers.len() && transfers[i].0 == number {
                let t = transfers[i].2;
                let value = BigInt::from_biguint(Sign::Plus, t.value.clone());
                for (account, signed) in [(t.from, -value.clone()), (t.to, value.clone())] {
                    if account == ZERO {
                        // A mint (from zero) adds to supply, a burn (to zero) removes.
                        let s = supply.entry(t.token).or_default();
                        *s -= &signed;
                        if !touched_supply.contains(&t.token) {
                            touched_supply.push(t.token);
                        }
                        continue;
                    }
                    let key = (t.token, account);
                    let entry = ledger.balances.entry(key).or_insert((BigInt::default(), 0));
                    entry.0 += &signed;
                    entry.1 = number;
                    if !touched.contains(&key) {
                        touched.push(key);
                    }
                }
                i += 1;
            }
            for key in &touched {
                let v = ledger.balances[key].0.clone();
                ledger
                    .history
                    .push((key.0, key.1, number, time, Numeric(v)));
            }
            for token in &touched_supply {
                ledger
                    .supply
                    .push((*token, number, Numeric(supply[token].clone())));
            }
        }
        Ok(ledger)
    }
}
