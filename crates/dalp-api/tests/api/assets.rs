//! Assets over HTTP: field-level 422s, ETag / If-Match concurrency, roles, history.

use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, Cred, TestApp};

fn bond() -> Value {
    json!({
        "organisation_id": "00000000-0000-4000-8000-000000000001",
        "name": "Green Bond 2030", "symbol": "GB30", "decimals": 6, "base_type": "bond",
        "isin": "US0378331005", "country_numeric": 442,
        "chain_id": 1, "contract_address": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "details": { "face_value": "1000.00", "maturity_date": "2030-12-31", "denomination_asset": "EUR" }
    })
}

async fn put(
    app: &TestApp,
    token: &str,
    id: &str,
    if_match: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = app
        .http
        .put(format!("{}/api/v1/assets/{id}", app.base))
        .bearer_auth(token)
        .json(&body);
    if let Some(m) = if_match {
        req = req.header("if-match", m);
    }
    let r = req.send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn token_managers_change_assets_with_field_errors_and_version_checks() {
    let app = spawn_app().await;
    app.create_user("tm@bank.example", &[PlatformRole::TokenManager])
        .await;
    app.create_user("aud@bank.example", &[PlatformRole::Auditor])
        .await;
    let tm = app.token("tm@bank.example").await;
    let aud = app.token("aud@bank.example").await;
    let count = "SELECT count(*) FROM dalp_assets.assets";

    for (field, value, expect) in [
        ("isin", json!("US0378331006"), "isin"),
        (
            "contract_address",
            json!("0x5aaeb6053F3E94C9b9A09f33669435E7Ef1BeAed"),
            "contract_address",
        ),
        ("decimals", json!(19), "decimals"),
        ("name", json!("x".repeat(51)), "name"),
        ("symbol", json!("gb 30"), "symbol"),
    ] {
        let mut b = bond();
        b[field] = value;
        let (s, body) = app
            .call(Method::POST, "/api/v1/assets", Cred::Token(&tm), Some(b))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        assert_eq!(body["error"]["field"], expect, "{body}");
    }
    let mut fund = bond();
    fund["base_type"] = json!("fund");
    fund["details"] = json!({ "management_fee_bps": 10001 });
    let (s, body) = app
        .call(Method::POST, "/api/v1/assets", Cred::Token(&tm), Some(fund))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "management_fee_bps");
    let mut float_face = bond();
    float_face["details"]["face_value"] = json!(1000.0);
    let (s, body) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(float_face),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "face_value");
    let mut b = bond();
    b["base_type"] = json!("tulip");
    let (s, _) = app
        .call(Method::POST, "/api/v1/assets", Cred::Token(&tm), Some(b))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        app.scalar_i64(count).await,
        0,
        "a rejected asset was written"
    );

    // Auditors read but do not write.
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&aud),
            Some(bond()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, body) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(bond()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let id = body["asset"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        body["asset"]["contract_address"],
        "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"
    );
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(bond()),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "duplicate ISIN");

    let r = app
        .http
        .get(format!("{}/api/v1/assets/{id}", app.base))
        .bearer_auth(&aud)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"1\"");

    let mut renamed = bond();
    renamed["name"] = json!("Green Bond 2031");
    let (s, _) = put(&app, &tm, &id, None, renamed.clone()).await;
    assert_eq!(s, StatusCode::PRECONDITION_REQUIRED);
    let (s, body) = put(&app, &tm, &id, Some("\"1\""), renamed.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["asset"]["version"], 2);
    // A second writer who read version 1 loses, and nothing changes.
    let mut other = bond();
    other["name"] = json!("Brown Bond");
    let (s, body) = put(&app, &tm, &id, Some("\"1\""), other).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "version_conflict");
    let (_, body) = app
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}"),
            Cred::Token(&aud),
            None,
        )
        .await;
    assert_eq!(body["asset"]["name"], "Green Bond 2031");

    let (s, body) = app
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}/history"),
            Cred::Token(&aud),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let versions = body["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1]["before"]["name"], "Green Bond 2030");
    assert_eq!(versions[1]["after"]["name"], "Green Bond 2031");
    assert!(versions[1]["changed_by"]
        .as_str()
        .unwrap()
        .starts_with("user:"));

    let r = app
        .http
        .delete(format!("{}/api/v1/assets/{id}", app.base))
        .bearer_auth(&tm)
        .header("if-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (s, _) = app
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}"),
            Cred::Token(&aud),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let audit = app
        .scalar_i64(&format!("SELECT count(*) FROM dalp_audit.events WHERE resource_type = 'asset' AND resource_id = '{id}'"))
        .await;
    assert_eq!(audit, 3, "create, update, delete");
}

