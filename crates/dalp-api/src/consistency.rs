//! Replica reads with read-your-writes over HTTP. With replicas configured
//! ([`dalp_app::App::with_replicas`]):
//! - every successful change answers with `x-dalp-consistency: X/Y@T`, the primary's WAL
//!   position after it (at or past its commit) and its timeline;
//! - a read that sends it back is served by a replica that streams that timeline (or a
//!   later one) and has replayed that position (waiting up to the read-your-writes bound),
//!   else by the primary — it never sees data older than the client's write. A bare `X/Y`
//!   (no timeline) is accepted and needs only a streaming replica at the position;
//! - a read without it goes to a streaming replica within the lag bound;
//! - replica-served reads say where they came from: `x-dalp-read-from: replica HOST:PORT` or
//!   `primary`.
//!
//! Only reads that tolerate a replica use this: assets and indexed chain state. Writes,
//! authentication and everything else stay on the primary.

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dalp_db::ha::{Lsn, Position, Served, Session};

use crate::{ApiError, AppState};

pub const CONSISTENCY_HEADER: &str = "x-dalp-consistency";
pub const READ_FROM_HEADER: &str = "x-dalp-read-from";

/// The read-your-writes position a read must see (none: any replica within the lag bound).
#[derive(Debug, Clone, Default)]
pub struct ReadAt(pub Session);

/// A token that is not a WAL position.
struct Malformed;

/// The session the request's token asks for: empty when the token is absent or empty.
fn token(req: &Request) -> Result<Session, Malformed> {
    let Some(v) = req
        .headers()
        .get(CONSISTENCY_HEADER)
        .filter(|v| !v.is_empty())
    else {
        return Ok(Session::default());
    };
    let text = v.to_str().map_err(|_| Malformed)?.trim();
    if text.contains('@') {
        let p = text.parse::<Position>().map_err(|_| Malformed)?;
        let mut session = Session::default();
        session.saw(p);
        return Ok(session);
    }
    Ok(Session {
        last_commit: Some(text.parse::<Lsn>().map_err(|_| Malformed)?),
        timeline: None,
    })
}

pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // Checked with or without replicas, so a client learns of a malformed token wherever
    // it is deployed (without replicas every read is on the primary anyway).
    let Ok(session) = token(&req) else {
        return malformed();
    };
    let Some(replicas) = state.replicas.clone() else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        req.extensions_mut().insert(ReadAt(session));
        return next.run(req).await;
    }
    let mut resp = next.run(req).await;
    if resp.status().is_success() {
        match replicas.any().primary_position().await {
            Ok(position) => {
                if let Ok(v) = HeaderValue::from_str(&position.to_string()) {
                    resp.headers_mut()
                        .insert(HeaderName::from_static(CONSISTENCY_HEADER), v);
                }
            }
            Err(e) => tracing::warn!(error = %e, "no consistency token for a change"),
        }
    }
    resp
}

fn malformed() -> Response {
    ApiError::BadRequest(format!(
        "{CONSISTENCY_HEADER} must be the value (X/Y@timeline) a change answered with"
    ))
    .into_response()
}

/// `x-dalp-read-from` for where a read was served.
pub fn read_from(served: &Served) -> (HeaderName, HeaderValue) {
    let text = match served {
        Served::Primary => "primary".to_string(),
        Served::Replica(name) => format!("replica {name}"),
    };
    (
        HeaderName::from_static(READ_FROM_HEADER),
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("replica")),
    )
}

impl AppState {
    /// The pool a replica-safe read of `component` at `at` uses, and where it reads; `None`
    /// without replicas (the component's own store then reads).
    async fn replica_pool(
        &self,
        component: dalp_db::Component,
        at: Option<&ReadAt>,
    ) -> Option<(deadpool_postgres::Pool, Served)> {
        let router = self.replicas.as_ref()?.router(component)?;
        Some(router.read_pool(&at.cloned().unwrap_or_default().0).await)
    }

    /// The asset store a replica-safe read at `at` uses, and where it reads.
    pub(crate) async fn assets_reader(
        &self,
        at: Option<&ReadAt>,
    ) -> (dalp_assets::AssetStore, Served) {
        match self.replica_pool(dalp_db::Component::Assets, at).await {
            Some((pool, served)) => (dalp_assets::AssetStore::new(pool), served),
            None => (self.assets.clone(), Served::Primary),
        }
    }

    /// The indexed-state store a replica-safe read at `at` uses, and where it reads.
    pub(crate) async fn indexed_reader(
        &self,
        at: Option<&ReadAt>,
    ) -> (std::sync::Arc<dalp_indexed::IndexedStore>, Served) {
        match self.replica_pool(dalp_db::Component::Indexer, at).await {
            Some((pool, served)) => (
                std::sync::Arc::new(dalp_indexed::IndexedStore::new(pool)),
                served,
            ),
            None => (self.indexed.clone(), Served::Primary),
        }
    }
}
