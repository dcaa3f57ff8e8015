//! Organisation settings, currencies and FX rates over HTTP.

use std::time::Duration;

use dalp_api::ApiSettings;
use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_on, Cred, TestApp};

use crate::helpers::OTHER_ORG as ORG;

async fn put_settings(
    app: &TestApp,
    token: &str,
    if_match: &str,
    body: Value,
) -> (StatusCode, Value) {
    let r = app
        .http
        .put(format!("{}/api/v1/settings/{ORG}", app.base))
        .bearer_auth(token)
        .header("if-match", if_match)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_saved_setting_is_never_served_stale_by_a_second_process() {
    let a = spawn_app().await;
    let b = spawn_app_on(a.db.clone(), a.key_dir.clone(), ApiSettings::default()).await;
    a.create_user("admin@bank.example", &[PlatformRole::Admin])
        .await;
    let admin = a.admin_token("admin@bank.example").await;

    // Defaults before the first save.
    let (s, body) = b
        .call(
            Method::GET,
            &format!("/api/v1/settings/{ORG}"),
            Cred::Token(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["settings"]["base_currency"], "EUR");
    assert_eq!(body["settings"]["version"], 0);

    let (s, body) = put_settings(
        &a,
        &admin,
        "\"0\"",
        json!({ "base_currency": "USD", "target_currencies": ["EUR", "CHF"] }),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // B serves from its cache; the next save on A must reach it.
    for _ in 0..2 {
        let (_, body) = b
            .call(
                Method::GET,
                &format!("/api/v1/settings/{ORG}"),
                Cred::Token(&admin),
                None,
            )
            .await;
        if body["settings"]["base_currency"] == "USD" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b_cache = b.services.state.assets.cache().clone();
    let (_, body) = b
        .call(
            Method::GET,
            &format!("/api/v1/settings/{ORG}"),
            Cred::Token(&admin),
            None,
        )
        .await;
    assert_eq!(body["settings"]["base_currency"], "USD");
    assert!(b_cache.stats().hits >= 1, "{:?}", b_cache.stats());
    let before = b_cache.stats().invalidations;
    let (s, _) = put_settings(&a, &admin, "\"1\"", json!({ "base_currency": "GBP" })).await;
    assert_eq!(s, StatusCode::OK);
    for _ in 0..200 {
        if b_cache.stats().invalidations > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, body) = b
        .call(
            Method::GET,
            &format!("/api/v1/settings/{ORG}"),
            Cred::Token(&admin),
            None,
        )
        .await;
    assert_eq!(
        body["settings"]["base_currency"], "GBP",
        "B served a replaced setting"
    );
    assert_eq!(body["settings"]["version"], 2);

    // Stale, missing precondition, bad values: refused, nothing changed.
    let (s, body) = put_settings(&a, &admin, "\"1\"", json!({ "base_currency": "JPY" })).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (s, body) = put_settings(&a, &admin, "\"2\"", json!({ "base_currency": "XXX" })).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "base_currency");
    let (s, body) = put_settings(
        &a,
        &admin,
        "\"2\"",
        json!({ "base_currency": "EUR", "features": { "Bad Key": 1 } }),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // A currency listed twice is refused, naming the field (it was stored twice).
    let (s, body) = put_settings(
        &a,
        &admin,
        "\"2\"",
        json!({ "base_currency": "EUR", "target_currencies": ["CHF", "USD", "CHF"] }),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "target_currencies", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("CHF"),
        "{body}"
    );
    let r = a
        .http
        .put(format!("{}/api/v1/settings/{ORG}", a.base))
        .bearer_auth(&admin)
        .json(&json!({ "base_currency": "EUR" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_REQUIRED);
    let versions = a
        .scalar_i64("SELECT count(*) FROM dalp_assets.settings_versions")
        .await;
    assert_eq!(versions, 2);
    let (s, h) = a
        .call(
            Method::GET,
            &format!("/api/v1/settings/{ORG}/history"),
            Cred::Token(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["versions"][1]["before"]["base_currency"], "USD", "{h}");
    assert_eq!(h["versions"][1]["after"]["base_currency"], "GBP", "{h}");
    let audited = a
        .scalar_i64(
            "SELECT count(*) FROM dalp_audit.events WHERE action = 'assets.settings.update'",
        )
        .await;
    assert_eq!(audited, 2);

    // Non-admins cannot read settings.
    a.create_user("plain@bank.example", &[]).await;
    let plain = a.token("plain@bank.example").await;
    let (s, _) = a
        .call(
            Method::GET,
            &format!("/api/v1/settings/{ORG}"),
            Cred::Token(&plain),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn fx_rates_are_exact_and_the_latest_wins() {
    let app = spawn_app().await;
    app.create_user("fx@bank.example", &[PlatformRole::Admin])
        .await;
    let admin = app.admin_token("fx@bank.example").await;
    let rate = |at: &str, r: Value| json!({ "base": "EUR", "quote": "USD", "provider": "ecb", "effective_at": at, "rate": r });
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/fx-rates",
            Cred::Token(&admin),
            Some(rate("2026-11-20T16:00:00Z", json!("1.0842"))),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/fx-rates",
            Cred::Token(&admin),
            Some(rate("2026-11-21T16:00:00Z", json!("1.084300000000000001"))),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    for (bad, field) in [
        (json!("1e3"), "rate"),
        (json!("0"), "rate"),
        (json!("-1.2"), "rate"),
        (json!("1.0000000000000000001"), "rate"),
    ] {
        let (s, b) = app
            .call(
                Method::POST,
                "/api/v1/fx-rates",
                Cred::Token(&admin),
                Some(rate("2026-11-22T16:00:00Z", bad)),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
        assert_eq!(b["error"]["field"], field);
    }
    // A float is not accepted where an exact decimal is required.
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/fx-rates",
            Cred::Token(&admin),
            Some(rate("2026-11-22T16:00:00Z", json!(1.08))),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, b) = app
        .call(
            Method::GET,
            "/api/v1/fx-rates/latest?base=EUR",
            Cred::Token(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["fx_rates"][0]["rate"], "1.084300000000000001", "{b}");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_assets.fx_rates")
            .await,
        2
    );
    let (_, b) = app
        .call(Method::GET, "/api/v1/currencies", Cred::Token(&admin), None)
        .await;
    assert!(b["currencies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["code"] == "EUR" && c["decimals"] == 2));
}
