//! A TCP proxy between a client and the registry that counts bytes and injects faults.

use super::*;

/// What the proxy does to connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the first `n` connections right after accepting them.
    ResetFirst(usize),
    /// Close every connection right after accepting it.
    ResetAll,
    /// Forward only the first `n` bytes of the first response of each of the first `m`
    /// connections, then close.
    TruncateFirst {
        bytes: u64,
        connections: usize,
    },
    /// Accept connections and never answer.
    Stall,
}

/// A TCP proxy on loopback that counts the bytes it forwards from the upstream and can
/// inject faults.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Once set, every connection, open or new, is dropped: the registry is gone, while the
    /// port stays ours (no other test's proxy can take it).
    cut: Arc<std::sync::atomic::AtomicBool>,
    pub downstream_bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, fault: Fault) -> Self {
        let (runtime, listener, addr) = loopback_server();
        let downstream_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (bytes, conns) = (downstream_bytes.clone(), connections.clone());
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut_flag = cut.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if cut_flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let n = conns.fetch_add(1, Ordering::SeqCst);
                let reset = match fault {
                    Fault::ResetFirst(k) => n < k,
                    Fault::ResetAll => true,
                    _ => false,
                };
                if fault == Fault::Stall {
                    // Hold the connection open, silent, until the proxy goes away.
                    tokio::spawn(async move {
                        let _client = client;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    });
                    continue;
                }
                if reset {
                    // SO_LINGER 0 turns the close into a reset.
                    #[expect(deprecated, reason = "a zero linger resets at once; nothing blocks")]
                    let _ = client.set_linger(Some(Duration::ZERO));
                    drop(client);
                    continue;
                }
                let limit = match fault {
                    Fault::TruncateFirst { bytes, connections } if n < connections => Some(bytes),
                    _ => None,
                };
                let bytes = bytes.clone();
                let cut_flag = cut_flag.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent = 0u64;
                    loop {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let Ok(n) = sr.read(&mut buf).await else {
                            break;
                        };
                        if n == 0 || cut_flag.load(Ordering::SeqCst) {
                            break;
                        }
                        let n = match limit {
                            Some(l) if sent + n as u64 >= l => (l - sent) as usize,
                            _ => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        sent += n as u64;
                        bytes.fetch_add(n as u64, Ordering::SeqCst);
                        if limit.is_some_and(|l| sent >= l) {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Self {
            addr,
            cut,
            downstream_bytes,
            connections,
            runtime: Some(runtime),
        }
    }

    /// Takes the registry away: connections are dropped from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn bytes(&self) -> u64 {
        self.downstream_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
