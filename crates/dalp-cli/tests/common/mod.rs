//! Helpers shared by the CLI's end-to-end tests: running the `dalp` binary, free ports,
//! feeding standard input, TOTP codes.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

pub const DALP: &str = env!("CARGO_BIN_EXE_dalp");

/// A free loopback port outside the ephemeral range (a server binds it later; an outgoing
/// connection must not take it meanwhile).
pub fn free_port() -> u16 {
    dalp_ops::embedded::free_port().unwrap()
}

pub fn dalp(args: &[&str]) -> Output {
    Command::new(DALP).args(args).output().expect("run dalp")
}

pub fn text(o: &Output) -> String {
    dalp_testkit::output_text(o)
}

pub fn dalp_with_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(DALP)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn totp_now(secret_b32: &str, offset: i64) -> String {
    let secret = data_encoding::BASE32_NOPAD
        .decode(secret_b32.as_bytes())
        .unwrap();
    let step = dalp_identity::totp::step_at(chrono::Utc::now().timestamp() as u64) as i64 + offset;
    format!("{:06}", dalp_identity::totp::hotp(&secret, step as u64, 6))
}

/// An administrator's first login over the API at `api` (`http://HOST:PORT/api/v1`): the
/// pending session's token and a freshly enrolled TOTP secret.
pub async fn login_and_enrol(
    http: &reqwest::Client,
    api: &str,
    email: &str,
    password: &str,
) -> (String, String) {
    let login: serde_json::Value = http
        .post(format!("{api}/auth/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(login["mfa_required"], true, "{login}");
    let token = login["token"].as_str().unwrap().to_string();
    let enrol: serde_json::Value = http
        .post(format!("{api}/mfa/totp"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (token, enrol["secret"].as_str().unwrap().to_string())
}

/// Confirms the enrolment with the current code, which completes the session; checks that it
/// then reads `/me`.
pub async fn confirm_totp(http: &reqwest::Client, api: &str, token: &str, secret: &str) {
    let r = http
        .post(format!("{api}/mfa/totp/confirm"))
        .bearer_auth(token)
        .json(&serde_json::json!({"code": totp_now(secret, 0)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let me = http
        .get(format!("{api}/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
}
