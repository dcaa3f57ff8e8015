//! The request boundary: text PostgreSQL cannot hold, names longer than their column, methods
//! and targets no route takes — each refused with a precise 4xx in the one JSON error shape,
//! nothing stored.

use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{spawn_app, Cred};

#[tokio::test]
async fn nul_in_any_json_text_is_422_and_stores_nothing() {
    let app = spawn_app().await;
    app.create_user("ops@bank.example", &[PlatformRole::SystemManager])
        .await;
    let t = app.token("ops@bank.example").await;
    let cases = [
        (
            "/api/v1/indexed/chains",
            json!({"chain_id": 8, "name": "eight\u{0}"}),
        ),
        (
            "/api/v1/workflows/runs",
            json!({"kind": "selftest", "idempotency_key": "k\u{0}", "input": {}}),
        ),
        (
            "/api/v1/workflows/runs",
            json!({"kind": "selftest", "idempotency_key": "k", "input": {"deep": ["\u{0}"]}}),
        ),
        (
            "/api/v1/api-keys",
            json!({"name": "n\u{0}", "scope": "read"}),
        ),
    ];
    for (path, body) in cases {
        let (s, b) = app
            .call(Method::POST, path, Cred::Token(&t), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("U+0000"),
            "{b}"
        );
    }
    for table in [
        "dalp_indexed.chains",
        "dalp_workflows.runs",
        "dalp_identity.api_keys",
    ] {
        assert_eq!(
            app.scalar_i64(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}"
        );
    }
}

