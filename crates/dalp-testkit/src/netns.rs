//! Hosts for multi-host tests: one network namespace per host, joined by a bridge the test
//! creates, with private test addresses (`10.213.K.0/24`; the bridge is `.1`, host i is
//! `.10+i`). Everything is removed when the [`TestNet`] is dropped, also after a failed
//! test. Faults: [`TestNet::isolate`] cuts a host off (its link down), [`TestNet::block`]
//! drops one direction of traffic between two hosts (a blackhole route in the sender).
//!
//! Needs root and iproute2 (`ip`); nothing leaves the bridge.

use std::process::{Command, Output};

/// One simulated host.
#[derive(Debug, Clone)]
pub struct NetHost {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub address: String,
}

/// A bridge and one namespace per host.
pub struct TestNet {
    bridge: String,
    net: u8,
    pub hosts: Vec<NetHost>,
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

impl TestNet {
    /// Whether this machine can make namespaces (root, `ip` present).
    pub fn available() -> bool {
        nix::unistd::geteuid().is_root()
            && Command::new("ip")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
    }

    /// Creates the bridge and one namespace per name.
    pub fn create(names: &[&str]) -> Result<TestNet, String> {
        // A subnet (and bridge name) of our own: from the pid, skipping ones in use.
        let mut net = (std::process::id() % 200 + 20) as u8;
        let bridge = loop {
            let b = format!("dalpbr{net}");
            if ip(&["link", "show", &b]).is_err() {
                break b;
            }
            net = net.wrapping_add(1).max(20);
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let mut t = TestNet {
            bridge: bridge.clone(),
            net,
            hosts: Vec::new(),
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", t.gateway()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("dalp{net}-{name}");
            let veth = format!("v{net}-{i}");
            let address = format!("10.213.{net}.{}", 11 + i);
            ip(&["netns", "add", &ns])?;
            t.hosts.push(NetHost {
                name: name.to_string(),
                ns: ns.clone(),
                address: address.clone(),
            });
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(t)
    }

    /// The bridge's own address (where the test's clients come from).
    pub fn gateway(&self) -> String {
        format!("10.213.{}.1", self.net)
    }

    /// The test network in CIDR form.
    pub fn subnet(&self) -> String {
        format!("10.213.{}.0/24", self.net)
    }

    pub fn host(&self, name: &str) -> &NetHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no test host {name}"))
    }

    /// A command that runs inside host `name`'s namespace.
    pub fn command(&self, name: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).ns]).arg(program);
        c
    }

    /// Cuts host `name` off from every other host and the test (`on`), or reconnects it.
    pub fn isolate(&self, name: &str, on: bool) -> Result<(), String> {
        let ns = &self.host(name).ns;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "eth0",
            if on { "down" } else { "up" },
        ])?;
        if !on {
            // The link came back without its route to the subnet only if the address went;
            // it did not, but wait for the kernel to mark the link usable.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Ok(())
    }

    /// Drops every packet host `from` sends to host `to` (`on`), or lets them through again:
    /// a one-way partition (TCP between them then fails both ways, other paths stay).
    pub fn block(&self, from: &str, to: &str, on: bool) -> Result<(), String> {
        let dst = format!("{}/32", self.host(to).address);
        let ns = &self.host(from).ns;
        ip(&[
            "-n",
            ns,
            "route",
            if on { "add" } else { "del" },
            "blackhole",
            &dst,
        ])
        .map(|_| ())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
