//! Reconciliation: the index's supply and balances are derived from Transfer events, so a
//! token that moves value without them (a rebasing token, a buggy or malicious contract, a
//! decoding gap) would drift unnoticed. A bounded round compares, at the finalized block,
//! the indexed supply with the contract's `totalSupply()` and a random sample of indexed
//! balances with `balanceOf()` (`eth_call` at that block), and records the result per token
//! (`dalp_indexed.reconciliations`): `/metrics`, `dalp doctor` and `dalp index status`
//! name the drifting token and block.

use serde::Serialize;
use serde_json::{json, Value};

use crate::rpc::{RpcClient, RpcError};
use crate::store::{IndexError, IndexedStore};
use crate::types::hex0x;

/// `totalSupply()`.
const TOTAL_SUPPLY: &str = "0x18160ddd";
/// `balanceOf(address)`.
const BALANCE_OF: &str = "0x70a08231";

#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Balances compared per token (a random sample of its holders).
    pub sample: usize,
    /// Tokens per round; the least recently checked go first.
    pub max_tokens: usize,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            sample: 20,
            max_tokens: 50,
        }
    }
}

/// One token's comparison.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenReconciliation {
    pub token: String,
    pub block: i64,
    pub indexed_supply: String,
    /// `None` when the contract has no `totalSupply()`.
    pub node_supply: Option<String>,
    pub balances_checked: usize,
    /// Accounts whose indexed balance differs from `balanceOf`.
    pub drifted_accounts: Vec<String>,
    pub in_agreement: bool,
    pub checked_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// An `eth_call` answer as a decimal number (`0x` — no code at that block — is 0).
fn word(v: &Value) -> Result<String, RpcError> {
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::Malformed("eth_call answer is not a string".into()))?;
    let digits = s.trim_start_matches("0x");
    if digits.is_empty() {
        return Ok("0".into());
    }
    // A uint256 is one 32-byte word; anything else is not an ERC-20 answer.
    if digits.len() != 64 {
        return Err(RpcError::Malformed(format!(
            "eth_call answer {s} is not one 32-byte word"
        )));
    }
    num_bigint::BigUint::parse_bytes(digits.as_bytes(), 16)
        .map(|n| n.to_string())
        .ok_or_else(|| RpcError::Malformed(format!("eth_call answer {s} is not hex")))
}

/// The parameters of `eth_call` of `data` on `to` at `block`.
fn call_params(to: &str, data: String, block: &str) -> Value {
    json!([{ "to": to, "data": data }, block])
}

/// One round over `chain_id`: up to `max_tokens` tokens, each compared at the finalized
/// block. Returns the comparisons made (also stored).
pub async fn reconcile(
    store: &IndexedStore,
    rpc: &RpcClient,
    chain_id: i64,
    opts: &ReconcileOptions,
) -> Result<Vec<TokenReconciliation>, ReconcileError> {
    let status = store.status(chain_id).await?;
    let Some(block) = status.finalized.filter(|_| status.checkpoint.is_some()) else {
        return Ok(Vec::new());
    };
    if status.is_diverged() {
        // The node is not on our chain: comparing with it would only add noise.
        return Ok(Vec::new());
    }
    let tag = format!("0x{block:x}");
    let mut out = Vec::new();
    for token in store
        .reconcile_candidates(chain_id, block, opts.max_tokens as i64)
        .await?
    {
        let to = hex0x(&token);
        let indexed_supply = store.supply_at(chain_id, &token, block).await?;
        let node_supply = match rpc
            .call("eth_call", call_params(&to, TOTAL_SUPPLY.into(), &tag))
            .await
        {
            Ok(v) => word(&v).ok(),
            // A revert: the contract has no totalSupply().
            Err(RpcError::Rpc { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let sample = store
            .sample_balances(chain_id, &token, block, opts.sample as i64)
            .await?;
        let calls: Vec<(&str, Value)> = sample
            .iter()
            .map(|(account, _)| {
                let data = format!("{BALANCE_OF}{:0>64}", hex::encode(account.0));
                ("eth_call", call_params(&to, data, &tag))
            })
            .collect();
        let (checked, drifted) = match rpc.batch(&calls).await {
            Ok(answers) => {
                let mut drifted = Vec::new();
                for ((account, indexed), answer) in sample.iter().zip(&answers) {
                    if word(answer).ok().as_deref() != Some(indexed.as_str()) {
                        drifted.push(*account);
                    }
                }
                (sample.len(), drifted)
            }
            // No balanceOf(): nothing to compare.
            Err(RpcError::Rpc { .. }) => (0, Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let supply_agrees = node_supply.as_ref().is_none_or(|s| *s == indexed_supply);
        let r = TokenReconciliation {
            token: to,
            block,
            in_agreement: supply_agrees && drifted.is_empty(),
            indexed_supply,
            node_supply,
            balances_checked: checked,
            drifted_accounts: drifted.iter().map(|a| hex0x(a)).collect(),
            checked_at: None,
        };
        store
            .record_reconciliation(chain_id, &token, &r, &drifted)
            .await?;
        if !r.in_agreement {
            tracing::error!(
                chain_id,
                token = %r.token,
                block,
                indexed_supply = %r.indexed_supply,
                node_supply = r.node_supply.as_deref().unwrap_or("-"),
                drifted = r.drifted_accounts.len(),
                "indexed state disagrees with the token contract"
            );
        }
        out.push(r);
    }
    Ok(out)
}

/// Tokens whose last reconciliation disagreed.
pub fn drifting(list: &[TokenReconciliation]) -> impl Iterator<Item = &TokenReconciliation> {
    list.iter().filter(|r| !r.in_agreement)
}
