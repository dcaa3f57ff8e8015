//! A real EVM node for the indexer's tests: anvil (npm `@foundry-rs/anvil-linux-amd64`,
//! installed into `.tools/` by `scripts/deps.sh`, or `DALP_ANVIL`), on a free loopback port,
//! killed by pid when dropped, also when the test fails.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Anvil {
    _child: crate::Reaped,
    pub port: u16,
}

/// Where anvil is: `DALP_ANVIL`, else the project's `.tools/`.
pub fn anvil_binary() -> PathBuf {
    if let Ok(p) = std::env::var("DALP_ANVIL") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = root.join(".tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    assert!(
        p.exists(),
        "anvil not found at {}: run `source scripts/deps.sh` (installs it from npm) or set DALP_ANVIL",
        p.display()
    );
    p
}

impl Anvil {
    /// Starts anvil with `chain_id`, auto-mining one block per transaction.
    pub fn start(chain_id: u64) -> Anvil {
        Anvil::start_with(chain_id, &[])
    }

    /// [`Anvil::start`] with more anvil arguments (e.g. `--timestamp 0` for a genesis at
    /// time 0, as dev chains have).
    pub fn start_with(chain_id: u64, extra: &[&str]) -> Anvil {
        // Outside the ephemeral range: anvil binds it a moment later.
        let port = dalp_ops::embedded::free_port().expect("free port");
        let child = Command::new(anvil_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--chain-id", &chain_id.to_string(), "--silent"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start anvil");
        let anvil = Anvil {
            _child: crate::Reaped(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "anvil did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        anvil
    }

    /// The anvil process's pid (for the benchmarks' CPU accounting).
    pub fn pid(&self) -> u32 {
        self._child.0.id()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
