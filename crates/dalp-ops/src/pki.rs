//! The embedded cluster's own certificate authority and server certificate.
//!
//! The CA signs a server certificate valid for `localhost`, `127.0.0.1` and `::1`, so clients
//! verify the server fully (`sslmode=verify-full`) against a CA nobody else holds.

use std::path::Path;

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::OpsError;
use crate::process::ServerUser;

/// File names under `DIR/tls/`.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";

/// Names the server certificate is valid for.
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn validity(params: &mut CertificateParams, years: i32) {
    let now = chrono::Utc::now();
    let start = now - chrono::Duration::days(1);
    params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
    params.not_after = rcgen::date_time_ymd(now.year() + years, now.month() as u8, 1);
}

pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), OpsError> {
    dalp_db::secrets::write_private(path, contents)
        .map_err(OpsError::io(format!("write {}", path.display())))
}

/// Creates the CA and server certificate in `dir` unless they exist. The server key is
/// handed to `server_user` (PostgreSQL insists its key is private to it).
pub fn ensure(dir: &Path, server_user: &ServerUser) -> Result<bool, OpsError> {
    let server_key_path = dir.join(SERVER_KEY);
    if dir.join(CA_CERT).exists() && server_key_path.exists() && dir.join(SERVER_CERT).exists() {
        server_user.chown(&server_key_path)?;
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "dalp embedded cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, 10);
    let ca_cert = ca.self_signed(&ca_key)?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(
        SERVER_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    )?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server, 2);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    std::fs::write(dir.join(CA_CERT), ca_cert.pem())
        .map_err(OpsError::io("write CA certificate"))?;
    std::fs::write(dir.join(SERVER_CERT), server_cert.pem())
        .map_err(OpsError::io("write server certificate"))?;
    write_private(&server_key_path, &server_key.serialize_pem())?;
    server_user.chown(&server_key_path)?;
    Ok(true)
}
