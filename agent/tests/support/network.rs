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

/// A TCP relay on loopback that adds a round-trip time to every connection to `upstream`
/// without touching its bandwidth (tc netem is not available here): each direction's bytes
/// are held for half the round trip, timestamped as they arrive, so that a stream keeps its
/// rate and only arrives later; a new connection waits one round trip before its first bytes
/// go on, as TCP's handshake would make it. What it cannot add is TCP's own behaviour over a
/// long path (slow start and loss recovery over the round trip): the relay's two legs are
/// loopback and a veth.
pub struct RoundTrip {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl RoundTrip {
    pub fn start(upstream: SocketAddr, rtt: Duration) -> Self {
        let (runtime, listener, addr) = loopback_server();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    tokio::time::sleep(rtt).await;
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(delayed(cr, sw, rtt / 2), delayed(sr, cw, rtt / 2));
                });
            }
        });
        Self {
            addr,
            runtime: Some(runtime),
        }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// Copies `from` to `to`, each read's bytes sent `delay` after they arrived.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 1024 reads of up to 64 KiB in flight at most: far more than a link's rate times a
    // round trip, and a bound if the reader stalls.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let reader = async move {
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            if tx
                .send((tokio::time::Instant::now() + delay, buf))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
