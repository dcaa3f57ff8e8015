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
    let issuer = new_ca(dir, "dalp embedded cluster CA")?;
    write_server_cert(dir, &issuer, server_user, &names(&SERVER_NAMES))?;
    Ok(true)
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Creates only the CA in `dir` (a multi-host cluster's: `dalp cluster init`) unless it exists.
pub fn ensure_ca(dir: &Path) -> Result<(), OpsError> {
    if dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists() {
        return Ok(());
    }
    new_ca(dir, "dalp cluster CA")?;
    write_crl(dir)
}

/// A new CA named `name` in `dir` (key 0600, certificate), returned as the issuer.
fn new_ca(dir: &Path, name: &str) -> Result<Issuer<'static, KeyPair>, OpsError> {
    std::fs::create_dir_all(dir).map_err(OpsError::io(format!("create {}", dir.display())))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, 10);
    let ca_cert = ca.self_signed(&ca_key)?;
    write_private(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    std::fs::write(dir.join(CA_CERT), ca_cert.pem())
        .map_err(OpsError::io("write CA certificate"))?;
    Ok(Issuer::new(ca, ca_key))
}

/// A host's certificate and key in `out` (as `server.crt` / `server.key`, with the CA
/// certificate and CRL beside them), signed by the CA in `ca_dir` and valid for `names`
/// (DNS names or IP addresses). It serves TLS (PostgreSQL, etcd, Patroni's REST API) and
/// authenticates the host as a client (etcd peers and clients, Patroni's write verbs).
pub fn issue_host(
    ca_dir: &Path,
    out: &Path,
    names: &[String],
    server_user: &ServerUser,
) -> Result<(), OpsError> {
    std::fs::create_dir_all(out).map_err(OpsError::io(format!("create {}", out.display())))?;
    if out != ca_dir {
        for f in [CA_CERT, CRL] {
            std::fs::copy(ca_dir.join(f), out.join(f))
                .map_err(OpsError::io(format!("copy {f} to {}", out.display())))?;
        }
    }
    write_server_cert(out, &issuer(ca_dir)?, server_user, names)
}

/// A new server certificate (and key) signed by the CA in `dir`, replacing the current
/// one; the CA is unchanged, so clients keep verifying. Servers pick it up on reload.
pub fn rotate_server(dir: &Path, server_user: &ServerUser) -> Result<(), OpsError> {
    write_server_cert(dir, &issuer(dir)?, server_user, &names(&SERVER_NAMES))
}

fn write_server_cert(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    server_user: &ServerUser,
    names: &[String],
) -> Result<(), OpsError> {
    let server_key_path = dir.join(SERVER_KEY);
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names.to_vec())?;
    // An address is also named as text: pgBackRest (2.45) matches the host it connects to
    // against DNS names and the CN only, while the others match IP addresses.
    for n in names {
        if n.parse::<std::net::IpAddr>().is_ok() && n != "127.0.0.1" && n != "::1" {
            server
                .subject_alt_names
                .push(rcgen::SanType::DnsName(n.as_str().try_into()?));
        }
    }
    server.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("localhost", |n| n.as_str()),
    );
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Also a client certificate: etcd peers and Patroni members authenticate to each other
    // with the same host certificate.
    server.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut server, 2);
    let server_cert = server.signed_by(&server_key, issuer)?;
    // Key first (owned by the server user), then the certificate: both replaced by rename.
    let staged_key = dir.join(format!("{SERVER_KEY}.new"));
    write_private(&staged_key, &server_key.serialize_pem())?;
    server_user.chown(&staged_key)?;
    let staged_cert = dir.join(format!("{SERVER_CERT}.new"));
    std::fs::write(&staged_cert, server_cert.pem())
        .map_err(OpsError::io("write server certificate"))?;
    std::fs::rename(&staged_key, &server_key_path).map_err(OpsError::io("replace server key"))?;
    std::fs::rename(&staged_cert, dir.join(SERVER_CERT))
        .map_err(OpsError::io("replace server certificate"))?;
    Ok(())
}

