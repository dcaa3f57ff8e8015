//! A real syslog receiver for the SIEM tests: Debian's rsyslog (packages rsyslog,
//! rsyslog-gnutls, rsyslog-relp, installed by `scripts/deps.sh`), its own instance in a
//! directory of the test, listening on loopback for RFC 5425 syslog over TLS (imtcp with
//! gtls) and RELP over TLS (imrelp), writing every message it parsed to `received.log` as
//! tab-separated fields and its own diagnostics to `internal.log`. RELP requires a client
//! certificate signed by the test CA (`tls.authMode="certvalid"`). It runs as the server
//! user and is stopped by pid (also when the test fails). Stop, kill and start again keep
//! its ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dalp_ops::process::ServerUser;
use nix::sys::signal::Signal;

/// One message as rsyslog parsed it.
#[derive(Debug, Clone)]
pub struct Received {
    pub hostname: String,
    /// RFC 3339, as the message's header said.
    pub time: String,
    pub severity: u8,
    pub facility: u8,
    pub app_name: String,
    pub msgid: String,
    pub structured_data: String,
    pub msg: String,
}

impl Received {
    /// The value of `name="…"` in the structured data.
    pub fn sd_param(&self, name: &str) -> Option<&str> {
        let start = self.structured_data.find(&format!(" {name}=\""))? + name.len() + 3;
        let rest = &self.structured_data[start..];
        Some(&rest[..rest.find('"')?])
    }

    /// The event sequence number (`seq`) this message carries.
    pub fn seq(&self) -> Option<i64> {
        self.sd_param("seq")?.parse().ok()
    }
}

pub struct Rsyslog {
    dir: PathBuf,
    pub syslog_port: u16,
    pub relp_port: u16,
    child: Option<crate::Reaped>,
}

/// Whether something listens on 127.0.0.1:`port`, from /proc/net/tcp — not by connecting,
/// which rsyslog would log as a session ended without a TLS close.
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
}

fn binary() -> PathBuf {
    std::env::var("DALP_RSYSLOGD")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/sbin/rsyslogd"))
}

impl Rsyslog {
    /// Starts rsyslog in `dir` (created, owned by the server user) with the server
    /// certificate and key of `tls_dir` (made by `dalp_ops::pki::ensure`).
    pub fn start(dir: &Path, tls_dir: &Path) -> Rsyslog {
        let user = ServerUser::resolve().expect("server user");
        dalp_ops::pki::ensure(tls_dir, &user).expect("test certificates");
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let port = || dalp_ops::embedded::free_port().expect("free port");
        let (syslog_port, relp_port) = (port(), port());
        let d = dir.display();
        let t = tls_dir.display();
        let conf = format!(
            r#"global(workDirectory="{d}/work" maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{t}/ca.crt"
  defaultNetstreamDriverCertFile="{t}/server.crt"
  defaultNetstreamDriverKeyFile="{t}/server.key")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{syslog_port}")
module(load="imrelp")
input(type="imrelp" address="127.0.0.1" port="{relp_port}" tls="on"
  tls.caCert="{t}/ca.crt" tls.myCert="{t}/server.crt" tls.myPrivKey="{t}/server.key"
  tls.authMode="certvalid")
template(name="fields" type="list") {{
  property(name="hostname") constant(value="\t")
  property(name="timereported" dateFormat="rfc3339") constant(value="\t")
  property(name="syslogseverity") constant(value="\t")
  property(name="syslogfacility") constant(value="\t")
  property(name="app-name") constant(value="\t")
  property(name="msgid") constant(value="\t")
  property(name="structured-data") constant(value="\t")
  property(name="msg" controlcharacters="escape") constant(value="\n")
}}
if $syslogfacility-text == "syslog" then {{
  action(type="omfile" file="{d}/internal.log")
  stop
}}
action(type="omfile" file="{d}/received.log" template="fields")
"#
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        for p in [dir.to_path_buf(), dir.join("work")] {
            user.chown(&p).expect("chown rsyslog dir");
        }
        let mut r = Rsyslog {
            dir: dir.to_path_buf(),
            syslog_port,
            relp_port,
            child: None,
        };
        r.restart();
        r
    }

    /// Starts it (again), on the same ports, and waits until both listen.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "rsyslog is running");
        let user = ServerUser::resolve().expect("server user");
        let mut cmd = Command::new(binary());
        cmd.arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("stderr.log")).unwrap());
        user.configure(&mut cmd);
        let child = dalp_ops::process::spawn(cmd).expect("start rsyslogd");
        self.child = Some(crate::Reaped(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [self.syslog_port, self.relp_port] {
            while !listening(port) {
                assert!(
                    Instant::now() < deadline,
                    "rsyslog did not listen on {port}: {}",
                    std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops it with `signal` and waits until it is gone.
    pub fn stop_with(&mut self, signal: Signal) {
        if let Some(mut c) = self.child.take() {
            dalp_ops::process::stop_child(&mut c.0, signal, Duration::from_secs(10))
                .expect("stop rsyslogd");
        }
    }

    /// A clean shutdown (SIGTERM): it finishes what it read, then exits.
    pub fn stop(&mut self) {
        self.stop_with(Signal::SIGTERM);
    }

    /// SIGKILL: connections are reset, unread data is lost.
    pub fn kill(&mut self) {
        self.stop_with(Signal::SIGKILL);
    }

    /// Every message it wrote so far.
    pub fn received(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(self.dir.join("received.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.splitn(8, '\t').collect();
                (f.len() == 8).then(|| Received {
                    hostname: f[0].into(),
                    time: f[1].into(),
                    severity: f[2].parse().unwrap_or(255),
                    facility: f[3].parse().unwrap_or(255),
                    app_name: f[4].into(),
                    msgid: f[5].into(),
                    structured_data: f[6].into(),
                    msg: f[7].into(),
                })
            })
            .collect()
    }

    /// Its own diagnostics (session errors and the like): what it logged as facility
    /// syslog, then what it wrote to standard error.
    pub fn internal_log(&self) -> String {
        ["internal.log", "stderr.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }
}
