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
use dalp_identity::types::PlatformRole;
use dalp_indexed::reconcile::TokenReconciliation;
use dalp_indexed::store::{
    Balance, Chain, IngestOutcome, SyncStatus, TransferFilter, TransferQuery, TransferRow,
};
use dalp_indexed::types::{parse_address, parse_batch, Address, BlockInput};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{page_limit, time_param};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

/// Ingest batches may be far larger than other request bodies.
pub const MAX_INGEST_BYTES: usize = 32 * 1024 * 1024;
const WRITERS: &[PlatformRole] = &[PlatformRole::Admin, PlatformRole::SystemManager];

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(chains, register))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(ingest))
                .layer(DefaultBodyLimit::max(MAX_INGEST_BYTES)),
        )
        .routes(routes!(status))
        .routes(routes!(account_balances))
        .routes(routes!(account_transfers))
        .routes(routes!(holders))
        .routes(routes!(token_transfers))
        .routes(routes!(balance_at))
        .routes(routes!(supply_at))
}

#[derive(Serialize, ToSchema)]
struct ChainBody {
    chain: Chain,
}

#[derive(Serialize, ToSchema)]
struct Chains {
    chains: Vec<Chain>,
}

#[derive(Serialize, ToSchema)]
struct IngestResult {
    ingest: IngestOutcome,
}

#[derive(Serialize, ToSchema)]
struct StatusBody {
    status: SyncStatus,
    /// The newest comparison with the node per token.
    reconciliations: Vec<TokenReconciliation>,
}

#[derive(Serialize, ToSchema)]
struct Balances {
    balances: Vec<Balance>,
}

#[derive(Serialize, ToSchema)]
struct Holders {
    /// Largest balance first.
    holders: Vec<Balance>,
    /// Pass as `after` for the next page; absent on the last page.
    next: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Transfers {
    /// Newest first.
    transfers: Vec<TransferRow>,
    /// Pass as `before` for the next page; absent on the last page.
    next: Option<String>,
}

/// The query of the transfer lists.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // describes the query `transfers` reads
struct TransferParams {
    /// RFC 3339; older partitions are not scanned.
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// RFC 3339, exclusive.
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// `<block>:<log index>`: the previous page's `next`.
    #[param(pattern = "^[0-9]{1,18}:[0-9]{1,9}$")]
    before: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct BalanceAt {
    block: i64,
    /// Exact decimal.
    balance: String,
}

#[derive(Serialize, ToSchema)]
struct SupplyAt {
    block: i64,
    /// Exact decimal.
    total_supply: String,
}

/// The headers every read carries (see the module docs), and where it was served.
type Reflecting = [(HeaderName, HeaderValue); 3];

/// The store a replica-safe read uses (a replica when configured, see
/// [`crate::consistency`]) and where that is.
pub(crate) struct Reader {
    indexed: std::sync::Arc<dalp_indexed::IndexedStore>,
    served: dalp_db::ha::Served,
}

impl axum::extract::FromRequestParts<AppState> for Reader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let at = parts
            .extensions
            .get::<crate::consistency::ReadAt>()
            .cloned();
        let (indexed, served) = state.indexed_reader(at.as_ref()).await;
        Ok(Reader { indexed, served })
    }
}

pub const INDEXED_BLOCK_HEADER: &str = "x-dalp-indexed-block";
pub const CHAIN_STATE_HEADER: &str = "x-dalp-chain-state";

/// Where the chain's index stands as a read begins (unknown chains are 404 here).
async fn reflecting(reader: &Reader, chain: i64) -> Result<Reflecting, ApiError> {
    Ok(headers_of(reader, &reader.indexed.status(chain).await?))
}

/// The read headers for `status`.
fn headers_of(reader: &Reader, status: &dalp_indexed::store::SyncStatus) -> Reflecting {
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
        crate::consistency::read_from(&reader.served),
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewChain)]
struct RegisterBody {
    #[schema(minimum = 1)]
    chain_id: i64,
    #[schema(max_length = 100, extensions(("x-dalp-text" = json!(true))))]
    name: String,
    /// Blocks below the head that can no longer be reorganised (default 64).
    #[serde(default = "default_finality")]
    #[schema(minimum = 0, maximum = 100000)]
    finality_depth: i32,
}

fn default_finality() -> i32 {
    64
}

