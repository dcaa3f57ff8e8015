//! Identity over HTTP: login with and without MFA, and every refusal leaving data intact.

use dalp_identity::types::PlatformRole;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{spawn_app, totp_code, Cred, PASSWORD};

#[tokio::test]
async fn admin_login_requires_enrolling_and_using_a_second_factor() {
    let app = spawn_app().await;
    app.create_user("root@bank.example", &[PlatformRole::Admin])
        .await;

    let (s, b) = app.login("root@bank.example", PASSWORD).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["mfa_required"], true);
    let pending = b["token"].as_str().unwrap().to_string();
    // A pending session can do nothing but complete MFA.
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&pending), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["error"]["code"], "mfa_required");
    let (s, _) = app
        .call(Method::GET, "/api/v1/users", Cred::Token(&pending), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A wrong code does not complete it.
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/auth/mfa/verify",
            Cred::Token(&pending),
            Some(json!({"code": "000000"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");

    // Enrol and confirm: that completes this first login.
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/mfa/totp",
            Cred::Token(&pending),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let secret = b["secret"].as_str().unwrap().to_string();
    assert!(b["otpauth_uri"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/mfa/totp/confirm",
            Cred::Token(&pending),
            Some(json!({"code": totp_code(&secret, 0)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let backup: Vec<String> = serde_json::from_value(b["backup_codes"].clone()).unwrap();
    assert_eq!(backup.len(), 10);
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&pending), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["user"]["mfa_enabled"], true);
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            Cred::Token(&pending),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&pending), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Next login: the TOTP code of the next step (the current one was used by confirm).
    let (_, b) = app.login("root@bank.example", PASSWORD).await;
    let t2 = b["token"].as_str().unwrap().to_string();
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/auth/mfa/verify",
            Cred::Token(&t2),
            Some(json!({"code": totp_code(&secret, 1)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = app
        .call(Method::GET, "/api/v1/users", Cred::Token(&t2), None)
        .await;
    assert_eq!(s, StatusCode::OK);

    // A backup code works once.
    let (_, b) = app.login("root@bank.example", PASSWORD).await;
    let t3 = b["token"].as_str().unwrap().to_string();
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/auth/mfa/verify",
            Cred::Token(&t3),
            Some(json!({"code": backup[0]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, b) = app.login("root@bank.example", PASSWORD).await;
    let t4 = b["token"].as_str().unwrap().to_string();
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/auth/mfa/verify",
            Cred::Token(&t4),
            Some(json!({"code": backup[0]})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a used backup code was accepted again"
    );
    // The TOTP secret is stored encrypted.
    let plain = app
        .scalar_i64(&format!(
            "SELECT count(*) FROM dalp_identity.mfa_totp t WHERE position(convert_to('{secret}', 'UTF8') IN t.secret_enc) > 0 OR t::text LIKE '%{secret}%'"
        ))
        .await;
    assert_eq!(plain, 0);
}

#[tokio::test]
async fn a_user_without_mfa_logs_in_directly() {
    let app = spawn_app().await;
    let id = app
        .create_user("ops@bank.example", &[PlatformRole::TokenManager])
        .await;
    let token = app.token("ops@bank.example").await;
    assert!(token.starts_with("dalps_"));
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["user"]["id"], id.to_string());
    assert_eq!(b["user"]["roles"], json!(["tokenManager"]));
    // Only the hash of the token is stored.
    let n = app
        .scalar_i64(&format!(
            "SELECT count(*) FROM dalp_identity.sessions s WHERE s::text LIKE '%{}%'",
            &token[6..]
        ))
        .await;
    assert_eq!(n, 0);
    let (s, b) = app
        .call(
            Method::GET,
            "/api/v1/auth/sessions",
            Cred::Token(&token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["sessions"][0]["current"], true);
}

#[tokio::test]
async fn wrong_credentials_do_not_reveal_whether_the_email_exists() {
    let app = spawn_app().await;
    app.create_user("known@bank.example", &[]).await;
    let sessions = "SELECT count(*) FROM dalp_identity.sessions";
    let (s1, b1) = app.login("known@bank.example", "wrong password here").await;
    let (s2, b2) = app
        .login("unknown@bank.example", "wrong password here")
        .await;
    assert_eq!(s1, StatusCode::UNAUTHORIZED);
    assert_eq!(s2, StatusCode::UNAUTHORIZED);
    assert_eq!(b1, b2, "responses differ between known and unknown email");
    assert_eq!(app.scalar_i64(sessions).await, 0);
    // Denials are audited.
    let denied = app
        .scalar_i64("SELECT count(*) FROM dalp_audit.events WHERE action = 'identity.login' AND outcome = 'denied'")
        .await;
    assert_eq!(denied, 2);
    // SQL-looking input is just a wrong login.
    let (s, _) = app
        .login(
            "x' OR '1'='1@bank.example",
            "' OR 1=1; DROP TABLE dalp_identity.users; --",
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.users")
            .await,
        1
    );
}

#[tokio::test]
async fn expired_and_revoked_sessions_are_refused() {
    let app = spawn_app().await;
    app.create_user("a@bank.example", &[]).await;
    let expiring = app.token("a@bank.example").await;
    app.superuser_exec(
        "UPDATE dalp_identity.sessions SET expires_at = now() - interval '1 second'",
    )
    .await;
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&expiring), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("expired"),
        "{b}"
    );

    let keep = app.token("a@bank.example").await;
    let other = app.token("a@bank.example").await;
    let (_, b) = app
        .call(
            Method::GET,
            "/api/v1/auth/sessions",
            Cred::Token(&keep),
            None,
        )
        .await;
    let other_id = b["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == false && s["expires_at"].is_string())
        .map(|s| s["id"].as_str().unwrap().to_string())
        .unwrap();
    // Use it once so it is cached, then revoke it from the other session.
    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&other), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/api/v1/auth/sessions/{other_id}"),
            Cred::Token(&keep),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&other), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, _) = app
        .call(
            Method::DELETE,
            "/api/v1/auth/sessions/not-a-uuid",
            Cred::Token(&keep),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Token("dalps_forged"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = app.call(Method::GET, "/api/v1/me", Cred::None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn api_keys_are_scoped_rate_limited_and_revocable() {
    let app = spawn_app().await;
    app.create_user("admin2@bank.example", &[PlatformRole::Admin])
        .await;
    // Give the admin a key without going through MFA: create it for a non-admin first.
    let uid = app.create_user("svc@bank.example", &[]).await;
    let token = app.token("svc@bank.example").await;
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&token),
            Some(json!({"name": "ro", "scope": "read", "rate_limit_per_minute": 3})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let ro = b["key"].as_str().unwrap().to_string();
    assert!(ro.starts_with("dalp_"));
    let ro_id = b["api_key"]["id"].as_str().unwrap().to_string();
    assert!(
        !b["api_key"].to_string().contains(&ro[10..]),
        "key leaked into its info"
    );

    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Key(&ro), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // A read key on a write route: refused, nothing created.
    let keys_before = app
        .scalar_i64("SELECT count(*) FROM dalp_identity.api_keys")
        .await;
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Key(&ro),
            Some(json!({"name": "x", "scope": "read-write"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.api_keys")
            .await,
        keys_before
    );
    // Three requests a minute (the refused POST counted): the third passes, the fourth not.
    let (s, _) = app
        .call(Method::GET, "/api/v1/me", Cred::Key(&ro), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Key(&ro), None)
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");

    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&token),
            Some(json!({"name": "rw", "scope": "read-write"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let rw = b["key"].as_str().unwrap().to_string();
    let (s, _) = app
        .call(Method::GET, "/api/v1/api-keys", Cred::Key(&rw), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/api/v1/api-keys/{ro_id}"),
            Cred::Token(&token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let rw_id: String = app
        .db
        .superuser()
        .await
        .query_one(
            "SELECT id::text FROM dalp_identity.api_keys WHERE name = 'rw'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/api/v1/api-keys/{rw_id}"),
            Cred::Token(&token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Key(&rw), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "revoked key still works: {b}");
    // Invalid scope and unknown fields are 422.
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&token),
            Some(json!({"name": "x", "scope": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let _ = uid;
}

#[tokio::test]
async fn banned_users_and_missing_roles_are_refused() {
    let app = spawn_app().await;
    let admin = app
        .create_user("boss@bank.example", &[PlatformRole::Admin])
        .await;
    let victim = app.create_user("victim@bank.example", &[]).await;
    let victim_token = app.token("victim@bank.example").await;
    // No role: 403 on admin routes, and nothing changes.
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/users",
            Cred::Token(&victim_token),
            Some(json!({"email": "n@bank.example", "name": "N"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.users")
            .await,
        2
    );
    let (s, _) = app
        .call(
            Method::GET,
            &format!("/api/v1/users/{victim}/kyc"),
            Cred::Token(&victim_token),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let denied = app
        .scalar_i64("SELECT count(*) FROM dalp_audit.events WHERE outcome = 'denied' AND details->>'reason' LIKE 'missing role%'")
        .await;
    assert_eq!(denied, 2);

    // The store bans (an admin over HTTP would need MFA; covered above).
    let ctx = dalp_identity::RequestContext {
        actor: format!("user:{admin}"),
        ..Default::default()
    };
    // Granting a role the user already has changes nothing: the same answer, one record.
    for _ in 0..2 {
        let u = app
            .store()
            .grant_role(&ctx, victim, PlatformRole::TokenManager)
            .await
            .unwrap();
        assert_eq!(u.roles, vec![PlatformRole::TokenManager]);
    }
    assert_eq!(
        app.scalar_i64(
            "SELECT count(*) FROM dalp_audit.events WHERE action = 'identity.role.grant'"
        )
        .await,
        1
    );
    app.store()
        .update_user(
            &ctx,
            victim,
            dalp_identity::store::UserPatch {
                ban: Some(("fraud".into(), None)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The cached session notices at once (same process), and login is refused.
    let (s, b) = app
        .call(Method::GET, "/api/v1/me", Cred::Token(&victim_token), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["error"]["code"], "banned");
    let (s, b) = app.login("victim@bank.example", PASSWORD).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["error"]["code"], "banned");
}

#[tokio::test]
async fn malformed_oversized_and_sql_looking_input_is_rejected_cleanly() {
    let app = spawn_app().await;
    let users = "SELECT count(*) FROM dalp_identity.users";
    // Malformed JSON.
    let resp = app
        .http
        .post(format!("{}/api/v1/auth/login", app.base))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let b: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(b["error"]["code"], "bad_request");
    // Wrong content type.
    let resp = app
        .http
        .post(format!("{}/api/v1/auth/login", app.base))
        .body("email=x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Oversized body.
    let big = json!({"email": "a@b.io", "password": "x".repeat(100_000)});
    let (s, b) = app
        .call(Method::POST, "/api/v1/auth/login", Cred::None, Some(big))
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    // Missing and unknown fields.
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Cred::None,
            Some(json!({"email": "a@b.io"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Cred::None,
            Some(json!({"email": "a@b.io", "password": "p", "admin": true})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // Invalid identifiers through the store: nothing written.
    let ctx = dalp_identity::RequestContext::default();
    assert!(dalp_identity::types::Email::parse("x'; DROP TABLE dalp_identity.users; --").is_err());
    let weird = app
        .store()
        .create_user(
            &ctx,
            dalp_identity::store::NewUser {
                email: dalp_identity::types::Email::parse("robert@bank.example").unwrap(),
                name: "Robert'); DROP TABLE dalp_identity.users;--".into(),
                password: None,
                wallet_address: None,
                roles: vec![],
            },
        )
        .await
        .unwrap();
    assert!(weird.name.contains("DROP TABLE"), "stored literally");
    assert_eq!(app.scalar_i64(users).await, 1);
    // Unknown routes use the error shape too.
    let (s, _) = app
        .call(Method::GET, "/api/v1/nope", Cred::None, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn login_attempts_are_rate_limited() {
    let app = spawn_app().await;
    app.create_user("slow@bank.example", &[]).await;
    let mut last = StatusCode::OK;
    for _ in 0..11 {
        last = app.login("slow@bank.example", "not the password!").await.0;
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
    // Even the right password is refused until the window passes.
    let (s, _) = app.login("slow@bank.example", PASSWORD).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn sensitive_operations_need_a_fresh_login() {
    let app = spawn_app().await;
    app.create_user("k@bank.example", &[]).await;
    let token = app.token("k@bank.example").await;
    app.superuser_exec(
        "UPDATE dalp_identity.sessions SET fresh_until = now() - interval '1 minute'",
    )
    .await;
    let (s, b) = app
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Cred::Token(&token),
            Some(json!({"name": "late", "scope": "read"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(b["error"]["code"], "reauthentication_required");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.api_keys")
            .await,
        0
    );
}

#[tokio::test]
async fn kyc_is_encrypted_at_rest_audited_on_read_and_survives_key_rotation() {
    let app = spawn_app().await;
    let subject = app.create_user("investor@bank.example", &[]).await;
    app.create_user("kyc@bank.example", &[PlatformRole::IdentityManager])
        .await;
    let officer = app.token("kyc@bank.example").await;
    let profile = json!({
        "first_name": "Zebulon", "last_name": "Quixotic", "date_of_birth": "1980-02-29",
        "country": "LU", "residency_status": "dual_resident", "national_id": "NID-77341122"
    });
    let (s, b) = app
        .call(
            Method::PUT,
            &format!("/api/v1/users/{subject}/kyc"),
            Cred::Token(&officer),
            Some(profile.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let mut bad = profile.clone();
    bad["country"] = json!("Luxembourg");
    let (s, _) = app
        .call(
            Method::PUT,
            &format!("/api/v1/users/{subject}/kyc"),
            Cred::Token(&officer),
            Some(bad),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // SELECT shows no plaintext anywhere in the identity schema.
    for needle in ["Zebulon", "Quixotic", "NID-77341122", "1980-02-29"] {
        let n = app
            .scalar_i64(&format!(
                "SELECT (SELECT count(*) FROM dalp_identity.kyc_profiles k WHERE k::text LIKE '%{needle}%' OR position(convert_to('{needle}', 'UTF8') IN k.payload_enc) > 0)
                      + (SELECT count(*) FROM dalp_identity.data_keys d WHERE d::text LIKE '%{needle}%')
                      + (SELECT count(*) FROM dalp_audit.events e WHERE e::text LIKE '%{needle}%')"
            ))
            .await;
        assert_eq!(n, 0, "{needle} visible in plaintext");
    }
    let (s, b) = app
        .call(
            Method::GET,
            &format!("/api/v1/users/{subject}/kyc"),
            Cred::Token(&officer),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["kyc"], profile);
    let reads = app
        .scalar_i64("SELECT count(*) FROM dalp_audit.events WHERE action = 'identity.kyc.read'")
        .await;
    assert_eq!(reads, 1);

    // Rotate twice: every record stays readable, every data key moves to the new KEK.
    let ctx = dalp_identity::RequestContext {
        actor: "service:test".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let report = app.store().rotate_keys(&ctx, &mut |_, _| {}).await.unwrap();
        assert_eq!(report.rewrapped, 1);
        let old = app
            .scalar_i64(&format!(
                "SELECT count(*) FROM dalp_identity.data_keys WHERE kek_id <> '{}'",
                report.active_kek
            ))
            .await;
        assert_eq!(old, 0);
        let (s, b) = app
            .call(
                Method::GET,
                &format!("/api/v1/users/{subject}/kyc"),
                Cred::Token(&officer),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b["kyc"], profile);
    }
    // A ciphertext moved to another user's row does not decrypt.
    let other = app.create_user("other@bank.example", &[]).await;
    app.superuser_exec(&format!(
        "INSERT INTO dalp_identity.kyc_profiles (user_id, data_key_id, payload_enc, updated_by)
         SELECT '{other}', data_key_id, payload_enc, 'attacker' FROM dalp_identity.kyc_profiles WHERE user_id = '{subject}'"
    ))
    .await;
    let (s, _) = app
        .call(
            Method::GET,
            &format!("/api/v1/users/{other}/kyc"),
            Cred::Token(&officer),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn openapi_is_generated_from_the_routes_and_every_operation_is_served() {
    let app = spawn_app().await;
    let (s, doc) = app
        .call(Method::GET, "/api/v1/openapi.json", Cred::None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(&doc, dalp_api::openapi_document(), "served as generated");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 55, "{} paths", paths.len());
    let mut ids = std::collections::HashSet::new();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            assert!(
                op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|c| c.starts_with('2')),
                "{method} {path}: no success response"
            );
            // Every documented operation reaches a handler: neither the router's 404 for
            // unknown paths nor its 405 for unknown methods.
            let concrete = path
                .replace("{chain}", "1")
                .replace("{account}", "0x0000000000000000000000000000000000000001")
                .replace("{token}", "0x0000000000000000000000000000000000000002")
                .replace("{role}", "auditor")
                .split('/')
                .map(|seg| {
                    if seg.starts_with('{') {
                        "00000000-0000-0000-0000-000000000000"
                    } else {
                        seg
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (s, b) = app.call(m, &concrete, Cred::None, None).await;
            assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_ne!(
                b["error"]["message"], "no such endpoint",
                "{method} {path} is documented but not routed"
            );
        }
    }
    assert!(operations >= 70, "{operations} operations");
    // Every reference resolves to a schema of the document.
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }
    // Request bodies are the handlers' own types, refusing what they refuse.
    let new_user = &doc["components"]["schemas"]["NewUser"];
    assert_eq!(new_user["additionalProperties"], false);
    assert_eq!(new_user["properties"]["roles"]["uniqueItems"], true);
    assert_eq!(
        new_user["properties"]["name"]["pattern"],
        dalp_types::TEXT_PATTERN
    );
    let asset = &doc["components"]["schemas"]["AssetInput"]["properties"];
    for field in ["details", "metadata", "template_id"] {
        assert!(asset[field].is_object(), "AssetInput.{field}");
    }
    // A change to a versioned record declares If-Match, and 428 without it.
    let put = &doc["paths"]["/api/v1/assets/{id}"]["put"];
    assert!(put["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "If-Match" && p["in"] == "header" && p["required"] == true));
    assert!(put["responses"]["428"].is_object());
    assert!(put["responses"]["200"]["headers"]["ETag"].is_object());
}

#[tokio::test]
async fn second_factor_guessing_revokes_the_session_and_locks_the_user_out() {
    let app = spawn_app().await;
    app.create_user("guess@bank.example", &[PlatformRole::Admin])
        .await;
    // Enrol TOTP once (as admin_token does), keeping the secret.
    let (_, b) = app.login("guess@bank.example", PASSWORD).await;
    let first = b["token"].as_str().unwrap().to_string();
    let (_, e) = app
        .call(Method::POST, "/api/v1/mfa/totp", Cred::Token(&first), None)
        .await;
    let secret = e["secret"].as_str().unwrap().to_string();
    let (s, _) = app
        .call(
            Method::POST,
            "/api/v1/mfa/totp/confirm",
            Cred::Token(&first),
            Some(json!({"code": totp_code(&secret, 0)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let verify = |token: String, code: String| {
        let app = &app;
        async move {
            app.call(
                Method::POST,
                "/api/v1/auth/mfa/verify",
                Cred::Token(&token),
                Some(json!({ "code": code })),
            )
            .await
        }
    };
    let wrong = |k: u32| format!("{:06}", (k * 7919) % 1_000_000);

    // Four wrong codes are refused as wrong; the fifth revokes the pending session.
    let (_, b) = app.login("guess@bank.example", PASSWORD).await;
    let pending = b["token"].as_str().unwrap().to_string();
    for k in 1..=4 {
        let (s, b) = verify(pending.clone(), wrong(k)).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_code")),
            "{b}"
        );
    }
    let (s, b) = verify(pending.clone(), wrong(5)).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("session_revoked")),
        "{b}"
    );
    // The revoked session is gone, even with the right code.
    let (s, _) = verify(pending.clone(), totp_code(&secret, 1)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Five wrong codes in a row also locked the user out: a new login's right code is
    // refused with 429 and Retry-After until the lockout ends.
    let (_, b) = app.login("guess@bank.example", PASSWORD).await;
    let next = b["token"].as_str().unwrap().to_string();
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/mfa/verify", app.base))
        .bearer_auth(&next)
        .json(&json!({"code": totp_code(&secret, 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "mfa_locked", "{b}");
    let audited = app
        .scalar_i64("SELECT count(*) FROM dalp_audit.events WHERE action = 'identity.mfa.lockout'")
        .await;
    assert_eq!(audited, 1);
    let denied = app
        .scalar_i64("SELECT count(*) FROM dalp_audit.events WHERE action = 'identity.mfa.verify' AND outcome = 'denied'")
        .await;
    assert_eq!(
        denied, 6,
        "five wrong codes and one locked attempt, each audited"
    );

    // The lockout ends (moved into the past here rather than waited for); then the right
    // code is accepted and the counters start over.
    app.superuser_exec(
        "UPDATE dalp_identity.mfa_lockouts SET locked_until = now() - interval '1 second'",
    )
    .await;
    let (s, b) = verify(next.clone(), totp_code(&secret, 1)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        app.scalar_i64("SELECT count(*) FROM dalp_identity.mfa_lockouts")
            .await,
        0
    );

    // Counted per user over all its sessions: five wrong codes over two logins lock for a
    // minute again (the counters restarted), the next five for two.
    let mut k = 10;
    for expected_minutes in [1, 2] {
        let (_, b) = app.login("guess@bank.example", PASSWORD).await;
        let a = b["token"].as_str().unwrap().to_string();
        let (_, b) = app.login("guess@bank.example", PASSWORD).await;
        let c = b["token"].as_str().unwrap().to_string();
        for n in 0..5 {
            let t = if n % 2 == 0 { a.clone() } else { c.clone() };
            k += 1;
            let (s, b) = verify(t, wrong(k)).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
        }
        let minutes = app
            .scalar_i64("SELECT round(extract(epoch FROM locked_until - now()) / 60)::bigint FROM dalp_identity.mfa_lockouts")
            .await;
        assert_eq!(minutes, expected_minutes);
        app.superuser_exec(
            "UPDATE dalp_identity.mfa_lockouts SET locked_until = now() - interval '1 second'",
        )
        .await;
    }
}