#[tokio::test]
async fn compliance_changes_on_a_published_asset_need_a_second_person() {
    let app = spawn_app().await;
    app.create_user("tm2@bank.example", &[PlatformRole::TokenManager])
        .await;
    app.create_user("cm1@bank.example", &[PlatformRole::ComplianceManager])
        .await;
    app.create_user("cm2@bank.example", &[PlatformRole::ComplianceManager])
        .await;
    let tm = app.token("tm2@bank.example").await;
    let cm1 = app.token("cm1@bank.example").await;
    let cm2 = app.token("cm2@bank.example").await;
    let mut b = bond();
    b["isin"] = json!("GB0002634946");
    let (_, body) = app
        .call(Method::POST, "/api/v1/assets", Cred::Token(&tm), Some(b))
        .await;
    let id = body["asset"]["id"].as_str().unwrap().to_string();
    let url = format!("{}/api/v1/assets/{id}/compliance", app.base);
    let send = |token: &str, if_match: &str, modules: Value| {
        app.http
            .put(&url)
            .bearer_auth(token)
            .header("if-match", if_match)
            .json(&json!({ "modules": modules }))
            .send()
    };

    // Bad parameters: 422, nothing stored.
    let r = send(
        &cm1,
        "\"0\"",
        json!([{ "type": "TimeLock", "hold_seconds": -5 }]),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = send(&cm1, "\"0\"", json!([{ "type": "Teleport" }]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Token managers do not set compliance.
    let r = send(&tm, "\"0\"", json!([])).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Draft asset: applied at once.
    let r = send(
        &cm1,
        "\"0\"",
        json!([{ "type": "CountryAllowList", "countries": [442] }]),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Publish, then change: pending until someone else approves.
    let r = app
        .http
        .post(format!("{}/api/v1/assets/{id}/publish", app.base))
        .bearer_auth(&tm)
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&cm1, "\"1\"", json!([{ "type": "CountryAllowList", "countries": [442, 276] }, { "type": "InvestorCount", "max_investors": 499 }])).await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let change: Value = r.json().await.unwrap();
    let change_id = change["change_id"].as_str().unwrap().to_string();
    let (_, c) = app
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}/compliance"),
            Cred::Token(&cm1),
            None,
        )
        .await;
    assert_eq!(
        c["compliance"]["version"], 1,
        "a pending change was applied"
    );

    let approve = format!("/api/v1/compliance-changes/{change_id}/approve");
    let (s, b) = app
        .call(Method::POST, &approve, Cred::Token(&cm1), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["error"]["code"], "four_eyes");
    let (_, c) = app
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}/compliance"),
            Cred::Token(&cm1),
            None,
        )
        .await;
    assert_eq!(c["compliance"]["version"], 1);

    let (s, b) = app
        .call(Method::POST, &approve, Cred::Token(&cm2), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["compliance"]["version"], 2);
    assert_eq!(b["compliance"]["modules"][1]["max_investors"], 499);
    let (s, _) = app
        .call(Method::POST, &approve, Cred::Token(&cm2), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "approved twice");

    let su = app.db.superuser().await;
    let row = su
        .query_one("SELECT changed_by, approved_by FROM dalp_assets.compliance_versions WHERE asset_id = $1::text::uuid AND version = 2", &[&id])
        .await
        .unwrap();
    let (by, approved): (String, Option<String>) = (row.get(0), row.get(1));
    assert_ne!(Some(by), approved, "proposer and approver differ");
    let (s, h) = app
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}/compliance/history"),
            Cred::Token(&cm1),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["versions"].as_array().unwrap().len(), 2);
    assert!(
        h["versions"][1]["approved_by"]
            .as_str()
            .unwrap()
            .starts_with("user:"),
        "{h}"
    );
    let approvals = app
        .scalar_i64(
            "SELECT count(*) FROM dalp_audit.events WHERE action = 'assets.compliance.approve'",
        )
        .await;
    assert_eq!(approvals, 1);
}