/// Register a chain (admin, systemManager).
#[utoipa::path(post, path = "/api/v1/indexed/chains", tag = "indexed",
    request_body = RegisterBody,
    responses(
        (status = 201, description = "Registered", body = ChainBody),
        (status = 409, description = "The chain id is registered with another name or depth", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn register(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, axum::Json<ChainBody>), ApiError> {
    auth.require_any_role(&state, WRITERS, "indexed.chain.register")
        .await?;
    let chain = state
        .indexed
        .register_chain(&auth.ctx, body.chain_id, &body.name, body.finality_depth)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(ChainBody { chain })))
}

/// Registered chains.
#[utoipa::path(get, path = "/api/v1/indexed/chains", tag = "indexed",
    responses((status = 200, description = "Chains", body = Chains)))]
#[tracing::instrument(skip_all)]
async fn chains(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<axum::Json<Chains>, ApiError> {
    Ok(axum::Json(Chains {
        chains: state.indexed.chains().await?,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BlockBatch)]
struct IngestBody {
    #[schema(min_items = 1, max_items = 10000)]
    blocks: Vec<BlockInput>,
    /// Newest block the sender has seen, for lag reporting.
    #[serde(default)]
    #[schema(maximum = 9223372036854775807_u64)]
    head: Option<u64>,
}

/// Ingest consecutive blocks with their transactions and logs (admin, systemManager).
/// Idempotent; a reorganisation within the finality depth is rolled back first.
#[utoipa::path(post, path = "/api/v1/indexed/{chain}/blocks", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id")),
    request_body = IngestBody,
    responses(
        (status = 200, description = "What the batch did", body = IngestResult),
        (status = 409, description = "A gap, a parent mismatch, a reorganisation deeper than finality, or the chain is diverged", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn ingest(
    State(state): State<AppState>,
    auth: Auth,
    Path(chain): Path<String>,
    Json(body): Json<IngestBody>,
) -> Result<axum::Json<IngestResult>, ApiError> {
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
    Ok(axum::Json(IngestResult { ingest: outcome }))
}

/// Sync status: checkpoint, finalized block, head, lag, divergence, reconciliations.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/status", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id")),
    responses((status = 200, description = "The status", body = StatusBody)))]
#[tracing::instrument(skip_all)]
async fn status(
    _auth: Auth,
    reader: Reader,
    Path(chain): Path<String>,
) -> Result<(Reflecting, axum::Json<StatusBody>), ApiError> {
    let chain = chain_param(&chain)?;
    let status = reader.indexed.status(chain).await?;
    let headers = headers_of(&reader, &status);
    let reconciliations = reader.indexed.reconciliations(chain).await?;
    Ok((
        headers,
        axum::Json(StatusBody {
            status,
            reconciliations,
        }),
    ))
}

/// An account's current token balances.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/accounts/{account}/balances", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id"), ("account" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Account address")),
    responses((status = 200, description = "Balances", body = Balances)))]
#[tracing::instrument(skip_all)]
async fn account_balances(
    _auth: Auth,
    reader: Reader,
    Path((chain, account)): Path<(String, String)>,
) -> Result<(Reflecting, axum::Json<Balances>), ApiError> {
    let chain = chain_param(&chain)?;
    let account = address_param("account", &account)?;
    let headers = reflecting(&reader, chain).await?;
    let balances = reader.indexed.balances_of(chain, &account).await?;
    Ok((headers, axum::Json(Balances { balances })))
}

/// A token's holders, largest balance first.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/tokens/{token}/holders", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id"), ("token" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Token contract address"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Page size (default 100)"),
        ("after" = Option<String>, Query, pattern = "^[0-9]{1,80}:0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "<balance>:<account>: the previous page's `next`"),
    ),
    responses((status = 200, description = "A page of holders", body = Holders)))]
#[tracing::instrument(skip_all)]
async fn holders(
    _auth: Auth,
    reader: Reader,
    Path((chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Holders>), ApiError> {
    super::known_params(&q, &["limit", "after"])?;
    let chain = chain_param(&chain)?;
    let token = address_param("token", &token)?;
    let limit = page_limit(&q)?;
    let headers = reflecting(&reader, chain).await?;
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
    let page = reader
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
        axum::Json(Holders {
            holders: page,
            next,
        }),
    ))
}

