//! Cache invalidation across two API processes sharing one database.

use std::time::Duration;

use dalp_api::ApiSettings;
use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};

use crate::helpers::{spawn_app, spawn_app_on, Cred};

async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_session_revoked_in_one_process_is_refused_by_the_other() {
    let a = spawn_app().await;
    let b = spawn_app_on(a.db.clone(), a.key_dir.clone(), ApiSettings::default()).await;
    a.create_user("two@bank.example", &[PlatformRole::Auditor])
        .await;
    let token = a.token("two@bank.example").await;

    // B validates twice: the second time from its cache.
    for _ in 0..2 {
        let (s, _) = b
            .call(Method::GET, "/api/v1/me", Cred::Token(&token), None)
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let b_cache = b.store().cache().clone();
    assert!(b_cache.stats().hits >= 1, "{:?}", b_cache.stats());
    let before = b_cache.stats().invalidations;

    // A revokes (logout); B hears the NOTIFY and refuses right after.
    let (s, _) = a
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            Cred::Token(&token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    wait_for(
        || b_cache.stats().invalidations > before,
        "B's invalidation",
    )
    .await;
    let (s, _) = b
        .call(Method::GET, "/api/v1/me", Cred::Token(&token), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_dropped_listen_connection_flushes_the_cache() {
    let app = spawn_app().await;
    app.create_user("flush@bank.example", &[]).await;
    let token = app.token("flush@bank.example").await;
    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let cache = app.store().cache().clone();
    assert!(!cache.is_empty());
    let flushes = cache.stats().flushes;

    // Kill the listener's backend from the server side.
    let killed = app
        .scalar_i64(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'dalp-identity-cache' AND datname = current_database()) t",
        )
        .await;
    assert_eq!(killed, 1);
    wait_for(|| cache.stats().flushes > flushes, "flush after the drop").await;
    // While reconnecting nothing is served from the cache; afterwards it works again.
    wait_for(|| cache.is_listening(), "reconnect").await;
    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_changed_profile_is_fresh_at_once_in_the_writer_and_in_the_other_once_notified() {
    let a = spawn_app().await;
    let b = spawn_app_on(a.db.clone(), a.key_dir.clone(), ApiSettings::default()).await;
    let id = a
        .create_user("profile@bank.example", &[PlatformRole::Auditor])
        .await;
    let token = a.token("profile@bank.example").await;
    // Both come to serve `/me` from their caches: two hits, the session and the profile.
    // The login's own notification may still be on its way and empty a cache once (it
    // names the user), so each process gets a few tries.
    for app in [&a, &b] {
        let mut cached = false;
        for _ in 0..100 {
            let hits = app.store().cache().stats().hits;
            roles(app, &token).await;
            if app.store().cache().stats().hits == hits + 2 {
                cached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(cached, "the profile was never served from the cache");
    }
    let ctx = dalp_identity::RequestContext {
        actor: "test".into(),
        ..Default::default()
    };
    a.store()
        .grant_role(&ctx, id, PlatformRole::TokenManager)
        .await
        .unwrap();
    // The writing process evicted at commit; the other once the NOTIFY arrives.
    assert_eq!(
        roles(&a, &token).await,
        serde_json::json!(["auditor", "tokenManager"])
    );
    // B serves its cached profile until the NOTIFY arrives, then the new one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = roles(&b, &token).await;
        if r == serde_json::json!(["auditor", "tokenManager"]) {
            break;
        }
        assert_eq!(r, serde_json::json!(["auditor"]));
        assert!(
            std::time::Instant::now() < deadline,
            "B still serves the old profile 10 s after the change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The roles `/me` reports to `token` on `app`.
async fn roles(app: &crate::helpers::TestApp, token: &str) -> serde_json::Value {
    let (s, body) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(token), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["user"]["roles"].clone()
}
