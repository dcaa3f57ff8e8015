//! Transaction requests: the lifecycle the platform exposes, with only legal transitions
//! (each timestamped in `tx_transitions` and audited), gap-free nonces per (chain, signer)
//! and deduplication by (sender, chain, idempotency key) within 24 hours.

use chrono::{DateTime, Utc};
use dalp_audit::RequestContext;
use dalp_db::write::Write;
use dalp_db::TypedClient;
use dalp_types::{hex0x, EvmAddress, Invalid};
use deadpool_postgres::Transaction;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_postgres::types::Type;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::engine::{WorkflowError, WorkflowStore};

macro_rules! statuses {
    ($($v:ident => $s:literal),+ $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum TxStatus { $(#[serde(rename = $s)] $v),+ }
        impl utoipa::PartialSchema for TxStatus {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($s),+]))
                    .into()
            }
        }
        impl utoipa::ToSchema for TxStatus {}
        impl TxStatus {
            pub const ALL: &'static [TxStatus] = &[$(TxStatus::$v),+];
            pub fn as_str(self) -> &'static str { match self { $(TxStatus::$v => $s),+ } }
            pub fn parse(s: &str) -> Result<TxStatus, Invalid> {
                match s {
                    $($s => Ok(TxStatus::$v),)+
                    _ => Err(Invalid::new("status", format!(
                        "must be one of {}", [$($s),+].join(", ")))),
                }
            }
        }
    };
}

statuses! {
    Received => "RECEIVED",
    Queued => "QUEUED",
    Preparing => "PREPARING",
    PendingApproval => "PENDING_APPROVAL",
    Signing => "SIGNING",
    Broadcasting => "BROADCASTING",
    Confirming => "CONFIRMING",
    Completed => "COMPLETED",
    Failed => "FAILED",
    DeadLetter => "DEAD_LETTER",
    Cancelled => "CANCELLED",
}

impl TxStatus {
    /// The legal next states.
    pub fn next(self) -> &'static [TxStatus] {
        use TxStatus::*;
        match self {
            Received => &[Queued, Failed, Cancelled],
            Queued => &[Preparing, Failed, Cancelled],
            Preparing => &[PendingApproval, Failed, DeadLetter, Cancelled],
            PendingApproval => &[Signing, Failed, Cancelled],
            Signing => &[Broadcasting, Failed, DeadLetter],
            Broadcasting => &[Confirming, Failed, DeadLetter],
            Confirming => &[Completed, Failed],
            // Operators may put dead-lettered work back in the queue, or cancel it.
            DeadLetter => &[Queued, Cancelled],
            Completed | Failed | Cancelled => &[],
        }
    }

    /// Holding a nonce that has not reached the chain from this state: returned to the pool
    /// when the request ends here, unless the nonce was broadcast before (a re-queued request
    /// or a replacement), which binds it for good.
    fn before_broadcast(self) -> bool {
        matches!(
            self,
            TxStatus::Preparing | TxStatus::PendingApproval | TxStatus::Signing
        )
    }
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTxRequest {
    pub organisation_id: Uuid,
    #[schema(minimum = 1)]
    pub chain_id: i64,
    #[schema(pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$")]
    pub sender: String,
    #[serde(default)]
    #[schema(pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$")]
    pub to: Option<String>,
    /// Wei, decimal.
    #[serde(default)]
    pub value: Option<String>,
    /// 0x hex calldata.
    #[serde(default)]
    pub data: Option<String>,
    pub idempotency_key: String,
}

