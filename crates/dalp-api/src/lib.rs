//! The HTTP service: composes the domain stores behind one axum router under `/api/v1`, with
//! one JSON error shape ([`error::ApiError`]), our own JSON extractor so rejected bodies use
//! it too, and authentication by session token or API key. Each endpoint group lives in its
//! own file under `routes/`.

pub mod auth;
pub mod catalog;
pub mod error;
pub mod extract;
pub mod limit;
mod routes;

use std::net::SocketAddr;
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
}

impl AppState {
    pub fn new(
        pools: Arc<ComponentPools>,
        identity: IdentityStore,
        settings: ApiSettings,
    ) -> AppState {
        AppState {
            pools,
            identity,
            limits: Arc::new(limit::RateLimiter::default()),
            settings: Arc::new(settings),
        }
    }
}

/// Everything a serving process runs: the shared state and the identity cache's LISTEN
/// connection (stopped when this is dropped).
pub struct Services {
    pub state: AppState,
    _identity_listener: dalp_db::cache::ListenerHandle,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] dalp_identity::crypto::CryptoError),
}

impl Services {
    /// Builds the stores over `pools`, with the PII key file at `key_file`, and starts the
    /// identity cache listener on a direct connection as the identity role.
    pub fn start(
        pools: Arc<ComponentPools>,
        key_file: &std::path::Path,
        settings: ApiSettings,
    ) -> Result<Services, StartError> {
        use dalp_db::Component;
        let keys = Arc::new(dalp_identity::crypto::FileKeyProvider::open_or_create(
            key_file,
        )?);
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
        Ok(Services {
            state: AppState::new(pools, identity, settings),
            _identity_listener: listener,
        })
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }
}

/// The full router.
pub fn router(state: AppState) -> Router {
    routes::router()
        .layer(axum::extract::DefaultBodyLimit::max(
            state.settings.max_body_bytes,
        ))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
