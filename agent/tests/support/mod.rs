//! Shared by the integration tests, one file per part: a real registry, test images, a
//! counting and fault-injecting proxy, containerd, a token server, a shaped network link, and
//! the `imgstream` processes; here, what every part uses (scratch directories, free ports,
//! root, the start-latency entrypoint).
#![allow(
    dead_code,
    unreachable_pub,
    unused_imports,
    reason = "each test binary uses a different subset"
)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub mod containerd;
pub mod cri;
pub mod image_tree;
pub mod images;
pub mod kube;
pub mod network;
pub mod processes;
pub mod proxy;
pub mod recorder;
pub mod registry;
pub mod token;

pub use containerd::*;
pub use images::*;
pub use network::*;
pub use processes::*;
pub use proxy::*;
pub use recorder::*;
pub use registry::*;
pub use token::*;

use bytes::Bytes;
use imgstream::{
    oci::{
        digest::Digest,
        manifest::{self, Descriptor, Manifest},
    },
    registry::{BlobSink, local::LocalLayout},
};

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imgstream-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-thread runtime and a non-blocking listener on a free loopback port, for the test
/// servers (proxy, token server) that run beside the test.
fn loopback_server() -> (tokio::runtime::Runtime, std::net::TcpListener, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    (runtime, listener, addr)
}

/// Detaches (`umount -l`) every mount at or below `root`: what a stopped snapshotter or
/// containerd left behind.
pub fn umount_below(root: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let root = root.display().to_string();
    for target in mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| t.starts_with(&root))
    {
        let _ = Command::new("umount").args(["-l", target]).status();
    }
}

/// Panics with a clear message unless running as root (mknod, chown, containerd, mounts).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (mknod, chown, containerd): run it as root, as `cargo xtask ci` does"
    );
}

/// The start-latency tests' container entrypoint (`support/clockprobe.rs`), compiled once
/// per test process with plain rustc for the static musl target.
pub fn clockprobe() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out =
                std::env::temp_dir().join(format!("imgstream-clockprobe-{}", std::process::id()));
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/clockprobe.rs");
            let status = Command::new("rustc")
                .args(["--edition", "2024", "-O", "-C", "strip=symbols"])
                .args(["--target", "x86_64-unknown-linux-musl", "-o"])
                .arg(&out)
                .arg(&source)
                .status()
                .expect("rustc is needed");
            assert!(
                status.success(),
                "compiling clockprobe (needs the musl target: cargo xtask setup)"
            );
            out
        })
        .clone()
}

/// A root filesystem at `dir` holding the clockprobe entrypoint and the directories a
/// container needs (`/truth` for the bind-mounted truth files), plus `extra` directories.
pub fn clockprobe_rootfs(dir: &Path, extra: &[&str]) -> PathBuf {
    for sub in ["tmp", "truth", "proc", "sys", "dev", "etc"]
        .iter()
        .chain(extra)
    {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(clockprobe(), dir.join("clockprobe")).unwrap();
    dir.to_path_buf()
}

/// Mount options for an in-process mount from a local layout: a cache in `cache` (plain
/// syscalls), reads failing after `read_deadline`, no background download, no prefetch, no
/// learning.
pub fn local_mount_options(
    cache: &Path,
    read_deadline: Duration,
) -> imgstream::mount::MountOptions {
    imgstream::mount::MountOptions {
        view: imgstream::fs::View::Merged,
        cache: imgstream::cache::CacheConfig {
            dir: cache.to_path_buf(),
            limit_bytes: None,
            prefer_uring: false,
        },
        fs: imgstream::fs::FsConfig {
            read_deadline,
            ..Default::default()
        },
        background: None,
        threads: 2,
        readahead_kb: None,
        prefetch: false,
        learned: None,
        share_learned: Default::default(),
        platform: imgstream::oci::manifest::Platform::host(),
        fetch_totals: None,
        fetch_journal: None,
        image_name: None,
    }
}

/// The checksum `clockprobe readafter` prints for a file it read (FNV-1a, 64 bits).
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