/// Details a transition may carry.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransitionInput {
    #[serde(default)]
    pub gas_limit: Option<i64>,
    /// Required to enter CONFIRMING.
    #[serde(default)]
    pub tx_hash: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TxRequest {
    pub id: Uuid,
    pub organisation_id: Uuid,
    pub chain_id: i64,
    pub sender: String,
    pub to: Option<String>,
    pub value: String,
    pub data: String,
    pub idempotency_key: String,
    pub status: TxStatus,
    pub nonce: Option<i64>,
    pub gas_limit: Option<i64>,
    pub tx_hash: Option<String>,
    pub error: Option<String>,
    pub recheck_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The request whose stranded nonce this one fills (a no-op self-transfer the store
    /// queued when that request ended after broadcasting without being mined).
    pub replaces: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Transition {
    pub from: Option<String>,
    pub to: String,
    pub actor: String,
    pub detail: Value,
    pub at: DateTime<Utc>,
}

const TX_COLUMNS: &str = "id, organisation_id, chain_id, sender, to_address, value::text, data, idempotency_key, status, nonce, gas_limit, tx_hash, error, recheck_at, created_at, updated_at, replaces";

fn tx_row(r: &Row) -> TxRequest {
    TxRequest {
        id: r.get(0),
        organisation_id: r.get(1),
        chain_id: r.get(2),
        sender: hex0x(r.get::<_, &[u8]>(3)),
        to: r.get::<_, Option<&[u8]>>(4).map(hex0x),
        value: r.get(5),
        data: hex0x(r.get::<_, &[u8]>(6)),
        idempotency_key: r.get(7),
        status: TxStatus::parse(r.get(8)).expect("CHECK status"),
        nonce: r.get(9),
        gas_limit: r.get(10),
        tx_hash: r.get::<_, Option<&[u8]>>(11).map(hex0x),
        error: r.get(12),
        recheck_at: r.get(13),
        created_at: r.get(14),
        updated_at: r.get(15),
        replaces: r.get(16),
    }
}

fn parse_hex(field: &'static str, s: &str, max: usize) -> Result<Vec<u8>, Invalid> {
    let b = dalp_types::parse_hex(field, s)?;
    if b.len() > max {
        return Err(Invalid::new(field, format!("is longer than {max} bytes")));
    }
    Ok(b)
}

/// A non-negative whole number of wei, at most 2^256-1 (78 digits suffice; the bound is
/// checked by comparing digit strings).
fn parse_wei(s: &str) -> Result<String, Invalid> {
    const MAX: &str =
        "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    let t = s.trim_start_matches('0');
    let t = if t.is_empty() { "0" } else { t };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Invalid::new(
            "value",
            "must be a whole number of wei (decimal digits)",
        ));
    }
    if t.len() > MAX.len() || (t.len() == MAX.len() && t > MAX) {
        return Err(Invalid::new("value", "is above 2^256-1"));
    }
    Ok(t.to_string())
}

