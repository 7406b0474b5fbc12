//! A network namespace behind a shaped veth pair: a slow link for servers inside it.

use super::*;

/// A network namespace joined to this one by a veth pair whose namespace side is shaped to
/// `rate` (tc tbf), so traffic from a server inside it crosses a slow link. Removed on drop.
pub struct SlowLink {
    pub netns: String,
    /// The namespace side's address.
    pub ip: String,
}

impl SlowLink {
    pub fn new(name: &str, rate: &str) -> Self {
        let netns = format!("isb-{name}");
        let (host_if, ns_if) = (format!("isbh-{name}"), format!("isbn-{name}"));
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run(&["netns", "add", &netns]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["link", "set", &ns_if, "netns", &netns]);
        run(&["addr", "add", "10.213.0.1/30", "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        run(&[
            "netns",
            "exec",
            &netns,
            "ip",
            "addr",
            "add",
            "10.213.0.2/30",
            "dev",
            &ns_if,
        ]);
        run(&["netns", "exec", &netns, "ip", "link", "set", &ns_if, "up"]);
        run(&["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]);
        let out = Command::new("ip")
            .args([
                "netns", "exec", &netns, "tc", "qdisc", "add", "dev", &ns_if, "root", "tbf",
            ])
            .args(["rate", rate, "burst", "256kb", "latency", "100ms"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            netns,
            ip: "10.213.0.2".into(),
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}
