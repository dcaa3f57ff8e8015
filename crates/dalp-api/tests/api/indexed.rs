//! `/api/v1/indexed/...`: registration and ingest for writers only, validation with the
//! offending field named, conflicts for gaps and deep reorgs, paged reads, nothing changed
//! by refused requests.

use chrono::Utc;
use dalp_identity::types::PlatformRole;
use dalp_indexed::synth::Synth;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, Cred, TestApp};

fn batch(s: &Synth, from: i64, to: i64, parent_branch: u8) -> Value {
    let blocks: Vec<_> = s
        .blocks(from, to, parent_branch)
        .iter()
        .map(|b| b.to_input())
        .collect();
    json!({ "blocks": blocks, "head": to + 5 })
}

async fn counts(app: &TestApp) -> (i64, i64, i64) {
    (
        app.scalar_i64("SELECT count(*) FROM dalp_indexed.blocks")
            .await,
        app.scalar_i64("SELECT count(*) FROM dalp_indexed.transfers")
            .await,
        app.scalar_i64("SELECT count(*) FROM dalp_indexed.balances")
            .await,
    )
}

#[tokio::test]
async fn ingest_is_for_writers_validated_and_idempotent_and_reads_page() {
    let app = spawn_app().await;
    app.create_user("indexer@bank.example", &[PlatformRole::SystemManager])
        .await;
    app.create_user("reader@bank.example", &[]).await;
    let w = app.token("indexer@bank.example").await;
    let r = app.token("reader@bank.example").await;
    let reg = json!({"chain_id": 31337, "name": "anvil", "finality_depth": 4});

    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/indexed/chains",
            Cred::Token(&r),
            Some(reg.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/indexed/chains",
            Cred::Token(&w),
            Some(reg.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/indexed/chains",
            Cred::Token(&w),
            Some(reg),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "same settings: idempotent");
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/indexed/chains",
            Cred::Token(&w),
            Some(json!({"chain_id": 31337, "name": "other", "finality_depth": 4})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    let synth = Synth::new(8, 4, Utc::now() - chrono::Duration::hours(1));
    let path = "/api/v1/indexed/31337/blocks";
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&r),
            Some(batch(&synth, 0, 9, 0)),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&w),
            Some(batch(&synth, 0, 9, 0)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["ingest"]["applied"], 10);
    assert_eq!(b["ingest"]["transfers"], 8 + 9 * 4);
    let before = counts(&app).await;

    // Duplicate batch: a no-op.
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&w),
            Some(batch(&synth, 3, 9, 0)),
        )
        .await;
    assert_eq!(
        (
            s,
            b["ingest"]["applied"].clone(),
            b["ingest"]["skipped"].clone()
        ),
        (StatusCode::OK, json!(0), json!(7))
    );
    assert_eq!(counts(&app).await, before);

    // Gap, deep reorg, unknown chain.
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&w),
            Some(batch(&synth, 12, 13, 0)),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("gap")),
        "{b}"
    );
    let deep = synth.clone().on_branch(3);
    let mut body = batch(&synth, 2, 2, 0);
    let tail = batch(&deep, 3, 12, 0);
    body["blocks"]
        .as_array_mut()
        .unwrap()
        .extend(tail["blocks"].as_array().unwrap().iter().cloned());
    let (s, b) = app
        .call(Method::POST, path, Cred::Token(&w), Some(body))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("reorg_too_deep")),
        "{b}"
    );
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/indexed/5/blocks",
            Cred::Token(&w),
            Some(batch(&synth, 0, 0, 0)),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(counts(&app).await, before);

    // Malformed input: the field is named, nothing is stored.
    let mut bad = batch(&synth, 10, 10, 0);
    bad["blocks"][0]["logs"][0]["data"] = json!("0xnothex");
    let (s, b) = app
        .call(Method::POST, path, Cred::Token(&w), Some(bad))
        .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("data")),
        "{b}"
    );
    let mut bad = batch(&synth, 10, 10, 0);
    bad["blocks"][0]["logs"][0]["address"] = json!("0x5FBDB2315678afecb367f032d93f642f64180aA3");
    let (s, b) = app
        .call(Method::POST, path, Cred::Token(&w), Some(bad))
        .await;
    assert_eq!(
        (s, b["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("address")),
        "{b}"
    );
    assert!(
        b["error"]["message"].as_str().unwrap().contains("checksum"),
        "{b}"
    );
    let mut bad = batch(&synth, 10, 10, 0);
    bad["blocks"][0]["logs"][0]["data"] = json!(format!("0x01{}", "00".repeat(32)));
    let (s, b) = app
        .call(Method::POST, path, Cred::Token(&w), Some(bad))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("2^256-1"),
        "{b}"
    );
    let mut bad = batch(&synth, 10, 10, 0);
    bad["blocks"][0]["surprise"] = json!(1);
    let (s, b) = app
        .call(Method::POST, path, Cred::Token(&w), Some(bad))
        .await;
    assert!(s.is_client_error(), "{s} {b}");
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&w),
            Some(json!({"blocks": []})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(counts(&app).await, before);

    // Reads.
    let token = format!("0x{}", hex::encode(synth.token.0));
    let acct = format!("0x{}", hex::encode(synth.accounts[2].0));
    let (s, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/indexed/31337/accounts/{acct}/balances"),
            Cred::Token(&r),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let now_balance = b["balances"][0]["balance"].as_str().unwrap().to_string();
    let (_, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/indexed/31337/tokens/{token}/balances/{acct}?block=0"),
            Cred::Token(&r),
            None,
        )
        .await;
    assert_eq!(b["balance"], "1000000", "minted in block 0");
    let (_, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/indexed/31337/tokens/{token}/balances/{acct}"),
            Cred::Token(&r),
            None,
        )
        .await;
    assert_eq!(b["balance"].as_str(), Some(now_balance.as_str()));
    let (_, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/indexed/31337/tokens/{token}/supply?block=5"),
            Cred::Token(&r),
            None,
        )
        .await;
    assert_eq!(b["total_supply"], "8000000");

    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let q = next
            .as_ref()
            .map(|c| format!("&after={c}"))
            .unwrap_or_default();
        let (s, b) = app
            .call(
                Method::GET,
                &format!("/api/v1/indexed/31337/tokens/{token}/holders?limit=3{q}"),
                Cred::Token(&r),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        for h in b["holders"].as_array().unwrap() {
            seen.push(h["account"].as_str().unwrap().to_string());
        }
        match b["next"].as_str() {
            Some(c) => next = Some(c.to_string()),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8);

    let mut total = 0;
    let mut next: Option<String> = None;
    loop {
        let q = next
            .as_ref()
            .map(|c| format!("&before={c}"))
            .unwrap_or_default();
        let (s, b) = app
            .call(
                Method::GET,
                &format!("/api/v1/indexed/31337/tokens/{token}/transfers?limit=7{q}"),
                Cred::Token(&r),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        total += b["transfers"].as_array().unwrap().len();
        match b["next"].as_str() {
            Some(c) => next = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(total, 8 + 9 * 4);
    let until =
        (Utc::now() + chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (s, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/indexed/31337/accounts/{acct}/transfers?since=2020-01-01T00:00:00Z&until={until}&limit=1000"),
            Cred::Token(&r),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(!b["transfers"].as_array().unwrap().is_empty());
    let (_, b) = app
        .call(
            Method::GET,
            "/api/v1/indexed/31337/status",
            Cred::Token(&r),
            None,
        )
        .await;
    assert_eq!(
        (
            b["status"]["checkpoint"].clone(),
            b["status"]["head"].clone(),
            b["status"]["lag"].clone()
        ),
        (json!(9), json!(14), json!(5))
    );

    // Bad parameters: 400 with a message, never SQL; unknown chain 404; no credentials 401.
    for (path, want) in [
        (
            "/api/v1/indexed/31337/accounts/0xnothex/balances".to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/indexed/31337/accounts/' OR 1=1 --/balances".to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/indexed/31337;DROP TABLE dalp_indexed.blocks/status".to_string(),
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/api/v1/indexed/31337/tokens/{token}/holders?after=1' OR '1'='1:{acct}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/api/v1/indexed/31337/tokens/{token}/transfers?before=1;DROP"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/api/v1/indexed/31337/tokens/{token}/transfers?since=yesterday"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/api/v1/indexed/31337/tokens/{token}/transfers?limit=100000"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/api/v1/indexed/31337/tokens/{token}/supply?block=-1"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/api/v1/indexed/999/tokens/{token}/supply"),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (s, b) = app.call(Method::GET, &path, Cred::Token(&r), None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    let (s, _) = app
        .call(
            Method::GET,
            "/api/v1/indexed/31337/status",
            Cred::None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(counts(&app).await, before);
}

#[tokio::test]
async fn an_oversized_ingest_body_is_refused() {
    let app = spawn_app().await;
    app.create_user("indexer@bank.example", &[PlatformRole::SystemManager])
        .await;
    let w = app.token("indexer@bank.example").await;
    let huge = "0x".to_string() + &"00".repeat(17 * 1024 * 1024);
    let body =
        json!({"blocks": [{"number": 0, "hash": huge, "parent_hash": "0x", "timestamp": 0}]});
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/indexed/1/blocks",
            Cred::Token(&w),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

/// Every read says which block it reflects and whether the chain is diverged; a diverged
/// chain refuses ingest (409 `chain_diverged`) and shows in status and `/metrics`.
#[tokio::test]
async fn reads_name_their_block_and_a_diverged_chain_says_so_everywhere() {
    let app = spawn_app().await;
    app.create_user("indexer@bank.example", &[PlatformRole::SystemManager])
        .await;
    let w = app.token("indexer@bank.example").await;
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/indexed/chains",
            Cred::Token(&w),
            Some(json!({"chain_id": 31337, "name": "anvil", "finality_depth": 4})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let synth = Synth::new(8, 4, Utc::now() - chrono::Duration::hours(1));
    let path = "/api/v1/indexed/31337/blocks";
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&w),
            Some(batch(&synth, 0, 9, 0)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let token = format!("0x{}", hex::encode(synth.token.0));
    let get = |p: String| {
        let req = app.http.get(format!("{}{p}", app.base)).bearer_auth(&w);
        async move {
            let r = req.send().await.unwrap();
            let h = |k: &str| r.headers().get(k).map(|v| v.to_str().unwrap().to_string());
            let out = (
                r.status(),
                h("x-dalp-indexed-block"),
                h("x-dalp-chain-state"),
            );
            (out, r.json::<Value>().await.unwrap())
        }
    };
    for p in [
        "/api/v1/indexed/31337/status".to_string(),
        format!("/api/v1/indexed/31337/tokens/{token}/supply"),
        format!("/api/v1/indexed/31337/tokens/{token}/holders"),
        format!("/api/v1/indexed/31337/tokens/{token}/transfers"),
    ] {
        let ((s, block, state), b) = get(p.clone()).await;
        assert_eq!(s, StatusCode::OK, "{p}: {b}");
        assert_eq!(block.as_deref(), Some("9"), "{p}");
        assert_eq!(state.as_deref(), Some("following"), "{p}");
    }

    app.services
        .state
        .indexed
        .mark_diverged(
            &dalp_audit::RequestContext::service("test"),
            31337,
            9,
            "the node at the RPC URL is now on chain 5, not 31337",
        )
        .await
        .unwrap();
    let ((s, block, state), b) = get("/api/v1/indexed/31337/status".into()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (block.as_deref(), state.as_deref()),
        (Some("9"), Some("diverged"))
    );
    assert_eq!(b["status"]["state"], "diverged", "{b}");
    assert!(
        b["status"]["diverged"]["next"]
            .as_str()
            .unwrap()
            .contains("dalp index rewind"),
        "{b}"
    );
    let ((_, _, state), _) = get(format!("/api/v1/indexed/31337/tokens/{token}/supply")).await;
    assert_eq!(state.as_deref(), Some("diverged"));
    let before = counts(&app).await;
    let (s, b) = app
        .call(
            Method::POST,
            path,
            Cred::Token(&w),
            Some(batch(&synth, 10, 12, 0)),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["error"]["code"], "chain_diverged", "{b}");
    assert_eq!(counts(&app).await, before, "nothing ingested");
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dalp_indexer_diverged{chain_id=\"31337\"} 1"),
        "{metrics}"
    );
}
