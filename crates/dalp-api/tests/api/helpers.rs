//! `spawn_app()`: the real router, served on 127.0.0.1:0, over a fresh migrated database.

use std::sync::Arc;
use std::time::Duration;

use dalp_api::{ApiSettings, Services};
use dalp_identity::store::NewUser;
use dalp_identity::types::{Email, Password, PlatformRole};
use dalp_identity::{IdentityStore, RequestContext};
use dalp_testkit::{migrated_database, TestDb};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";

/// Organisations every test app has (references to others are refused).
pub const ORG: &str = "00000000-0000-4000-8000-000000000001";
pub const OTHER_ORG: &str = "00000000-0000-4000-8000-0000000000aa";

pub struct TestApp {
    pub base: String,
    pub db: TestDb,
    pub services: Services,
    pub key_dir: Arc<tempfile::TempDir>,
    pub http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn spawn_app() -> TestApp {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let key_dir = Arc::new(tempfile::tempdir().unwrap());
    spawn_app_on(db, key_dir, ApiSettings::default()).await
}

/// Another API process over the same database and key file.
pub async fn spawn_app_on(
    db: TestDb,
    key_dir: Arc<tempfile::TempDir>,
    settings: ApiSettings,
) -> TestApp {
    let pools = Arc::new(db.pools());
    db.superuser()
        .await
        .batch_execute(&format!(
            "INSERT INTO dalp_identity.organisations (id, slug, name) VALUES
                 ('{ORG}', 'test-bank', 'Test Bank'), ('{OTHER_ORG}', 'other-bank', 'Other Bank')
             ON CONFLICT DO NOTHING"
        ))
        .await
        .unwrap();
    let services = Services::start(pools, key_dir.path(), settings).unwrap();
    // The cache serves nothing until its LISTEN connection is up; wait so tests see caching.
    for _ in 0..100 {
        if services.state.identity.cache().is_listening() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        services.state.identity.cache().is_listening(),
        "cache listener did not start"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = services.router();
    let server = tokio::spawn(async move {
        dalp_api::serve(listener, app, Default::default(), std::future::pending())
            .await
            .unwrap();
    });
    TestApp {
        base: format!("http://{addr}"),
        db,
        services,
        key_dir,
        http: reqwest::Client::new(),
        server,
    }
}

pub enum Cred<'a> {
    None,
    Token(&'a str),
    Key(&'a str),
}

impl TestApp {
    pub fn store(&self) -> &IdentityStore {
        &self.services.state.identity
    }

    pub async fn create_user(&self, email: &str, roles: &[PlatformRole]) -> Uuid {
        self.store()
            .create_user(
                &RequestContext {
                    actor: "service:test".into(),
                    ..Default::default()
                },
                NewUser {
                    email: Email::parse(email).unwrap(),
                    name: "Test User".into(),
                    password: Some(Password::parse(PASSWORD).unwrap()),
                    wallet_address: None,
                    roles: roles.to_vec(),
                },
            )
            .await
            .unwrap()
            .id
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        cred: Cred<'_>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        req = match cred {
            Cred::None => req,
            Cred::Token(t) => req.bearer_auth(t),
            Cred::Key(k) => req.header("x-api-key", k),
        };
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_client_error() || status.is_server_error() {
            assert!(
                json["error"]["code"].is_string(),
                "error shape for {status}: {text}"
            );
        }
        (status, json)
    }

    pub async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/api/v1/auth/login",
            Cred::None,
            Some(json!({ "email": email, "password": password })),
        )
        .await
    }

    /// Logs in a user who needs no second factor; returns the token.
    pub async fn token(&self, email: &str) -> String {
        let (s, b) = self.login(email, PASSWORD).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["mfa_required"], false, "{b}");
        b["token"].as_str().unwrap().to_string()
    }

    /// A value from the database, read as the superuser.
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        self.db
            .superuser()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn superuser_exec(&self, sql: &str) {
        self.db.superuser().await.batch_execute(sql).await.unwrap();
    }
}

/// The TOTP code for `secret_b32` at `offset_steps` from now.
pub fn totp_code(secret_b32: &str, offset_steps: i64) -> String {
    let secret = data_encoding::BASE32_NOPAD
        .decode(secret_b32.as_bytes())
        .unwrap();
    let now = chrono::Utc::now().timestamp() as u64;
    let step = (dalp_identity::totp::step_at(now) as i64 + offset_steps) as u64;
    format!("{:06}", dalp_identity::totp::hotp(&secret, step, 6))
}

impl TestApp {
    /// An admin's session, completed with a freshly enrolled TOTP factor.
    pub async fn admin_token(&self, email: &str) -> String {
        let (_, b) = self.login(email, PASSWORD).await;
        assert_eq!(b["mfa_required"], true, "{b}");
        let token = b["token"].as_str().unwrap().to_string();
        let (_, e) = self
            .call(Method::POST, "/api/v1/mfa/totp", Cred::Token(&token), None)
            .await;
        let secret = e["secret"].as_str().unwrap().to_string();
        let (s, b) = self
            .call(
                Method::POST,
                "/api/v1/mfa/totp/confirm",
                Cred::Token(&token),
                Some(json!({ "code": totp_code(&secret, 0) })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        token
    }
}