impl WorkflowStore {
    /// Creates a request in RECEIVED, or returns the one created for the same (sender, chain,
    /// idempotency key) within the last 24 hours, with `false`.
    #[tracing::instrument(target = "dalp_store", name = "workflows.create_tx_request", skip_all)]
    pub async fn create_tx_request(
        &self,
        ctx: &RequestContext,
        new: &NewTxRequest,
    ) -> Result<(TxRequest, bool), WorkflowError> {
        dalp_types::ChainId::parse(new.chain_id).map_err(|e| e.for_field("chain_id"))?;
        let sender = EvmAddress::parse(&new.sender).map_err(|e| e.for_field("sender"))?;
        let to = new
            .to
            .as_deref()
            .map(|t| EvmAddress::parse(t).map_err(|e| e.for_field("to")))
            .transpose()?;
        let value = parse_wei(new.value.as_deref().unwrap_or("0"))?;
        let data = parse_hex("data", new.data.as_deref().unwrap_or("0x"), 128 * 1024)?;
        if new.idempotency_key.is_empty() || new.idempotency_key.len() > 200 {
            return Err(Invalid::new("idempotency_key", "must be 1 to 200 characters").into());
        }
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("workflows.create_tx_request").await?;
        // Serialises creators of the same key, so the 24-hour check cannot race.
        tx.typed_execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2::bigint::text || ':' || $3, 7))",
            &[&sender.lower(), &new.chain_id, &new.idempotency_key],
        )
        .await?;
        if let Some(r) = tx
            .typed_query_opt(
                &format!(
                    "SELECT {TX_COLUMNS} FROM dalp_workflows.tx_requests
                      WHERE sender = $1 AND chain_id = $2 AND idempotency_key = $3
                        AND created_at > now() - interval '24 hours'
                      ORDER BY created_at DESC LIMIT 1"
                ),
                &[
                    &sender.bytes().as_slice(),
                    &new.chain_id,
                    &new.idempotency_key,
                ],
            )
            .await?
        {
            return Ok((tx_row(&r), false));
        }
        let row = tx
            .typed_query_one(
                &format!(
                    "INSERT INTO dalp_workflows.tx_requests
                         (organisation_id, chain_id, sender, to_address, value, data, idempotency_key, created_by)
                     VALUES ($1, $2, $3, $4, $5::text::numeric, $6, $7, $8) RETURNING {TX_COLUMNS}"
                ),
                &[
                    &new.organisation_id,
                    &new.chain_id,
                    &sender.bytes().as_slice(),
                    &to.as_ref().map(|t| t.bytes().as_slice()),
                    &value,
                    &data,
                    &new.idempotency_key,
                    &ctx.actor,
                ],
            )
            .await?;
        let req = tx_row(&row);
        record_transition(&mut tx, ctx, &req, None, json!({})).await?;
        tx.commit().await?;
        Ok((req, true))
    }

    /// Moves request `id` to `to` if that is legal from where it is; anything else is an
    /// error that changes nothing. PREPARING allocates the nonce; ending before broadcast
    /// returns it.
    #[tracing::instrument(target = "dalp_store", name = "workflows.transition", skip_all)]
    pub async fn transition(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        to: TxStatus,
        input: &TransitionInput,
    ) -> Result<TxRequest, WorkflowError> {
        let tx_hash = input
            .tx_hash
            .as_deref()
            .map(|h| {
                let b = parse_hex("tx_hash", h, 32)?;
                if b.len() != 32 {
                    return Err(Invalid::new("tx_hash", "must be 32 bytes"));
                }
                Ok(b)
            })
            .transpose()?;
        if input.gas_limit.is_some_and(|g| g <= 0) {
            return Err(Invalid::new("gas_limit", "must be positive").into());
        }
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("workflows.transition").await?;
        let row = tx
            .typed_query_opt(
                &format!(
                    "SELECT {TX_COLUMNS} FROM dalp_workflows.tx_requests WHERE id = $1 FOR UPDATE"
                ),
                &[&id],
            )
            .await?
            .ok_or_else(|| WorkflowError::NotFound(format!("transaction request {id}")))?;
        let current = tx_row(&row);
        if !current.status.next().contains(&to) {
            return Err(WorkflowError::IllegalTransition {
                id,
                from: current.status.as_str().into(),
                to: to.as_str().into(),
            });
        }
        if to == TxStatus::Confirming && tx_hash.is_none() && current.tx_hash.is_none() {
            return Err(Invalid::new("tx_hash", "is required to enter CONFIRMING").into());
        }
        let sender = parse_hex("sender", &current.sender, 20)?;
        let mut detail = json!({});
        let mut nonce = current.nonce;
        if to == TxStatus::Preparing && nonce.is_none() {
            let n = allocate_nonce(&tx, current.chain_id, &sender).await?;
            nonce = Some(n);
            detail["nonce"] = json!(n);
        }
        // Whether this request's nonce ever reached the chain (from this request or one it
        // replaces): then it is never released, and ending here strands it.
        let broadcast = match nonce {
            Some(n) => tx
                .typed_query_one(
                    "SELECT EXISTS (SELECT 1 FROM dalp_workflows.broadcast_nonces
                                     WHERE chain_id = $1 AND signer = $2 AND nonce = $3)",
                    &[&current.chain_id, &sender, &n],
                )
                .await?
                .get::<_, bool>(0),
            None => false,
        };
        let ends = matches!(
            to,
            TxStatus::Failed | TxStatus::Cancelled | TxStatus::DeadLetter
        );
        if ends && !broadcast && current.status.before_broadcast() {
            if let Some(n) = nonce.take() {
                tx.typed_execute(
                    "INSERT INTO dalp_workflows.released_nonces (chain_id, signer, nonce) VALUES ($1, $2, $3)",
                    &[&current.chain_id, &sender, &n],
                )
                .await?;
                detail["released_nonce"] = json!(n);
            }
        }
        if to == TxStatus::Broadcasting {
            let n = nonce.expect("a request past PREPARING holds a nonce");
            // Bound for good (the database refuses a second, non-replacement broadcaster).
            tx.typed_execute(
                "INSERT INTO dalp_workflows.broadcast_nonces (chain_id, signer, nonce, request_id)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&current.chain_id, &sender, &n, &id],
            )
            .await?;
            detail["nonce"] = json!(n);
        }
        // `broadcast` implies a nonce; BROADCASTING itself never ends a request.
        let stranded = broadcast && matches!(to, TxStatus::Failed | TxStatus::Cancelled);
        if let Some(e) = &input.error {
            detail["error"] = json!(e.chars().take(500).collect::<String>());
        }
        let row = tx
            .typed_query_one(
                &format!(
                    "UPDATE dalp_workflows.tx_requests
                        SET status = $2, nonce = $3, gas_limit = coalesce($4, gas_limit),
                            tx_hash = coalesce($5, tx_hash), error = coalesce($6, error),
                            recheck_at = NULL, updated_at = now()
                      WHERE id = $1 RETURNING {TX_COLUMNS}"
                ),
                &[
                    &id,
                    &to.as_str(),
                    &nonce,
                    &input.gas_limit,
                    &tx_hash,
                    &input
                        .error
                        .as_ref()
                        .map(|e| e.chars().take(4000).collect::<String>()),
                ],
            )
            .await?;
        let req = tx_row(&row);
        if stranded {
            let replacement = create_replacement(&mut tx, ctx, &req).await?;
            detail["stranded_nonce"] = json!(req.nonce);
            detail["replacement"] = json!(replacement);
        }
        record_transition(&mut tx, ctx, &req, Some(current.status), detail).await?;
        tx.commit().await?;
        Ok(req)
    }

    /// Nonces that reached the chain from a request that ended without being mined, and the
    /// replacement now filling each (oldest first).
    #[tracing::instrument(target = "dalp_store", name = "workflows.stranded_nonces", skip_all)]
    pub async fn stranded_nonces(&self) -> Result<Vec<StrandedNonce>, WorkflowError> {
        let client = dalp_db::pool::checkout(self.pool(), "workflows").await?;
        Ok(client
            .query_typed(
                "SELECT chain_id, sender, nonce, id, replaces, status,
                        extract(epoch FROM now() - created_at)::float8
                   FROM dalp_workflows.tx_requests
                  WHERE replaces IS NOT NULL AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')
                  ORDER BY created_at",
                &[],
            )
            .await?
            .iter()
            .map(|r| StrandedNonce {
                chain_id: r.get(0),
                signer: hex0x(r.get::<_, &[u8]>(1)),
                nonce: r.get(2),
                replacement: r.get(3),
                replaces: r.get(4),
                replacement_status: TxStatus::parse(r.get(5)).expect("CHECK status"),
                age_seconds: r.get(6),
            })
            .collect())
    }

    /// A confirmation that timed out is not a failure: the request stays CONFIRMING and is
    /// due for a re-check after `recheck_in`.
    #[tracing::instrument(
        target = "dalp_store",
        name = "workflows.confirmation_timed_out",
        skip_all
    )]
    pub async fn confirmation_timed_out(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        recheck_in: std::time::Duration,
    ) -> Result<TxRequest, WorkflowError> {
        let mut conn = self.writer().checkout().await?;
        let mut tx = conn.begin("workflows.confirmation_timed_out").await?;
        let ms = recheck_in.as_millis() as f64;
        let row = tx
            .typed_query_opt(
                &format!(
                    "UPDATE dalp_workflows.tx_requests
                        SET recheck_at = now() + $2 * interval '1 millisecond', updated_at = now()
                      WHERE id = $1 AND status = 'CONFIRMING' RETURNING {TX_COLUMNS}"
                ),
                &[&id, &ms],
            )
            .await?;
        let Some(row) = row else {
            let current = self.tx_request(id).await?;
            return Err(WorkflowError::IllegalTransition {
                id,
                from: current.status.as_str().into(),
                to: "CONFIRMING (re-check)".into(),
            });
        };
        let req = tx_row(&row);
        record_transition(
            &mut tx,
            ctx,
            &req,
            Some(TxStatus::Confirming),
            json!({ "confirmation_timeout": true, "recheck_at": req.recheck_at }),
        )
        .await?;
        tx.commit().await?;
        Ok(req)
    }

    #[tracing::instrument(target = "dalp_store", name = "workflows.tx_request", skip_all)]
    pub async fn tx_request(&self, id: Uuid) -> Result<TxRequest, WorkflowError> {
        let client = dalp_db::pool::checkout(self.pool(), "workflows").await?;
        client
            .query_typed(
                &format!("SELECT {TX_COLUMNS} FROM dalp_workflows.tx_requests WHERE id = $1"),
                &[(&id, Type::UUID)],
            )
            .await?
            .first()
            .map(tx_row)
            .ok_or_else(|| WorkflowError::NotFound(format!("transaction request {id}")))
    }

    #[tracing::instrument(target = "dalp_store", name = "workflows.tx_transitions", skip_all)]
    pub async fn tx_transitions(&self, id: Uuid) -> Result<Vec<Transition>, WorkflowError> {
        let client = dalp_db::pool::checkout(self.pool(), "workflows").await?;
        Ok(client
            .query_typed(
                "SELECT from_status, to_status, actor, detail, at FROM dalp_workflows.tx_transitions
                  WHERE request_id = $1 ORDER BY id",
                &[(&id, Type::UUID)],
            )
            .await?
            .iter()
            .map(|r| Transition {
                from: r.get(0),
                to: r.get(1),
                actor: r.get(2),
                detail: r.get(3),
                at: r.get(4),
            })
            .collect())
    }

    /// Requests in `status` (newest change first).
    #[tracing::instrument(target = "dalp_store", name = "workflows.tx_requests", skip_all)]
    pub async fn tx_requests(
        &self,
        status: TxStatus,
        limit: i64,
    ) -> Result<Vec<TxRequest>, WorkflowError> {
        let client = dalp_db::pool::checkout(self.pool(), "workflows").await?;
        Ok(client
            .query_typed(
                &format!(
                    "SELECT {TX_COLUMNS} FROM dalp_workflows.tx_requests WHERE status = $1
                      ORDER BY updated_at DESC LIMIT $2"
                ),
                &[(&status.as_str(), Type::TEXT), (&limit, Type::INT8)],
            )
            .await?
            .iter()
            .map(tx_row)
            .collect())
    }
}