#[tokio::test]
async fn bad_targets_methods_and_overlong_names_get_precise_json_errors() {
    let app = spawn_app().await;
    app.create_user("ops@bank.example", &[PlatformRole::SystemManager])
        .await;
    let t = app.token("ops@bank.example").await;
    // %00 in a query or path, bytes that are not UTF-8 in a path: 400, before any handler.
    for path in [
        "/api/v1/audit/events?actor=a%00b",
        "/api/v1/users/%00",
        "/api/v1/users/%FF%FE",
    ] {
        let (s, b) = app.call(Method::GET, path, Cred::Token(&t), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {b}");
    }
    // A method the route does not take: 405 in the JSON shape (no longer an empty body).
    let (s, b) = app
        .call(
            Method::DELETE,
            "/api/v1/workflows/stats",
            Cred::Token(&t),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b["error"]["code"], "method_not_allowed");
    let (s, b) = app
        .call(Method::GET, "/api/v1/no/such/thing", Cred::None, None)
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    // An API-key name longer than its column (100) is 422 naming the field, not a 500.
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&t),
            Some(json!({"name": "k".repeat(150), "scope": "read"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["field"], "name");
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&t),
            Some(json!({"name": "k".repeat(100), "scope": "read"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn duplicate_roles_and_bans_that_already_ended_are_refused_naming_the_field() {
    let app = spawn_app().await;
    app.create_user("root@bank.example", &[PlatformRole::Admin])
        .await;
    let t = app.admin_token("root@bank.example").await;
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/users",
            Cred::Token(&t),
            Some(json!({"email": "dup@bank.example", "name": "Dup", "roles": ["auditor", "auditor"]})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["field"], "roles", "{b}");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.users WHERE email = 'dup@bank.example'")
            .await,
        0
    );
    let target = app.create_user("someone@bank.example", &[]).await;
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{target}"),
            Cred::Token(&t),
            Some(json!({"ban": {"reason": "fraud", "until": "2020-01-01T00:00:00Z"}})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["field"], "until", "{b}");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.users WHERE banned")
            .await,
        0
    );
    // A ban into the future is taken.
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{target}"),
            Cred::Token(&t),
            Some(json!({"ban": {"reason": "fraud", "until": "2099-01-01T00:00:00Z"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn an_admin_cannot_lock_themselves_out_and_integral_numbers_are_integers() {
    let app = spawn_app().await;
    let me = app
        .create_user("self@bank.example", &[PlatformRole::Admin])
        .await;
    let t = app.admin_token("self@bank.example").await;
    for (method, path, body) in [
        (Method::DELETE, format!("/api/v1/users/{me}"), None),
        (
            Method::PATCH,
            format!("/api/v1/users/{me}"),
            Some(json!({"ban": {"reason": "oops"}})),
        ),
        (
            Method::DELETE,
            format!("/api/v1/users/{me}/roles/admin"),
            None,
        ),
    ] {
        let (s, b) = app.call(method.clone(), &path, Cred::Token(&t), body).await;
        assert_eq!(s, StatusCode::CONFLICT, "{method} {path}: {b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("your own account"),
            "{b}"
        );
    }
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&t), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["user"]["banned"], false);
    assert!(b["user"]["roles"]
        .as_array()
        .unwrap()
        .contains(&json!("admin")));
    // JSON has one number type: 60.0 is the integer 60; 60.5 is still refused.
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&t),
            Some(json!({"name": "n", "scope": "read", "rate_limit_per_minute": 60.0})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["api_key"]["rate_limit_per_minute"], 60);
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&t),
            Some(json!({"name": "m", "scope": "read", "rate_limit_per_minute": 60.5})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn references_to_organisations_that_do_not_exist_are_refused_naming_the_field() {
    let app = spawn_app().await;
    app.create_user(
        "ops@bank.example",
        &[
            PlatformRole::Admin,
            PlatformRole::TokenManager,
            PlatformRole::SystemManager,
        ],
    )
    .await;
    let t = app.admin_token("ops@bank.example").await;
    let nowhere = "00000000-0000-4000-8000-00000000dead";
    for (path, body) in [
        (
            "/api/v1/assets",
            json!({"organisation_id": nowhere, "name": "Tower", "symbol": "TWR", "decimals": 2, "base_type": "real_estate"}),
        ),
        (
            "/api/v1/templates",
            json!({"organisation_id": nowhere, "slug": "t", "name": "T", "base_type": "bond", "asset_class": "fixed_income"}),
        ),
        (
            "/api/v1/workflows/runs",
            json!({"organisation_id": nowhere, "kind": "selftest", "idempotency_key": "k"}),
        ),
        (
            "/api/v1/workflows/tx-requests",
            json!({"organisation_id": nowhere, "chain_id": 1, "idempotency_key": "k",
                   "sender": "0x5fbdb2315678afecb367f032d93f642f64180aa3"}),
        ),
    ] {
        let (s, b) = app
            .call(Method::POST, path, Cred::Token(&t), Some(body))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {b}");
        assert_eq!(b["error"]["field"], "organisation_id", "{path}: {b}");
    }
    let (s, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/settings/{nowhere}"),
            Cred::Token(&t),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["error"]["message"], "organisation not found");
    for table in [
        "dalp_assets.assets",
        "dalp_assets.templates",
        "dalp_workflows.runs",
        "dalp_workflows.tx_requests",
    ] {
        assert_eq!(
            app.scalar_i64(&format!(
                "SELECT count(*) FROM {table} WHERE organisation_id = '{nowhere}'"
            ))
            .await,
            0,
            "{table}"
        );
    }
}

#[tokio::test]
async fn oversized_heads_and_wrongly_shaped_json_get_precise_json_errors() {
    let app = spawn_app().await;
    // More header fields than the API takes: 431 in the JSON shape (not hyper's empty one).
    let mut req = app.http.get(format!("{}/api/v1/me", app.base));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "headers_too_large", "{b}");
    let r = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-big", "a".repeat(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Well-formed JSON of the wrong shape is 422, not "malformed JSON".
    app.create_user("tm@bank.example", &[PlatformRole::TokenManager])
        .await;
    let t = app.token("tm@bank.example").await;
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&t),
            Some(
                json!({"organisation_id": crate::helpers::ORG, "name": "X", "symbol": "X",
                        "decimals": 2, "base_type": {}}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        !b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed"),
        "{b}"
    );
}
