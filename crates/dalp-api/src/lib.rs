//! The HTTP service: puts the stores of a [`dalp_app::App`] behind one axum router under
//! `/api/v1`, with one JSON error shape ([`error::ApiError`]), our own JSON extractor so
//! rejected bodies use it too, authentication by session token or API key, rate limits, the
//! group-committed request audit and TLS for the listener. Each endpoint group lives in its
//! own file under `routes/`. What a running dalp is beyond HTTP (catalog, key files, stores,
//! sealer, caches) is `dalp-app`.

// The OpenAPI document is one large json! literal.
#![recursion_limit = "512"]

pub mod auth;
pub mod consistency;
pub mod error;
pub mod extract;
pub mod limit;
pub mod request_audit;
mod routes;
pub mod server;
pub mod telemetry;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use dalp_db::ComponentPools;
use dalp_identity::IdentityStore;

pub use error::ApiError;
pub use routes::document as openapi_document;

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub max_body_bytes: usize,
    pub login_attempts_per_minute: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        let d = dalp_app::config::ApiConfig::default();
        ApiSettings {
            max_body_bytes: d.max_body_bytes,
            login_attempts_per_minute: d.login_attempts_per_minute,
        }
    }
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pools: Arc<ComponentPools>,
    pub identity: IdentityStore,
    pub limits: Arc<limit::RateLimiter>,
    pub settings: Arc<ApiSettings>,
    /// The keys audit batches may be signed by.
    pub audit_keys: Option<dalp_audit::TrustedKeys>,
    /// Where the sealer witnesses the chain head; verification checks every head there.
    pub audit_witness: Option<dalp_audit::Witness>,
    pub assets: dalp_assets::AssetStore,
    pub indexed: Arc<dalp_indexed::IndexedStore>,
    pub workflows: dalp_workflows::WorkflowStore,
    pub http_metrics: Arc<telemetry::HttpMetrics>,
    /// The newest backups as last read from the repositories (kept fresh by `dalp up`).
    pub backups: Arc<std::sync::RwLock<Option<BackupSnapshot>>>,
    /// Appends the per-request `api.request` events with group commit.
    pub request_audit: Arc<dalp_audit::GroupWriter>,
    /// Replica reads (see [`consistency`]), when replicas are configured.
    pub replicas: Option<Arc<dalp_db::ha::ReadReplicas>>,
}

pub use dalp_app::BackupSnapshot;

impl AppState {
    pub fn new(
        pools: Arc<ComponentPools>,
        identity: IdentityStore,
        settings: ApiSettings,
    ) -> AppState {
        AppState {
            request_audit: Arc::new(
                dalp_audit::GroupWriter::new(
                    pools.get(dalp_db::Component::Identity).clone(),
                    REQUEST_AUDIT_BATCH,
                    REQUEST_AUDIT_QUEUE,
                )
                .with_writers(REQUEST_AUDIT_WRITERS),
            ),
            assets: dalp_assets::AssetStore::new(pools.get(dalp_db::Component::Assets).clone()),
            http_metrics: Arc::default(),
            backups: Arc::default(),
            workflows: dalp_workflows::WorkflowStore::new(
                pools.get(dalp_db::Component::Workflows).clone(),
            ),
            indexed: Arc::new(dalp_indexed::IndexedStore::new(
                pools.get(dalp_db::Component::Indexer).clone(),
            )),
            pools,
            identity,
            limits: Arc::new(limit::RateLimiter::default()),
            settings: Arc::new(settings),
            audit_keys: None,
            audit_witness: None,
            replicas: None,
        }
    }
}

/// Everything a serving process runs: the [`dalp_app::App`] (stores, caches and their
/// LISTEN connections, the audit sealer; stopped when this is dropped) and the HTTP state
/// over it.
pub struct Services {
    pub app: dalp_app::App,
    pub state: AppState,
}

/// Most `api.request` events in one commit, and how many may wait for the writer before
/// requests wait for room (backpressure).
pub const REQUEST_AUDIT_BATCH: usize = 512;
pub const REQUEST_AUDIT_QUEUE: usize = 8192;
/// Group commits in flight at once. One: on 2 cores a second writer measured no gain (3348
/// vs 3796 req/s on `GET /me`, docs/benchmarks.md).
pub const REQUEST_AUDIT_WRITERS: usize = 1;

impl AppState {
    /// The HTTP state over `app`'s stores.
    pub fn over(app: &dalp_app::App, settings: ApiSettings) -> AppState {
        let mut state = AppState::new(app.pools.clone(), app.identity.clone(), settings);
        state.assets = app.assets.clone();
        state.indexed = app.indexed.clone();
        state.workflows = app.workflows.clone();
        state.audit_keys = Some(app.audit_keys.clone());
        state.audit_witness = Some(app.audit_witness.clone());
        state.backups = app.backups.clone();
        state.replicas = app.replicas.clone();
        state
    }
}

impl Services {
    /// Starts the [`dalp_app::App`] over `pools` with the key files in `keys_dir`, and the
    /// HTTP state over it.
    pub fn start(
        pools: Arc<ComponentPools>,
        keys_dir: &std::path::Path,
        settings: ApiSettings,
    ) -> Result<Services, dalp_app::StartError> {
        Self::start_with_replicas(pools, keys_dir, settings, &[])
    }

    /// [`Services::start`] with reads that tolerate a replica served by `replicas`
    /// (`host`, `port`; see [`consistency`]).
    pub fn start_with_replicas(
        pools: Arc<ComponentPools>,
        keys_dir: &std::path::Path,
        settings: ApiSettings,
        replicas: &[(String, u16)],
    ) -> Result<Services, dalp_app::StartError> {
        let app = dalp_app::App::start(pools, keys_dir)?.with_replicas(replicas)?;
        let state = AppState::over(&app, settings);
        Ok(Services { app, state })
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }
}

/// The most header fields, and bytes of header names and values, a request may carry (431
/// in the JSON error shape beyond them).
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

async fn bound_headers(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let h = req.headers();
    let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if h.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge.into_response();
    }
    next.run(req).await
}

/// The full router.
pub fn router(state: AppState) -> Router {
    routes::router()
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            consistency::layer,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_audit::record,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.settings.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn(routes::reject_bad_target))
        .layer(axum::middleware::from_fn(bound_headers))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: server::ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve_on(listener, app, limits, shutdown).await
}

/// Like [`serve`], over TLS with `config` (see [`tls::server_config`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
    app: Router,
    limits: server::ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tls::TlsListener::new(listener, config)?;
    server::serve_on(listener, app, limits, shutdown).await
}