/// The next nonce of (chain, signer): the lowest released one, else the counter. The
/// signer's row lock serialises allocators; a rolled-back allocation leaves no gap.
async fn allocate_nonce(
    tx: &Transaction<'_>,
    chain_id: i64,
    signer: &[u8],
) -> Result<i64, WorkflowError> {
    tx.typed_execute(
        "INSERT INTO dalp_workflows.signer_nonces (chain_id, signer) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&chain_id, &signer],
    )
    .await?;
    tx.typed_execute(
        "SELECT 1 FROM dalp_workflows.signer_nonces WHERE chain_id = $1 AND signer = $2 FOR UPDATE",
        &[&chain_id, &signer],
    )
    .await?;
    let reused = tx
        .typed_query_opt(
            "DELETE FROM dalp_workflows.released_nonces
              WHERE (chain_id, signer, nonce) = (
                    SELECT chain_id, signer, nonce FROM dalp_workflows.released_nonces
                     WHERE chain_id = $1 AND signer = $2 ORDER BY nonce LIMIT 1)
          RETURNING nonce",
            &[&chain_id, &signer],
        )
        .await?;
    if let Some(r) = reused {
        return Ok(r.get(0));
    }
    Ok(tx
        .typed_query_one(
            "UPDATE dalp_workflows.signer_nonces SET next_nonce = next_nonce + 1
              WHERE chain_id = $1 AND signer = $2 RETURNING next_nonce - 1",
            &[&chain_id, &signer],
        )
        .await?
        .get(0))
}