#[tokio::test]
async fn published_templates_are_immutable_and_govern_asset_metadata() {
    let app = spawn_app().await;
    app.create_user("tpl@bank.example", &[PlatformRole::TokenManager])
        .await;
    let tm = app.token("tpl@bank.example").await;
    let org = "00000000-0000-4000-8000-000000000001";
    let template = json!({
        "organisation_id": org, "slug": "green-bond", "name": "Green bond", "base_type": "bond",
        "asset_class": "fixed_income", "features": ["maturity-redemption", "historical-balances"],
        "metadata_schema": [
            { "key": "face_value", "label": "Face value", "type": "decimal", "required": true, "mutable": false, "constraints": { "min": "0.01" } },
            { "key": "maturity_date", "label": "Maturity", "type": "date", "required": true }
        ]
    });
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/templates",
            Cred::Token(&tm),
            Some(template.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let tid = b["template"]["id"].as_str().unwrap().to_string();
    let mut bad = template.clone();
    bad["features"] = json!(["teleportation"]);
    bad["slug"] = json!("other");
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/templates",
            Cred::Token(&tm),
            Some(bad),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["error"]["field"], "features");

    // Assets cannot use a draft template.
    let mut asset = bond();
    asset["isin"] = json!("US5949181045");
    asset["template_id"] = json!(tid);
    asset["metadata"] = json!({ "face_value": "1000.00", "maturity_date": "2031-06-30" });
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(asset.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["error"]["field"], "template_id");

    let r = app
        .http
        .post(format!("{}/api/v1/templates/{tid}/publish", app.base))
        .bearer_auth(&tm)
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Published: key fields refused (nothing changes), the name may change.
    let mut changed = template.clone();
    changed["metadata_schema"][0]["required"] = json!(false);
    let r = app
        .http
        .put(format!("{}/api/v1/templates/{tid}", app.base))
        .bearer_auth(&tm)
        .header("if-match", "\"2\"")
        .json(&changed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "template_published");
    let mut renamed = template.clone();
    renamed["name"] = json!("Green bond (EU GBS)");
    let r = app
        .http
        .put(format!("{}/api/v1/templates/{tid}", app.base))
        .bearer_auth(&tm)
        .header("if-match", "\"2\"")
        .json(&renamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (s, h) = app
        .call(
            Method::GET,
            &format!("/api/v1/templates/{tid}/history"),
            Cred::Token(&tm),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        h["versions"].as_array().unwrap().len(),
        3,
        "create, publish, rename: {h}"
    );
    assert_eq!(h["versions"][2]["after"]["name"], "Green bond (EU GBS)");
    // The database refuses too, whoever writes.
    let svc = app.db.connect_as(dalp_db::Component::Assets).await;
    let e = svc
        .batch_execute(&format!(
            "UPDATE dalp_assets.templates SET slug = 'sneaky' WHERE id = '{tid}'"
        ))
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("is published"), "{e:?}");

    // Metadata follows the schema: field-level 422, then success, then immutability.
    let mut wrong = asset.clone();
    wrong["metadata"] = json!({ "face_value": 1000.0, "maturity_date": "2031-06-30" });
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(wrong),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["field"], "metadata");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_assets.assets")
            .await,
        0
    );
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(asset.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let aid = b["asset"]["id"].as_str().unwrap().to_string();
    let mut revalued = asset.clone();
    revalued["metadata"]["face_value"] = json!("2000.00");
    let (s, b) = put(&app, &tm, &aid, Some("\"1\""), revalued).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot change"),
        "{b}"
    );
    let mut moved = asset.clone();
    moved["metadata"]["maturity_date"] = json!("2032-06-30");
    let (s, b) = put(&app, &tm, &aid, Some("\"1\""), moved).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // Hidden templates disappear from the organisation's list.
    let (_, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/templates?organisation_id={org}"),
            Cred::Token(&tm),
            None,
        )
        .await;
    assert_eq!(b["templates"].as_array().unwrap().len(), 1);
    let (s, _) = app
        .call(
            Method::POST,
            &format!("/api/v1/templates/{tid}/visibility"),
            Cred::Token(&tm),
            Some(json!({ "organisation_id": org, "hidden": true })),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/templates?organisation_id={org}"),
            Cred::Token(&tm),
            None,
        )
        .await;
    assert_eq!(b["templates"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_changed_asset_is_never_served_stale_by_a_second_process() {
    let a = spawn_app().await;
    let b = crate::helpers::spawn_app_on(
        a.db.clone(),
        a.key_dir.clone(),
        dalp_api::ApiSettings::default(),
    )
    .await;
    a.create_user("tm3@bank.example", &[PlatformRole::TokenManager])
        .await;
    let tm = a.token("tm3@bank.example").await;
    let mut asset = bond();
    asset["isin"] = json!("US4592001014");
    let (_, body) = a
        .call(
            Method::POST,
            "/api/v1/assets",
            Cred::Token(&tm),
            Some(asset.clone()),
        )
        .await;
    let id = body["asset"]["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let (s, _) = b
            .call(
                Method::GET,
                &format!("/api/v1/assets/{id}"),
                Cred::Token(&tm),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let cache = b.services.state.assets.cache().clone();
    assert!(cache.stats().hits >= 1, "{:?}", cache.stats());
    let before = cache.stats().invalidations;
    asset["name"] = json!("Renamed Bond");
    let (s, _) = put(&a, &tm, &id, Some("\"1\""), asset).await;
    assert_eq!(s, StatusCode::OK);
    for _ in 0..200 {
        if cache.stats().invalidations > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (_, body) = b
        .call(
            Method::GET,
            &format!("/api/v1/assets/{id}"),
            Cred::Token(&tm),
            None,
        )
        .await;
    assert_eq!(
        body["asset"]["name"], "Renamed Bond",
        "B served a replaced asset"
    );
}
