//! SQL-injection-shaped input in every path and query parameter of every documented route,
//! as an administrator with every role: never a server error, and the data stays intact.

use dalp_identity::types::PlatformRole;
use reqwest::Method;

use crate::helpers::spawn_app;

const PAYLOADS: [&str; 6] = [
    "' OR '1'='1",
    "1; DROP TABLE dalp_identity.users; --",
    "\") OR 1=1 --",
    "0x' UNION SELECT password_hash FROM dalp_identity.users --",
    "%00'\\",
    "💣'; SELECT pg_sleep(5); --",
];

/// Query parameters the API documents anywhere (each route ignores the ones it lacks).
const QUERY: [&str; 18] = [
    "status",
    "limit",
    "before",
    "after",
    "since",
    "until",
    "organisation_id",
    "base",
    "block",
    "actor",
    "action",
    "resource_type",
    "resource_id",
    "outcome",
    "before_id",
    "from",
    "to",
    "kind",
];

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn injection_strings_in_every_parameter_never_reach_sql_as_code() {
    let app = spawn_app().await;
    let all = [
        PlatformRole::Admin,
        PlatformRole::Auditor,
        PlatformRole::SystemManager,
        PlatformRole::TokenManager,
        PlatformRole::ComplianceManager,
        PlatformRole::IdentityManager,
    ];
    app.create_user("root@bank.example", &all).await;
    let token = app.admin_token("root@bank.example").await;
    let su = app.db.superuser().await;
    let count = |sql: &'static str| {
        let su = &su;
        async move { su.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let users_before = count("SELECT count(*) FROM dalp_identity.users").await;
    let events_before = count("SELECT count(*) FROM dalp_audit.events").await;

    let (_, doc) = app
        .call(
            Method::GET,
            "/api/v1/openapi.json",
            crate::helpers::Cred::None,
            None,
        )
        .await;
    let mut requests = 0;
    let mut server_errors = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        // Logging out would end the session the rest of the requests use.
        if path.ends_with("/logout") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            for p in PAYLOADS {
                let mut url = path.clone();
                while let (Some(a), Some(b)) = (url.find('{'), url.find('}')) {
                    url.replace_range(a..=b, &encode(p));
                }
                let query: Vec<String> =
                    QUERY.iter().map(|k| format!("{k}={}", encode(p))).collect();
                url.push('?');
                url.push_str(&query.join("&"));
                let mut req = app
                    .http
                    .request(method.clone(), format!("{}{url}", app.base))
                    .bearer_auth(&token);
                if method != Method::GET && method != Method::DELETE {
                    req = req
                        .header("if-match", encode(p))
                        .json(&serde_json::json!({ "name": p, "kind": p, "organisation_id": p, "idempotency_key": p }));
                }
                let resp = req.send().await.unwrap();
                requests += 1;
                *statuses.entry(resp.status().as_u16()).or_insert(0) += 1;
                if resp.status().is_server_error() {
                    server_errors.push(format!("{method} {url} → {}", resp.status()));
                }
            }
        }
    }
    assert!(requests > 300, "only {requests} requests");
    eprintln!("{requests} requests, statuses {statuses:?}");
    // The session held: the payloads reached the handlers (and their validation).
    assert!(
        statuses.get(&401).copied().unwrap_or(0) * 20 < requests,
        "too many 401s: {statuses:?}"
    );
    assert!(
        server_errors.is_empty(),
        "server errors: {server_errors:#?}"
    );
    assert_eq!(
        count("SELECT count(*) FROM dalp_identity.users").await,
        users_before,
        "users changed"
    );
    assert!(count("SELECT count(*) FROM dalp_audit.events").await >= events_before);
    let tables = count(
        "SELECT count(*) FROM pg_tables WHERE schemaname IN ('dalp_identity', 'dalp_assets', 'dalp_audit', 'dalp_workflows', 'dalp_indexed')",
    )
    .await;
    assert!(tables > 20, "tables went missing: {tables}");
}
