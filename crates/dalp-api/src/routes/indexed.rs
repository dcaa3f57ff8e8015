//! Indexed chain state: chain registration and block ingest for an external indexer
//! (`admin` or `systemManager`; API keys need scope `read-write`), and reads for anyone
//! signed in (chain data is public): balances, holders, transfers, balance and supply at a
//! block, sync status.
//!
//! Every read says what it reflects: `x-dalp-indexed-block` (the checkpoint when the read
//! began; `none` before the first block) and `x-dalp-chain-state` (`following`, or
//! `diverged` when the node no longer has the indexed chain and ingest is stopped).

use std::collections::HashMap;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use dalp_identity::types::PlatformRole;
use dalp_indexed::store::{TransferFilter, TransferQuery};
use dalp_indexed::types::{parse_address, parse_batch, Address, BlockInput};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{page_limit, time_param};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

/// Ingest batches may be far larger than other request bodies.
pub const MAX_INGEST_BYTES: usize = 32 * 1024 * 1024;
const WRITERS: &[PlatformRole] = &[PlatformRole::Admin, PlatformRole::SystemManager];

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/indexed/chains", get(chains).post(register))
        .route(
            "/api/v1/indexed/{chain}/blocks",
            post(ingest).layer(DefaultBodyLimit::max(MAX_INGEST_BYTES)),
        )
        .route("/api/v1/indexed/{chain}/status", get(status))
        .route(
            "/api/v1/indexed/{chain}/accounts/{account}/balances",
            get(account_balances),
        )
        .route(
            "/api/v1/indexed/{chain}/accounts/{account}/transfers",
            get(account_transfers),
        )
        .route(
            "/api/v1/indexed/{chain}/tokens/{token}/holders",
            get(holders),
        )
        .route(
            "/api/v1/indexed/{chain}/tokens/{token}/transfers",
            get(token_transfers),
        )
        .route(
            "/api/v1/indexed/{chain}/tokens/{token}/balances/{account}",
            get(balance_at),
        )
        .route(
            "/api/v1/indexed/{chain}/tokens/{token}/supply",
            get(supply_at),
        )
}

/// The headers every read carries (see the module docs).
type Reflecting = [(HeaderName, HeaderValue); 2];

pub const INDEXED_BLOCK_HEADER: &str = "x-dalp-indexed-block";
pub const CHAIN_STATE_HEADER: &str = "x-dalp-chain-state";

/// Where the chain's index stands as a read begins (unknown chains are 404 here).
async fn reflecting(state: &AppState, chain: i64) -> Result<Reflecting, ApiError> {
    Ok(headers_of(&state.indexed.status(chain).await?))
}

/// The read headers for `status`.
fn headers_of(status: &dalp_indexed::store::SyncStatus) -> Reflecting {
    let block = status
        .checkpoint
        .map(|c| c.to_string())
        .unwrap_or_else(|| "none".into());
    [
        (
            HeaderName::from_static(INDEXED_BLOCK_HEADER),
            HeaderValue::from_str(&block).expect("digits"),
        ),
        (
            HeaderName::from_static(CHAIN_STATE_HEADER),
            HeaderValue::from_static(status.state),
        ),
    ]
}

fn chain_param(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>().ok().filter(|c| *c > 0).ok_or_else(|| {
        ApiError::NotFound(format!(
            "chain {s:?} not found (chain ids are positive integers)"
        ))
    })
}

fn address_param(field: &'static str, s: &str) -> Result<Address, ApiError> {
    parse_address(field, field, s).map_err(|e| ApiError::BadRequest(e.message))
}

fn int_param(q: &HashMap<String, String>, k: &str) -> Result<Option<i64>, ApiError> {
    q.get(k)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::BadRequest(format!("{k} must be a non-negative integer")))
        })
        .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    chain_id: i64,
    name: String,
    #[serde(default = "default_finality")]
    finality_depth: i32,
}

fn default_finality() -> i32 {
    64
}

#[tracing::instrument(skip_all)]
async fn register(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    auth.require_any_role(&state, WRITERS, "indexed.chain.register")
        .await?;
    let chain = state
        .indexed
        .register_chain(&auth.ctx, body.chain_id, &body.name, body.finality_depth)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "chain": chain }))))
}

