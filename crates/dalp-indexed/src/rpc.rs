//! A minimal EVM JSON-RPC client: the four calls the follower needs, with JSON-RPC batches
//! so a range of blocks is one HTTP round trip.

use std::time::Duration;

use serde_json::{json, Value};

use crate::types::{hex0x, Address, BlockInput, LogInput, TxInput};

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot reach the node: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("node answered HTTP {status}")]
    Http {
        status: u16,
        /// From `Retry-After` on 429/503.
        retry_after: Option<Duration>,
    },
    #[error("node error {code}: {message}")]
    Rpc { code: i64, message: String },
    #[error("malformed node answer: {0}")]
    Malformed(String),
    /// The node announced a head it does not serve yet (normal behind load balancers and
    /// right after a block is mined): retried.
    #[error("the node has no block {0} yet (its head was announced before the block is served)")]
    NotYetServed(u64),
    /// Two reads of one block disagreed on its hash (a reorg in between): fetched again.
    #[error("the node switched branches while block {0} was read; fetching again")]
    BranchChanged(u64),
}

impl RpcError {
    /// The node refuses a log query as too large (providers word this differently).
    pub fn is_range_too_large(&self) -> bool {
        match self {
            RpcError::Rpc { code, message } => {
                let m = message.to_ascii_lowercase();
                *code == -32005
                    || m.contains("too many")
                    || m.contains("limit exceeded")
                    || m.contains("range")
                    || m.contains("more than")
            }
            _ => false,
        }
    }

    /// The node does not have the method (JSON-RPC "method not found", or a provider's
    /// wording of it).
    pub fn is_unsupported_method(&self) -> bool {
        match self {
            RpcError::Rpc { code, message } => {
                let m = message.to_ascii_lowercase();
                *code == -32601
                    || (m.contains("method") && (m.contains("not") || m.contains("unsupported")))
            }
            _ => false,
        }
    }

    /// How long the node asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RpcError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcClient {
    http: reqwest::Client,
    url: String,
}

fn malformed(what: impl Into<String>) -> RpcError {
    RpcError::Malformed(what.into())
}

fn quantity(v: &Value, what: &str) -> Result<u64, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| malformed(format!("{what} is not a hex quantity")))?;
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| malformed(format!("{what} {s:?} is not a hex quantity")))
}

fn string(v: &Value, what: &str) -> Result<String, RpcError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| malformed(format!("{what} is missing")))
}

/// One log object (of `eth_getLogs` or a receipt).
fn log_input(l: &Value) -> Result<LogInput, RpcError> {
    let topics = l["topics"]
        .as_array()
        .ok_or_else(|| malformed("log without topics"))?
        .iter()
        .map(|t| string(t, "topic"))
        .collect::<Result<_, _>>()?;
    Ok(LogInput {
        tx_hash: string(&l["transactionHash"], "log transactionHash")?,
        tx_index: quantity(&l["transactionIndex"], "log transactionIndex")? as u32,
        log_index: quantity(&l["logIndex"], "logIndex")? as u32,
        address: string(&l["address"], "log address")?,
        topics,
        data: string(&l["data"], "log data")?,
    })
}

