//! An in-process cache that never serves what a committed write has replaced, once the
//! write's notification has arrived.
//!
//! Writers call [`notify`] inside their transaction (PostgreSQL delivers it only on commit,
//! at most once per transaction, so use it only for low-volume domains). Each process keeps
//! one dedicated LISTEN connection ([`spawn_listener`]) that evicts entries by tag. While that
//! connection is down, the cache serves nothing and stores nothing, and it is flushed whenever
//! the connection drops or comes back, so no notification can be missed silently.
//!
//! A reader that misses the cache takes [`InvalidatingCache::generation`] before reading the
//! database and stores the result only if no invalidation arrived meanwhile; otherwise a
//! notification racing with the read could leave a stale entry behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, GenericClient};

use crate::connect::ConnectOptions;

/// Cache statistics, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub flushes: u64,
}

/// What the listener drives.
pub trait Invalidate: Send + Sync {
    fn invalidate(&self, tags: &[&str]);
    fn flush(&self);
    fn set_listening(&self, listening: bool);
}

struct Entry<V> {
    value: V,
    tags: Vec<String>,
}

/// A map whose entries carry tags (`user:<id>`, `session:<id>` …) and are evicted by tag.
pub struct InvalidatingCache<V> {
    entries: Mutex<HashMap<String, Entry<V>>>,
    generation: AtomicU64,
    listening: AtomicBool,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
}

impl<V: Clone + Send + Sync + 'static> InvalidatingCache<V> {
    /// An empty cache holding at most `capacity` entries. It serves nothing until a listener
    /// reports that it is listening.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(InvalidatingCache {
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<V>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<V> {
        if !self.listening.load(Ordering::Acquire) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let found = self.lock().get(key).map(|e| e.value.clone());
        match found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    /// Take this before reading the database on a miss; pass it to [`Self::insert`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores `value` unless an invalidation or flush happened since `generation` was taken,
    /// or the listener is down.
    pub fn insert(&self, key: String, value: V, tags: Vec<String>, generation: u64) {
        let mut entries = self.lock();
        // Checked under the lock that invalidation also takes, so the two cannot interleave.
        if !self.listening.load(Ordering::Acquire) || self.generation() != generation {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            // Simple and bounded: start over rather than track recency.
            entries.clear();
        }
        entries.insert(key, Entry { value, tags });
    }

    /// Removes one key locally (the writer's own process; others hear the notification).
    pub fn remove(&self, key: &str) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.remove(key);
    }

    /// Evicts `tag` in this process at once, so the writer never serves its own stale entry
    /// while its notification is still on the way.
    pub fn invalidate_local(&self, tag: &str) {
        Invalidate::invalidate(self, &[tag]);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Invalidate for InvalidatingCache<V> {
    fn invalidate(&self, tags: &[&str]) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        if tags.contains(&"*") {
            entries.clear();
            return;
        }
        entries.retain(|_, e| !e.tags.iter().any(|t| tags.contains(&t.as_str())));
    }

    fn flush(&self) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        entries.clear();
    }

    fn set_listening(&self, listening: bool) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
        self.listening.store(listening, Ordering::Release);
    }
}

/// Sends one notification carrying `tags` on `channel`, inside the caller's transaction.
pub async fn notify<C: GenericClient>(
    tx: &C,
    channel: &str,
    tags: &[String],
) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_notify($1, $2)", &[&channel, &tags.join(",")])
        .await?;
    Ok(())
}

/// Handle of a running listener; dropping it stops the listener.
pub struct ListenerHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps one LISTEN connection on `channel` (reconnecting with backoff) and drives `cache`.
/// `opts` should point at the primary directly, not through a transaction-mode pooler.
pub fn spawn_listener(
    opts: ConnectOptions,
    channel: &'static str,
    cache: Arc<dyn Invalidate>,
) -> ListenerHandle {
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&opts, channel, cache.as_ref()).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, channel, "cache listener connection failed"),
            }
            // Whatever happened, notifications may have been missed.
            cache.set_listening(false);
            cache.flush();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    ListenerHandle { task }
}

async fn listen_once(
    opts: &ConnectOptions,
    channel: &str,
    cache: &dyn Invalidate,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = opts.pg_config();
    let (client, mut conn) = config.connect(opts.tls()?).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cache listener connection lost");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", crate::sql::quote_ident(channel)))
        .await?;
    // Only now can no committed write go unheard; drop anything cached before.
    cache.flush();
    cache.set_listening(true);
    while let Some(payload) = rx.recv().await {
        let tags: Vec<&str> = payload.split(',').filter(|t| !t.is_empty()).collect();
        cache.invalidate(&tags);
    }
    driver.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_nothing_until_listening_and_evicts_by_tag() {
        let c = InvalidatingCache::<u32>::new(10);
        let g = c.generation();
        c.insert("a".into(), 1, vec!["user:1".into()], g);
        assert_eq!(c.get("a"), None, "not listening yet");
        c.set_listening(true);
        let g = c.generation();
        c.insert("a".into(), 1, vec!["user:1".into()], g);
        c.insert("b".into(), 2, vec!["user:2".into()], g);
        assert_eq!(c.get("a"), Some(1));
        c.invalidate(&["user:1"]);
        assert_eq!(c.get("a"), None);
        assert_eq!(c.get("b"), Some(2));
    }

    #[test]
    fn a_read_racing_an_invalidation_is_not_stored() {
        let c = InvalidatingCache::<u32>::new(10);
        c.set_listening(true);
        let g = c.generation();
        // The database read happens here; meanwhile a notification arrives.
        c.invalidate(&["user:1"]);
        c.insert("a".into(), 1, vec!["user:1".into()], g);
        assert_eq!(c.get("a"), None);
    }

    #[test]
    fn capacity_is_bounded() {
        let c = InvalidatingCache::<u32>::new(2);
        c.set_listening(true);
        for i in 0..5 {
            let g = c.generation();
            c.insert(format!("k{i}"), i, vec![], g);
        }
        assert!(c.len() <= 2);
    }
}