/// A nonce that was broadcast by a request that then ended without being mined, and the
/// replacement request in flight for it.
#[derive(Debug, Clone, Serialize)]
pub struct StrandedNonce {
    pub chain_id: i64,
    pub signer: String,
    pub nonce: i64,
    pub replacement: Uuid,
    pub replaces: Uuid,
    pub replacement_status: TxStatus,
    pub age_seconds: f64,
}

/// Stranded nonces of one (chain, signer): how many, and the oldest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SignerStrands {
    pub chain_id: i64,
    pub signer: String,
    pub count: usize,
    pub oldest_nonce: i64,
    pub oldest_age_seconds: f64,
}

/// Groups stranded nonces (as [`WorkflowStore::stranded_nonces`] lists them) by signer.
pub fn stranded_per_signer(list: &[StrandedNonce]) -> Vec<SignerStrands> {
    let mut by: std::collections::BTreeMap<(i64, &str), SignerStrands> = Default::default();
    for s in list {
        let e = by
            .entry((s.chain_id, s.signer.as_str()))
            .or_insert_with(|| SignerStrands {
                chain_id: s.chain_id,
                signer: s.signer.clone(),
                count: 0,
                oldest_nonce: s.nonce,
                oldest_age_seconds: s.age_seconds,
            });
        e.count += 1;
        if s.age_seconds > e.oldest_age_seconds {
            e.oldest_nonce = s.nonce;
            e.oldest_age_seconds = s.age_seconds;
        }
    }
    by.into_values().collect()
}

