//! What "a running dalp" is, without HTTP: the catalog of the five schemas ([`catalog`]),
//! the key files ([`keys`]), the stores and background tasks a serving process starts
//! ([`App::start`]: key providers, the identity and asset caches with their LISTEN
//! connections, the audit sealer with its witness) and the store telemetry
//! ([`telemetry`]). `dalp-api` puts HTTP on top of an [`App`]; `dalp-cli` starts one for
//! `dalp up` and `dalp serve` and uses the catalog and key files for every other verb.

pub mod catalog;
pub mod config;
pub mod keys;
pub mod telemetry;

use std::sync::{Arc, RwLock};

use dalp_db::{Component, ComponentPools};
use dalp_identity::IdentityStore;

/// What `/metrics` knows about backups: per repository, the end of its newest backup.
#[derive(Debug, Clone, Default)]
pub struct BackupSnapshot {
    pub newest_by_repo: Vec<(u8, chrono::DateTime<chrono::Utc>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] dalp_identity::crypto::CryptoError),
    #[error(transparent)]
    AuditKey(#[from] dalp_audit::chain::KeyError),
    #[error(transparent)]
    Replicas(#[from] dalp_db::pool::PoolError),
}

/// The stores of a serving process and what keeps them right: the identity and asset
/// caches' LISTEN connections and the audit sealer (stopped when this is dropped).
pub struct App {
    pub pools: Arc<ComponentPools>,
    pub identity: IdentityStore,
    pub assets: dalp_assets::AssetStore,
    pub indexed: Arc<dalp_indexed::IndexedStore>,
    pub workflows: dalp_workflows::WorkflowStore,
    /// The keys audit batches may be signed by.
    pub audit_keys: dalp_audit::TrustedKeys,
    /// Where the sealer witnesses the chain head; verification checks every head there.
    pub audit_witness: dalp_audit::Witness,
    /// The newest backups as last read from the repositories (kept fresh by `dalp up`).
    pub backups: Arc<RwLock<Option<BackupSnapshot>>>,
    /// Replica reads (assets, indexed chain state), when replicas are configured.
    pub replicas: Option<Arc<dalp_db::ha::ReadReplicas>>,
    _identity_listener: dalp_db::cache::ListenerHandle,
    _assets_listener: dalp_db::cache::ListenerHandle,
    sealer: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.sealer.abort();
    }
}

/// A cache kept right by NOTIFY on `channel`, over a direct connection as `component`.
fn listened_cache<V: Clone + Send + Sync + 'static>(
    pools: &ComponentPools,
    component: Component,
    name: &str,
    channel: &'static str,
    capacity: usize,
) -> (
    Arc<dalp_db::cache::InvalidatingCache<V>>,
    dalp_db::cache::ListenerHandle,
) {
    let cache = dalp_db::cache::InvalidatingCache::new(capacity);
    let mut listen = pools.options(component).clone();
    listen.application_name = name.into();
    listen.statement_timeout = None;
    let listener = dalp_db::cache::spawn_listener(listen, channel, cache.clone());
    (cache, listener)
}

impl App {
    /// Builds the stores over `pools` with the key files in `keys_dir`, starts the cache
    /// listeners (direct connections as the identity and asset roles) and the audit sealer.
    pub fn start(
        pools: Arc<ComponentPools>,
        keys_dir: &std::path::Path,
    ) -> Result<App, StartError> {
        let key_provider = Arc::new(dalp_identity::crypto::FileKeyProvider::open_or_create(
            &keys_dir.join(keys::KEK_FILE),
        )?);
        // A missing key file gets a new key, but a new key never continues an existing
        // chain: the sealer refuses (and says so) until the original key is restored.
        let audit_key = Arc::new(dalp_audit::AuditKey::open_or_create(
            &keys_dir.join(keys::AUDIT_KEY_FILE),
        )?);
        // The public key of the chain's first key is the verifiers' trust anchor; later
        // keys are trusted through the rotation batches, so the file is never rewritten.
        let anchor = keys_dir.join(keys::AUDIT_PUBLIC_KEY_FILE);
        if !anchor.exists() {
            audit_key.write_public(&anchor)?;
        }
        let audit_keys = keys::trusted_audit_keys(keys_dir)?;
        let witness = dalp_audit::Witness::new(keys_dir.join(keys::AUDIT_WITNESS_DIR));
        let sealer =
            dalp_audit::Sealer::new(pools.get(Component::AuditSealer).clone(), audit_key.clone())
                .with_witness(witness.clone(), keys::WITNESS_INTERVAL)
                .with_key_file(keys_dir.join(keys::AUDIT_KEY_FILE))
                .spawn(keys::SEAL_INTERVAL);
        let (identity_cache, identity_listener) = listened_cache(
            &pools,
            Component::Identity,
            "dalp-identity-cache",
            dalp_identity::store::CACHE_CHANNEL,
            100_000,
        );
        let (assets_cache, assets_listener) = listened_cache(
            &pools,
            Component::Assets,
            "dalp-assets-cache",
            dalp_assets::settings::CACHE_CHANNEL,
            10_000,
        );
        Ok(App {
            identity: IdentityStore::new(
                pools.get(Component::Identity).clone(),
                key_provider,
                identity_cache,
            ),
            assets: dalp_assets::AssetStore::with_cache(
                pools.get(Component::Assets).clone(),
                assets_cache,
            ),
            indexed: Arc::new(dalp_indexed::IndexedStore::new(
                pools.get(Component::Indexer).clone(),
            )),
            workflows: dalp_workflows::WorkflowStore::new(pools.get(Component::Workflows).clone()),
            audit_keys,
            audit_witness: witness,
            backups: Arc::default(),
            replicas: None,
            pools,
            _identity_listener: identity_listener,
            _assets_listener: assets_listener,
            sealer,
        })
    }

    /// Reads that tolerate a replica (assets, indexed chain state) go to `replicas`
    /// (`host`, `port`; a listed node that is the primary now is read as the primary), each
    /// within the lag bound, or having replayed the client's consistency token.
    pub fn with_replicas(
        mut self,
        replicas: &[(String, u16)],
    ) -> Result<App, dalp_db::pool::PoolError> {
        if !replicas.is_empty() {
            self.replicas = Some(Arc::new(dalp_db::ha::ReadReplicas::new(
                &self.pools,
                replicas,
                dalp_db::ha::RouterOptions {
                    pool_size: self.pools.get(Component::Assets).status().max_size,
                    ..Default::default()
                },
            )?));
        }
        Ok(self)
    }
}
