//! Hosts for multi-host tests: one network namespace per host, joined by a bridge the test
//! creates, with private test addresses (`10.213.K.0/24`; the bridge is `.1`, host i is
//! `.10+i`). Everything is removed when the [`TestNet`] is dropped, also after a failed
//! test. Faults: [`TestNet::isolate`] cuts a host off (its link down), [`TestNet::block`]
//! drops one direction of traffic between two hosts (a blackhole route in the sender),
//! [`TestNet::delay`] holds every packet a host sends for a while (latency, like
//! `tc netem delay`; this machine's kernel has no netem, so the packets go through an
//! NFQUEUE that a thread of the test releases when they are due).
//!
//! Needs root and iproute2 (`ip`), and for delays `iptables-legacy`
//! (`scripts/deps.sh` installs it); nothing leaves the bridge.

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

/// The NFQUEUE the delays use (queues are per namespace).
const DELAY_QUEUE: u16 = 7;

/// Packets of one host held back by [`TestNet::delay`]; dropping it removes the rule and
/// releases everything held.
pub struct Delay {
    ns: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Packets delayed so far (read after the drop through [`Delay::finish`]).
    delayed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn iptables(ns: &str, args: &[String]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-legacy", "-w"])
        .args(args)
        .output()
        .map_err(|e| {
            format!(
                "iptables-legacy {}: {e} (scripts/deps.sh installs iptables)",
                args.join(" ")
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "iptables-legacy {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The rule (`-A` adds, `-D` deletes) that queues every packet leaving by the host's link;
/// with no reader on the queue the packets pass.
fn delay_rule(op: &str) -> Vec<String> {
    let queue = DELAY_QUEUE.to_string();
    [
        op,
        "OUTPUT",
        "-o",
        "eth0",
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue,
        "--queue-bypass",
    ]
    .map(String::from)
    .to_vec()
}

impl TestNet {
    /// Holds every packet host `name` sends to the other hosts for `by` before it leaves
    /// (egress latency; replies from the others are not delayed by this call). Until the
    /// returned [`Delay`] is dropped.
    pub fn delay(&self, name: &str, by: std::time::Duration) -> Result<Delay, String> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let ns = self.host(name).ns.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = {
            let (ns, stop, delayed) = (ns.clone(), stop.clone(), delayed.clone());
            std::thread::spawn(move || {
                // The queue's socket belongs to the namespace its thread is in.
                let opened = (|| -> Result<nfq::Queue, String> {
                    let f = std::fs::File::open(format!("/run/netns/{ns}"))
                        .map_err(|e| format!("namespace {ns}: {e}"))?;
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("setns {ns}: {e}"))?;
                    let mut q = nfq::Queue::open().map_err(|e| format!("NFQUEUE: {e}"))?;
                    q.bind(DELAY_QUEUE)
                        .map_err(|e| format!("NFQUEUE bind: {e}"))?;
                    q.set_copy_range(DELAY_QUEUE, 0)
                        .and_then(|_| q.set_queue_max_len(DELAY_QUEUE, 65_536))
                        .and_then(|_| q.set_fail_open(DELAY_QUEUE, true))
                        .map_err(|e| format!("NFQUEUE config: {e}"))?;
                    q.set_nonblocking(true);
                    Ok(q)
                })();
                let mut q = match opened {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        q
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut held: std::collections::VecDeque<(std::time::Instant, nfq::Message)> =
                    Default::default();
                while !stop.load(Ordering::Relaxed) {
                    while let Ok(mut m) = q.recv() {
                        m.set_verdict(nfq::Verdict::Accept);
                        held.push_back((std::time::Instant::now() + by, m));
                        delayed.fetch_add(1, Ordering::Relaxed);
                    }
                    let now = std::time::Instant::now();
                    while held.front().is_some_and(|(due, _)| *due <= now) {
                        let (_, m) = held.pop_front().unwrap();
                        let _ = q.verdict(m);
                    }
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
                for (_, m) in held {
                    let _ = q.verdict(m);
                }
                let _ = q.unbind(DELAY_QUEUE);
            })
        };
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err("the delay thread ended".into()));
        let d = Delay {
            ns: ns.clone(),
            stop,
            thread: Some(thread),
            delayed,
        };
        started?;
        iptables(&ns, &delay_rule("-A"))?;
        Ok(d)
    }
}

impl Delay {
    /// Removes the delay now; how many packets it held back.
    pub fn finish(mut self) -> u64 {
        self.end();
        self.delayed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn end(&mut self) {
        // The rule first, so nothing new is queued; then the held packets go.
        let _ = iptables(&self.ns, &delay_rule("-D"));
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.end();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A TCP connect from `from`'s namespace to `to`'s address (a listener there), timed.
    fn connect_time(net: &TestNet, from: &str, to: &str, port: u16) -> Duration {
        let enter = |ns: &str| {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        };
        let (to_ns, to_addr) = (net.host(to).ns.clone(), net.host(to).address.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let server = {
            let addr = to_addr.clone();
            std::thread::spawn(move || {
                enter(&to_ns);
                let l = std::net::TcpListener::bind((addr.as_str(), port)).unwrap();
                tx.send(()).unwrap();
                let _ = l.accept().unwrap();
            })
        };
        rx.recv().unwrap();
        let from_ns = net.host(from).ns.clone();
        let took = std::thread::spawn(move || {
            enter(&from_ns);
            let t = Instant::now();
            std::net::TcpStream::connect((to_addr.as_str(), port)).unwrap();
            t.elapsed()
        })
        .join()
        .unwrap();
        server.join().unwrap();
        took
    }

    #[test]
    fn a_delay_holds_a_hosts_packets_and_ends_with_its_guard() {
        if !TestNet::available() {
            eprintln!("skipped: needs root and iproute2");
            return;
        }
        let net = TestNet::create(&["a", "b"]).unwrap();
        let delay = net.delay("a", Duration::from_millis(150)).unwrap();
        // The SYN waits 150 ms on a's way out; b's answer is not delayed.
        let held = connect_time(&net, "a", "b", 7001);
        assert!(held >= Duration::from_millis(150), "{held:?}");
        let packets = delay.finish();
        assert!(packets >= 1, "{packets}");
        // The rule is gone: nothing is queued any more (a reader-less queue would pass
        // packets too, so count on the rule list itself).
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.host("a").ns,
                "iptables-legacy",
                "-S",
                "OUTPUT",
            ])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("NFQUEUE"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        connect_time(&net, "a", "b", 7002);
    }
}