/// Queues a replacement for `ended`, whose broadcast nonce is now stranded: a no-op
/// self-transfer (value 0, no data) with the same nonce, so the signer's later nonces can be
/// mined. Returns its id.
async fn create_replacement(
    tx: &mut Write<'_>,
    ctx: &RequestContext,
    ended: &TxRequest,
) -> Result<Uuid, WorkflowError> {
    let sender = parse_hex("sender", &ended.sender, 20)?;
    let row = tx
        .typed_query_one(
            &format!(
                "INSERT INTO dalp_workflows.tx_requests
                     (organisation_id, chain_id, sender, to_address, value, data, idempotency_key,
                      status, nonce, replaces, created_by)
                 VALUES ($1, $2, $3, $3, 0, '', $4, 'QUEUED', $5, $6, $7) RETURNING {TX_COLUMNS}"
            ),
            &[
                &ended.organisation_id,
                &ended.chain_id,
                &sender,
                &format!("nonce-replacement:{}", ended.id),
                &ended.nonce,
                &ended.id,
                &ctx.actor,
            ],
        )
        .await?;
    let replacement = tx_row(&row);
    record_transition(
        tx,
        ctx,
        &replacement,
        None,
        json!({ "replaces": ended.id, "nonce": ended.nonce, "reason": "stranded nonce" }),
    )
    .await?;
    Ok(replacement.id)
}

async fn record_transition(
    tx: &mut Write<'_>,
    ctx: &RequestContext,
    req: &TxRequest,
    from: Option<TxStatus>,
    detail: Value,
) -> Result<(), WorkflowError> {
    tx.typed_execute(
        "INSERT INTO dalp_workflows.tx_transitions (request_id, from_status, to_status, actor, detail)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &req.id,
            &from.map(|s| s.as_str()),
            &req.status.as_str(),
            &ctx.actor,
            &detail,
        ],
    )
    .await?;
    let mut event = ctx
        .event("workflows.tx_request.transition", "tx_request")
        .resource(req.id)
        .details(json!({
            "from": from.map(|s| s.as_str()), "to": req.status.as_str(),
            "chain_id": req.chain_id, "nonce": req.nonce,
        }));
    event.organisation_id = Some(req.organisation_id);
    tx.record(&event).await?;
    Ok(())
}