#[tracing::instrument(skip_all)]
async fn chains(State(state): State<AppState>, _auth: Auth) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(
        json!({ "chains": state.indexed.chains().await? }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestBody {
    blocks: Vec<BlockInput>,
    /// Newest block the sender has seen, for lag reporting.
    #[serde(default)]
    head: Option<u64>,
}

#[tracing::instrument(skip_all)]
async fn ingest(
    State(state): State<AppState>,
    auth: Auth,
    Path(chain): Path<String>,
    Json(body): Json<IngestBody>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, WRITERS, "indexed.blocks.ingest")
        .await?;
    let chain = chain_param(&chain)?;
    let blocks = parse_batch(&body.blocks).map_err(dalp_indexed::IndexError::from)?;
    let head = body
        .head
        .map(|h| i64::try_from(h).map_err(|_| ApiError::BadRequest("head is too large".into())))
        .transpose()?;
    let outcome = state
        .indexed
        .ingest(&auth.ctx, chain, &blocks, head)
        .await?;
    Ok(axum::Json(json!({ "ingest": outcome })))
}

#[tracing::instrument(skip_all)]
async fn status(
    State(state): State<AppState>,
    _auth: Auth,
    Path(chain): Path<String>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let chain = chain_param(&chain)?;
    let status = state.indexed.status(chain).await?;
    let headers = headers_of(&status);
    let reconciliations = state.indexed.reconciliations(chain).await?;
    Ok((
        headers,
        axum::Json(json!({ "status": status, "reconciliations": reconciliations })),
    ))
}

#[tracing::instrument(skip_all)]
async fn account_balances(
    State(state): State<AppState>,
    _auth: Auth,
    Path((chain, account)): Path<(String, String)>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let chain = chain_param(&chain)?;
    let account = address_param("account", &account)?;
    let headers = reflecting(&state, chain).await?;
    let balances = state.indexed.balances_of(chain, &account).await?;
    Ok((headers, axum::Json(json!({ "balances": balances }))))
}

#[tracing::instrument(skip_all)]
async fn holders(
    State(state): State<AppState>,
    _auth: Auth,
    Path((chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let chain = chain_param(&chain)?;
    let token = address_param("token", &token)?;
    let limit = page_limit(&q)?;
    let headers = reflecting(&state, chain).await?;
    // Cursor: "<balance>:<account>" of the previous page's last holder.
    let after = match q.get("after") {
        None => None,
        Some(c) => {
            let (b, a) = c.split_once(':').ok_or_else(|| {
                ApiError::BadRequest(
                    "after must be <balance>:<account> from the previous page's next cursor".into(),
                )
            })?;
            if b.is_empty() || b.len() > 80 || !b.bytes().all(|d| d.is_ascii_digit()) {
                return Err(ApiError::BadRequest(
                    "after: balance must be a whole number".into(),
                ));
            }
            Some((b.to_string(), address_param("after", a)?))
        }
    };
    let page = state
        .indexed
        .holders(
            chain,
            &token,
            limit,
            after.as_ref().map(|(b, a)| (b.as_str(), a)),
        )
        .await?;
    let next = (page.len() as i64 == limit)
        .then(|| page.last().map(|h| format!("{}:{}", h.balance, h.account)))
        .flatten();
    Ok((
        headers,
        axum::Json(json!({ "holders": page, "next": next })),
    ))
}

async fn transfers(
    state: &AppState,
    chain: &str,
    filter: TransferFilter<'_>,
    q: &HashMap<String, String>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let chain = chain_param(chain)?;
    let before = match q.get("before") {
        None => None,
        Some(c) => {
            let parsed = c
                .split_once(':')
                .and_then(|(b, l)| Some((b.parse::<i64>().ok()?, l.parse::<i32>().ok()?)));
            Some(parsed.ok_or_else(|| {
                ApiError::BadRequest(
                    "before must be <block>:<log index> from the previous page's next cursor"
                        .into(),
                )
            })?)
        }
    };
    let query = TransferQuery {
        since: time_param(q, "since")?,
        until: time_param(q, "until")?,
        before,
        limit: page_limit(q)?,
    };
    let headers = reflecting(state, chain).await?;
    let page = state.indexed.transfers(chain, filter, &query).await?;
    let next = (page.len() as i64 == query.limit)
        .then(|| {
            page.last()
                .map(|t| format!("{}:{}", t.block_number, t.log_index))
        })
        .flatten();
    Ok((
        headers,
        axum::Json(json!({ "transfers": page, "next": next })),
    ))
}

#[tracing::instrument(skip_all)]
async fn token_transfers(
    State(state): State<AppState>,
    _auth: Auth,
    Path((chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let token = address_param("token", &token)?;
    transfers(&state, &chain, TransferFilter::Token(&token), &q).await
}

#[tracing::instrument(skip_all)]
async fn account_transfers(
    State(state): State<AppState>,
    _auth: Auth,
    Path((chain, account)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let account = address_param("account", &account)?;
    transfers(&state, &chain, TransferFilter::Account(&account), &q).await
}

/// Chain and token from the path, `?block=N` (default: the checkpoint), and the read's
/// headers.
async fn token_at_block(
    state: &AppState,
    chain: &str,
    token: &str,
    q: &HashMap<String, String>,
) -> Result<(i64, Address, i64, Reflecting), ApiError> {
    let chain = chain_param(chain)?;
    let token = address_param("token", token)?;
    let status = state.indexed.status(chain).await?;
    let block = match int_param(q, "block")? {
        Some(b) => b,
        None => status.checkpoint.unwrap_or(0),
    };
    Ok((chain, token, block, headers_of(&status)))
}
#[tracing::instrument(skip_all)]
async fn balance_at(
    State(state): State<AppState>,
    _auth: Auth,
    Path((chain, token, account)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let (chain, token, block, headers) = token_at_block(&state, &chain, &token, &q).await?;
    let account = address_param("account", &account)?;
    let balance = state
        .indexed
        .balance_at(chain, &token, &account, block)
        .await?;
    Ok((
        headers,
        axum::Json(json!({ "block": block, "balance": balance })),
    ))
}

#[tracing::instrument(skip_all)]
async fn supply_at(
    State(state): State<AppState>,
    _auth: Auth,
    Path((chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Value>), ApiError> {
    let (chain, token, block, headers) = token_at_block(&state, &chain, &token, &q).await?;
    let supply = state.indexed.supply_at(chain, &token, block).await?;
    Ok((
        headers,
        axum::Json(json!({ "block": block, "total_supply": supply })),
    ))
}