async fn transfers(
    reader: &Reader,
    chain: &str,
    filter: TransferFilter<'_>,
    q: &HashMap<String, String>,
) -> Result<(Reflecting, axum::Json<Transfers>), ApiError> {
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
    let headers = reflecting(reader, chain).await?;
    let page = reader.indexed.transfers(chain, filter, &query).await?;
    let next = (page.len() as i64 == query.limit)
        .then(|| {
            page.last()
                .map(|t| format!("{}:{}", t.block_number, t.log_index))
        })
        .flatten();
    Ok((
        headers,
        axum::Json(Transfers {
            transfers: page,
            next,
        }),
    ))
}

/// Transfers of a token, newest first.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/tokens/{token}/transfers", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id"), ("token" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Token contract address"),
        TransferParams,
    ),
    responses((status = 200, description = "A page of transfers", body = Transfers)))]
#[tracing::instrument(skip_all)]
async fn token_transfers(
    _auth: Auth,
    reader: Reader,
    Path((chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Transfers>), ApiError> {
    super::known_params(&q, &["since", "until", "before", "limit"])?;
    let token = address_param("token", &token)?;
    transfers(&reader, &chain, TransferFilter::Token(&token), &q).await
}

/// Transfers from or to an account, newest first.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/accounts/{account}/transfers", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id"), ("account" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Account address"),
        TransferParams,
    ),
    responses((status = 200, description = "A page of transfers", body = Transfers)))]
#[tracing::instrument(skip_all)]
async fn account_transfers(
    _auth: Auth,
    reader: Reader,
    Path((chain, account)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<Transfers>), ApiError> {
    super::known_params(&q, &["since", "until", "before", "limit"])?;
    let account = address_param("account", &account)?;
    transfers(&reader, &chain, TransferFilter::Account(&account), &q).await
}

/// Chain and token from the path, `?block=N` (default: the checkpoint), and the read's
/// headers.
async fn token_at_block(
    reader: &Reader,
    chain: &str,
    token: &str,
    q: &HashMap<String, String>,
) -> Result<(i64, Address, i64, Reflecting), ApiError> {
    let chain = chain_param(chain)?;
    let token = address_param("token", token)?;
    let status = reader.indexed.status(chain).await?;
    let block = match int_param(q, "block")? {
        Some(b) => b,
        None => status.checkpoint.unwrap_or(0),
    };
    Ok((chain, token, block, headers_of(reader, &status)))
}
/// An account's balance of a token after a block.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/tokens/{token}/balances/{account}", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id"), ("token" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Token contract address"), ("account" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Account address"),
        ("block" = Option<i64>, Query, minimum = 0, description = "Default: the checkpoint"),
    ),
    responses(
        (status = 200, description = "The balance", body = BalanceAt),
        (status = 409, description = "The block is not indexed yet", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn balance_at(
    _auth: Auth,
    reader: Reader,
    Path((chain, token, account)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<BalanceAt>), ApiError> {
    super::known_params(&q, &["block"])?;
    let (chain, token, block, headers) = token_at_block(&reader, &chain, &token, &q).await?;
    let account = address_param("account", &account)?;
    let balance = reader
        .indexed
        .balance_at(chain, &token, &account, block)
        .await?;
    Ok((headers, axum::Json(BalanceAt { block, balance })))
}

/// A token's total supply after a block.
#[utoipa::path(get, path = "/api/v1/indexed/{chain}/tokens/{token}/supply", tag = "indexed",
    params(("chain" = i64, Path, minimum = 1, description = "EVM chain id"), ("token" = String, Path, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$", description = "Token contract address"),
        ("block" = Option<i64>, Query, minimum = 0, description = "Default: the checkpoint"),
    ),
    responses(
        (status = 200, description = "The supply", body = SupplyAt),
        (status = 409, description = "The block is not indexed yet", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn supply_at(
    _auth: Auth,
    reader: Reader,
    Path((chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(Reflecting, axum::Json<SupplyAt>), ApiError> {
    super::known_params(&q, &["block"])?;
    let (chain, token, block, headers) = token_at_block(&reader, &chain, &token, &q).await?;
    let supply = reader.indexed.supply_at(chain, &token, block).await?;
    Ok((
        headers,
        axum::Json(SupplyAt {
            block,
            total_supply: supply,
        }),
    ))
}