/// The certificate revocation list the server honours (`ssl_crl_file`).
pub const CRL: &str = "crl.pem";
/// Client certificates issued so far (serial, name, expiry, revocation), for revoke and list.
pub const ISSUED: &str = "issued.json";

/// One issued client certificate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    /// Hex serial number.
    pub serial: String,
    /// The database role it logs in as (its CN).
    pub role: String,
    /// Who it was issued to (its OU).
    pub name: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, OpsError> {
    let key = std::fs::read_to_string(dir.join(CA_KEY))
        .map_err(OpsError::io(format!("read {}", dir.join(CA_KEY).display())))?;
    let cert = std::fs::read_to_string(dir.join(CA_CERT)).map_err(OpsError::io(format!(
        "read {}",
        dir.join(CA_CERT).display()
    )))?;
    Ok(Issuer::from_ca_cert_pem(&cert, KeyPair::from_pem(&key)?)?)
}

fn load_issued(dir: &Path) -> Result<Vec<Issued>, OpsError> {
    match std::fs::read_to_string(dir.join(ISSUED)) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| OpsError::Bootstrap {
            context: format!("{}", dir.join(ISSUED).display()),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(OpsError::io("read issued certificates")(e)),
    }
}

fn to_offset(t: chrono::DateTime<chrono::Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp()).expect("time in range")
}

/// Issues a client certificate for `role` to `name`, valid for `ttl` (it may be negative,
/// for tests of expiry), signed by the cluster's CA in `dir`. Returns the PEM certificate
/// and private key; the key is not kept by dalp.
pub fn issue_client(
    dir: &Path,
    role: &str,
    name: &str,
    ttl: chrono::Duration,
) -> Result<(Issued, String, String), OpsError> {
    let issuer = issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, role);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = chrono::Utc::now();
    let not_after = now + ttl;
    params.not_before = to_offset(now.min(not_after) - chrono::Duration::minutes(5));
    params.not_after = to_offset(not_after);
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.signed_by(&key, &issuer)?;
    let issued = Issued {
        serial: hex::encode(serial),
        role: role.into(),
        name: name.into(),
        not_after,
        revoked_at: None,
    };
    let mut all = load_issued(dir)?;
    all.push(issued.clone());
    write_private(
        &dir.join(ISSUED),
        &serde_json::to_string_pretty(&all).expect("serializes"),
    )?;
    Ok((issued, cert.pem(), key.serialize_pem()))
}

/// Every client certificate issued from `dir`.
pub fn issued(dir: &Path) -> Result<Vec<Issued>, OpsError> {
    load_issued(dir)
}

/// Marks `serial` revoked and rewrites the CRL. The server reads it again on reload.
pub fn revoke(dir: &Path, serial: &str) -> Result<Issued, OpsError> {
    let mut all = load_issued(dir)?;
    let Some(i) = all.iter_mut().find(|i| i.serial == serial.to_lowercase()) else {
        return Err(OpsError::Bootstrap {
            context: format!("revoke {serial}"),
            message: "no certificate with that serial was issued here (see `dalp admin cert list`)"
                .into(),
        });
    };
    if i.revoked_at.is_none() {
        i.revoked_at = Some(chrono::Utc::now());
    }
    let done = i.clone();
    write_private(
        &dir.join(ISSUED),
        &serde_json::to_string_pretty(&all).expect("serializes"),
    )?;
    write_crl(dir)?;
    Ok(done)
}

/// Writes the CRL of every revoked certificate (an empty list when none), signed by the CA.
pub fn write_crl(dir: &Path) -> Result<(), OpsError> {
    let all = load_issued(dir)?;
    let now = chrono::Utc::now();
    let params = rcgen::CertificateRevocationListParams {
        this_update: to_offset(now - chrono::Duration::minutes(5)),
        next_update: to_offset(now + chrono::Duration::days(3650)),
        crl_number: rcgen::SerialNumber::from(now.timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs: all
            .iter()
            .filter_map(|i| {
                Some(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&hex::decode(&i.serial).ok()?),
                    revocation_time: to_offset(i.revoked_at?),
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer(dir)?)?;
    std::fs::write(dir.join(CRL), crl.pem()?).map_err(OpsError::io("write the CRL"))?;
    Ok(())
}
