//! The HTTP service: composes the domain stores behind one axum router under `/api/v1`, with
//! one JSON error shape ([`error::ApiError`]), our own JSON extractor so rejected bodies use
//! it too, and authentication by session token or API key. Each endpoint group lives in its
//! own file under `routes/`.

// The OpenAPI document is one large json! literal.
#![recursion_limit = "512"]

pub mod auth;
pub mod catalog;
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

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub max_body_bytes: usize,
    pub login_attempts_per_minute: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        let d = dalp_db::config::ApiConfig::default();
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
}

/// What `/metrics` knows about backups: per repository, the end of its newest backup.
#[derive(Debug, Clone, Default)]
pub struct BackupSnapshot {
    pub newest_by_repo: Vec<(u8, chrono::DateTime<chrono::Utc>)>,
}

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
        }
    }
}

/// Everything a serving process runs: the shared state, the identity cache's LISTEN
/// connection and the audit sealer (both stopped when this is dropped).
pub struct Services {
    pub state: AppState,
    _identity_listener: dalp_db::cache::ListenerHandle,
    _assets_listener: dalp_db::cache::ListenerHandle,
    sealer: tokio::task::JoinHandle<()>,
}

impl Drop for Services {
    fn drop(&mut self) {
        self.sealer.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] dalp_identity::crypto::CryptoError),
    #[error(transparent)]
    AuditKey(#[from] dalp_audit::chain::KeyError),
}

/// Most `api.request` events in one commit, and how many may wait for the writer before
/// requests wait for room (backpressure).
pub const REQUEST_AUDIT_BATCH: usize = 512;
pub const REQUEST_AUDIT_QUEUE: usize = 8192;
/// Group commits in flight at once. One: on 2 cores a second writer measured no gain (3348
/// vs 3796 req/s on `GET /me`, docs/benchmarks.md).
pub const REQUEST_AUDIT_WRITERS: usize = 1;

/// File names inside the keys directory.
pub const KEK_FILE: &str = "kek.json";
pub const AUDIT_KEY_FILE: &str = "audit-ed25519.json";
/// The public half of the chain's first audit key: the verifiers' trust anchor (later keys
/// are trusted through rotation batches), for verifiers that must not hold a signing key.
pub const AUDIT_PUBLIC_KEY_FILE: &str = "audit-ed25519.pub.json";
/// The directory (inside the keys directory, which is kept outside the database and backed
/// up with the key bundle) where the sealer witnesses the signed chain head.
pub const AUDIT_WITNESS_DIR: &str = "audit-witness";
/// The audit keys a verifier trusts for the keys directory `keys_dir`: the trust anchor
/// (the first key's public half) when it exists, else the signing key's public half.
/// Later keys are trusted through the chain's rotation batches.
pub fn trusted_audit_keys(
    keys_dir: &std::path::Path,
) -> Result<dalp_audit::TrustedKeys, dalp_audit::chain::KeyError> {
    let mut keys = dalp_audit::TrustedKeys::default();
    let anchor = keys_dir.join(AUDIT_PUBLIC_KEY_FILE);
    if anchor.exists() {
        keys.load(&anchor)?;
    } else {
        keys.load(&keys_dir.join(AUDIT_KEY_FILE))?;
    }
    Ok(keys)
}

/// How often the sealer witnesses the chain head (when it moved).
pub const WITNESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the sealer runs; keeps seal lag well under a second.
pub const SEAL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl Services {
    /// Builds the stores over `pools` with the key files in `keys_dir`, starts the identity
    /// cache listener (a direct connection as the identity role) and the audit sealer.
    pub fn start(
        pools: Arc<ComponentPools>,
        keys_dir: &std::path::Path,
        settings: ApiSettings,
    ) -> Result<Services, StartError> {
        use dalp_db::Component;
        let keys = Arc::new(dalp_identity::crypto::FileKeyProvider::open_or_create(
            &keys_dir.join(KEK_FILE),
        )?);
        // A missing key file gets a new key, but a new key never continues an existing
        // chain: the sealer refuses (and says so) until the original key is restored.
        let audit_key = Arc::new(dalp_audit::AuditKey::open_or_create(
            &keys_dir.join(AUDIT_KEY_FILE),
        )?);
        // The public key of the chain's first key is the verifiers' trust anchor; later
        // keys are trusted through the rotation batches, so the file is never rewritten.
        let anchor = keys_dir.join(AUDIT_PUBLIC_KEY_FILE);
        if !anchor.exists() {
            audit_key.write_public(&anchor)?;
        }
        let audit_keys = trusted_audit_keys(keys_dir)?;
        let witness = dalp_audit::Witness::new(keys_dir.join(AUDIT_WITNESS_DIR));
        let sealer =
            dalp_audit::Sealer::new(pools.get(Component::AuditSealer).clone(), audit_key.clone())
                .with_witness(witness.clone(), WITNESS_INTERVAL)
                .with_key_file(keys_dir.join(AUDIT_KEY_FILE))
                .spawn(SEAL_INTERVAL);
        let cache = dalp_db::cache::InvalidatingCache::new(100_000);
        let mut listen = pools.options(Component::Identity).clone();
        listen.application_name = "dalp-identity-cache".into();
        listen.statement_timeout = None;
        let listener = dalp_db::cache::spawn_listener(
            listen,
            dalp_identity::store::CACHE_CHANNEL,
            cache.clone(),
        );
        let identity = IdentityStore::new(pools.get(Component::Identity).clone(), keys, cache);
        let assets_cache = dalp_db::cache::InvalidatingCache::new(10_000);
        let mut assets_listen = pools.options(Component::Assets).clone();
        assets_listen.application_name = "dalp-assets-cache".into();
        assets_listen.statement_timeout = None;
        let assets_listener = dalp_db::cache::spawn_listener(
            assets_listen,
            dalp_assets::settings::CACHE_CHANNEL,
            assets_cache.clone(),
        );
        let mut state = AppState::new(pools.clone(), identity, settings);
        state.assets =
            dalp_assets::AssetStore::with_cache(pools.get(Component::Assets).clone(), assets_cache);
        state.audit_keys = Some(audit_keys);
        state.audit_witness = Some(witness);
        Ok(Services {
            state,
            _identity_listener: listener,
            _assets_listener: assets_listener,
            sealer,
        })
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }
}

/// The full router.
pub fn router(state: AppState) -> Router {
    routes::router()
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_audit::record,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.settings.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn(routes::reject_bad_target))
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
