//! Replica reads with read-your-writes over HTTP. With replicas configured
//! ([`dalp_app::App::with_replicas`]):
//! - every successful change answers with `x-dalp-consistency: X/Y`, the primary's WAL
//!   position after it (at or past its commit);
//! - a read that sends it back is served by a replica that has replayed that position
//!   (waiting up to the read-your-writes bound), else by the primary — it never sees data
//!   older than the client's write;
//! - a read without it goes to a replica within the lag bound;
//! - replica-served reads say where they came from: `x-dalp-read-from: replica HOST:PORT` or
//!   `primary`.
//!
//! Only reads that tolerate a replica use this: assets and indexed chain state. Writes,
//! authentication and everything else stay on the primary.

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dalp_db::ha::{Lsn, Served, Session};

use crate::{ApiError, AppState};

pub const CONSISTENCY_HEADER: &str = "x-dalp-consistency";
pub const READ_FROM_HEADER: &str = "x-dalp-read-from";

/// The read-your-writes position a read must see (none: any replica within the lag bound).
#[derive(Debug, Clone, Default)]
pub struct ReadAt(pub Session);

pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(replicas) = state.replicas.clone() else {
        // Without replicas every read is on the primary; a token is still checked, so a
        // client learns of a malformed one wherever it is deployed.
        if let Some(v) = req.headers().get(CONSISTENCY_HEADER) {
            if !v.is_empty()
                && v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<Lsn>().ok())
                    .is_none()
            {
                return malformed();
            }
        }
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        // An empty value is no token.
        let session = match req
            .headers()
            .get(CONSISTENCY_HEADER)
            .filter(|v| !v.is_empty())
        {
            None => Session::default(),
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<Lsn>().ok()) {
                Some(l) => Session {
                    last_commit: Some(l),
                },
                None => return malformed(),
            },
        };
        req.extensions_mut().insert(ReadAt(session));
        return next.run(req).await;
    }
    let mut resp = next.run(req).await;
    if resp.status().is_success() {
        match replicas.any().primary_lsn().await {
            Ok(lsn) => {
                if let Ok(v) = HeaderValue::from_str(&lsn.to_string()) {
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
        "{CONSISTENCY_HEADER} must be the WAL position (X/Y) a change answered with"
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
    /// The asset store a replica-safe read at `at` uses, and where it reads.
    pub(crate) async fn assets_reader(
        &self,
        at: Option<&ReadAt>,
    ) -> (dalp_assets::AssetStore, Served) {
        match self
            .replicas
            .as_ref()
            .and_then(|r| r.router(dalp_db::Component::Assets))
        {
            Some(router) => {
                let (pool, served) = router.read_pool(&at.cloned().unwrap_or_default().0).await;
                (dalp_assets::AssetStore::new(pool), served)
            }
            None => (self.assets.clone(), Served::Primary),
        }
    }

    /// The indexed-state store a replica-safe read at `at` uses, and where it reads.
    pub(crate) async fn indexed_reader(
        &self,
        at: Option<&ReadAt>,
    ) -> (std::sync::Arc<dalp_indexed::IndexedStore>, Served) {
        match self
            .replicas
            .as_ref()
            .and_then(|r| r.router(dalp_db::Component::Indexer))
        {
            Some(router) => {
                let (pool, served) = router.read_pool(&at.cloned().unwrap_or_default().0).await;
                (
                    std::sync::Arc::new(dalp_indexed::IndexedStore::new(pool)),
                    served,
                )
            }
            None => (self.indexed.clone(), Served::Primary),
        }
    }
}