impl RpcClient {
    pub fn new(url: &str) -> Result<RpcClient, RpcError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(RpcClient {
            http,
            url: url.to_string(),
        })
    }

    async fn post(&self, body: &Value) -> Result<Value, RpcError> {
        let resp = self.http.post(&self.url).json(body).send().await?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(RpcError::Http {
                status: status.as_u16(),
                retry_after,
            });
        }
        Ok(resp.json().await?)
    }

    fn result(answer: Value) -> Result<Value, RpcError> {
        if let Some(e) = answer.get("error") {
            return Err(RpcError::Rpc {
                code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| malformed("answer has neither result nor error"))
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let answer = self
            .post(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            .await?;
        Self::result(answer)
    }

    /// Several calls in one JSON-RPC batch; results in call order.
    pub async fn batch(&self, calls: &[(&str, Value)]) -> Result<Vec<Value>, RpcError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let body: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, (m, p))| json!({"jsonrpc": "2.0", "id": i, "method": m, "params": p}))
            .collect();
        let answer = self.post(&Value::Array(body)).await?;
        let Value::Array(items) = answer else {
            // A node that does not batch answers with one error object.
            return Err(Self::result(answer)
                .err()
                .unwrap_or_else(|| malformed("batch answer is not an array")));
        };
        let mut out = vec![Value::Null; calls.len()];
        for item in items {
            let id = item
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| malformed("batch answer without id"))? as usize;
            if id >= out.len() {
                return Err(malformed("batch answer with an unknown id"));
            }
            out[id] = Self::result(item)?;
        }
        Ok(out)
    }

    pub async fn chain_id(&self) -> Result<u64, RpcError> {
        quantity(&self.call("eth_chainId", json!([])).await?, "eth_chainId")
    }

    pub async fn block_number(&self) -> Result<u64, RpcError> {
        quantity(
            &self.call("eth_blockNumber", json!([])).await?,
            "eth_blockNumber",
        )
    }

    /// One round trip per poll: the node's chain id, its head, and its hash of block `at`
    /// (if it has that block).
    pub async fn poll(&self, at: Option<u64>) -> Result<(u64, u64, Option<String>), RpcError> {
        let mut calls: Vec<(&str, Value)> =
            vec![("eth_chainId", json!([])), ("eth_blockNumber", json!([]))];
        if let Some(n) = at {
            calls.push(("eth_getBlockByNumber", json!([format!("0x{n:x}"), false])));
        }
        let answers = self.batch(&calls).await?;
        let chain = quantity(&answers[0], "eth_chainId")?;
        let head = quantity(&answers[1], "eth_blockNumber")?;
        let hash = match answers.get(2) {
            Some(b) if !b.is_null() => Some(string(&b["hash"], "block hash")?),
            _ => None,
        };
        Ok((chain, head, hash))
    }

    /// The hash of block `n`, if the node has it.
    pub async fn block_hash(&self, n: u64) -> Result<Option<String>, RpcError> {
        let b = self
            .call("eth_getBlockByNumber", json!([format!("0x{n:x}"), false]))
            .await?;
        if b.is_null() {
            return Ok(None);
        }
        Ok(Some(string(&b["hash"], "block hash")?))
    }

    /// Blocks `from..=to` with full transaction objects, no logs yet.
    pub async fn blocks(&self, from: u64, to: u64) -> Result<Vec<BlockInput>, RpcError> {
        let calls: Vec<(&str, Value)> = (from..=to)
            .map(|n| ("eth_getBlockByNumber", json!([format!("0x{n:x}"), true])))
            .collect();
        let answers = self.batch(&calls).await?;
        let mut out = Vec::with_capacity(answers.len());
        for (n, b) in (from..=to).zip(answers) {
            if b.is_null() {
                return Err(RpcError::NotYetServed(n));
            }
            let number = quantity(&b["number"], "block number")?;
            if number != n {
                return Err(malformed(format!("asked for block {n}, got {number}")));
            }
            let mut transactions = Vec::new();
            for t in b["transactions"].as_array().into_iter().flatten() {
                transactions.push(TxInput {
                    hash: string(&t["hash"], "transaction hash")?,
                    index: quantity(&t["transactionIndex"], "transactionIndex")? as u32,
                    from: string(&t["from"], "transaction from")?,
                    to: t["to"].as_str().map(str::to_string),
                    status: None,
                });
            }
            out.push(BlockInput {
                number,
                hash: string(&b["hash"], "block hash")?,
                parent_hash: string(&b["parentHash"], "parentHash")?,
                timestamp: quantity(&b["timestamp"], "timestamp")? as i64,
                transactions,
                logs: Vec::new(),
            });
        }
        Ok(out)
    }

    /// Blocks `from..=to` with every transaction (from, to, status) and every log, from
    /// block headers and `eth_getBlockReceipts`, in one JSON-RPC batch. Much cheaper for a
    /// node than full transaction objects, and it needs no receipt lookups afterwards.
    /// A receipt whose block hash is not the header's means the node switched branches
    /// between the two reads ([`RpcError::BranchChanged`]).
    pub async fn blocks_with_receipts(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<BlockInput>, RpcError> {
        let mut calls: Vec<(&str, Value)> = Vec::with_capacity(2 * (to - from + 1) as usize);
        for n in from..=to {
            let tag = format!("0x{n:x}");
            calls.push(("eth_getBlockByNumber", json!([tag, false])));
            calls.push(("eth_getBlockReceipts", json!([tag])));
        }
        let answers = self.batch(&calls).await?;
        let mut out = Vec::with_capacity((to - from + 1) as usize);
        for (n, pair) in (from..=to).zip(answers.chunks(2)) {
            let (b, receipts) = (&pair[0], &pair[1]);
            if b.is_null() || receipts.is_null() {
                return Err(RpcError::NotYetServed(n));
            }
            let number = quantity(&b["number"], "block number")?;
            if number != n {
                return Err(malformed(format!("asked for block {n}, got {number}")));
            }
            let hash = string(&b["hash"], "block hash")?;
            let mut transactions = Vec::new();
            let mut logs = Vec::new();
            for r in receipts
                .as_array()
                .ok_or_else(|| malformed("eth_getBlockReceipts answer is not an array"))?
            {
                if !string(&r["blockHash"], "receipt blockHash")?.eq_ignore_ascii_case(&hash) {
                    return Err(RpcError::BranchChanged(n));
                }
                let tx_hash = string(&r["transactionHash"], "receipt transactionHash")?;
                let index = quantity(&r["transactionIndex"], "receipt transactionIndex")? as u32;
                transactions.push(TxInput {
                    hash: tx_hash,
                    index,
                    from: string(&r["from"], "receipt from")?,
                    to: r["to"].as_str().map(str::to_string),
                    // Pre-Byzantium receipts carry a state root instead.
                    status: quantity(&r["status"], "status").ok().map(|s| s as u8),
                });
                for l in r["logs"].as_array().into_iter().flatten() {
                    if l["removed"].as_bool() == Some(true) {
                        continue;
                    }
                    logs.push(log_input(l)?);
                }
            }
            transactions.sort_by_key(|t| t.index);
            out.push(BlockInput {
                number,
                hash,
                parent_hash: string(&b["parentHash"], "parentHash")?,
                timestamp: quantity(&b["timestamp"], "timestamp")? as i64,
                transactions,
                logs,
            });
        }
        Ok(out)
    }

    /// Logs of blocks `from..=to`, of `contracts` only when given, each with its block hash.
    pub async fn logs(
        &self,
        from: u64,
        to: u64,
        contracts: &[Address],
    ) -> Result<Vec<(String, u64, LogInput)>, RpcError> {
        let mut filter =
            json!({"fromBlock": format!("0x{from:x}"), "toBlock": format!("0x{to:x}")});
        if !contracts.is_empty() {
            filter["address"] = Value::Array(contracts.iter().map(|a| json!(hex0x(a))).collect());
        }
        let answer = self.call("eth_getLogs", json!([filter])).await?;
        let mut out = Vec::new();
        for l in answer
            .as_array()
            .ok_or_else(|| malformed("eth_getLogs answer is not an array"))?
        {
            if l["removed"].as_bool() == Some(true) {
                continue;
            }
            out.push((
                string(&l["blockHash"], "log blockHash")?,
                quantity(&l["blockNumber"], "log blockNumber")?,
                log_input(l)?,
            ));
        }
        Ok(out)
    }

    /// Receipt status (1 success, 0 reverted) of each transaction, in order.
    pub async fn statuses(&self, hashes: &[String]) -> Result<Vec<Option<u8>>, RpcError> {
        let calls: Vec<(&str, Value)> = hashes
            .iter()
            .map(|h| ("eth_getTransactionReceipt", json!([h])))
            .collect();
        Ok(self
            .batch(&calls)
            .await?
            .iter()
            .map(|r| quantity(&r["status"], "status").ok().map(|s| s as u8))
            .collect())
    }
}
