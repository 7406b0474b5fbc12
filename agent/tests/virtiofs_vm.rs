//! Images served to real guests over vhost-user virtio-fs, under QEMU (TCG), on each guest
//! kernel (Debian 6.1 and 6.12), the image's device with two request queues. Run by `cargo xtask vm-test`, which builds the static guest
//! programs first and points `IMGSTREAM_GUEST_BIN_DIR` at them; ignored otherwise.
//!
//! On the host: Debian's docker-registry with a converted image (every kind of file), a TCP
//! proxy counting every byte the registry sends, two `imgstream serve-vhost` backends (the
//! image, and the same image from a second registry that is stopped once the backend is up)
//! and an `imgstream mount` of the image on the same cache. Each guest mounts both shares and
//! checks, through its own /init:
//! - the whole tree against the description of a GNU tar extraction of the layers (types,
//!   modes, owners, sizes, times, link targets, devices, xattrs, hard links, sha256);
//! - overlayfs with the share as the lower layer: new files, copy-up, rename, delete,
//!   whiteouts, and symlink renames that must not fail with ENXIO on these kernels;
//! - EIO within the deadline from the share whose registry is stopped, and a share that
//!   still lists afterwards;
//! - the rename-ENXIO detector's selftest (the failure emulated by a FUSE filesystem);
//! - the agent's own FUSE filesystem on the guest's kernel: `imgstream mount` of the image as
//!   an eStargz OCI layout in the initramfs, the tree checked twice, FUSE passthrough
//!   negotiated where the kernel has it (6.12) and not where it does not (6.1), and the agent
//!   exiting cleanly once its mount point is unmounted.
//!
//! The host read the whole image through FUSE first; the guests then transfer nothing from the
//! registry (one cache). Between the kernels, a guest is killed in the middle of a read; both
//! backends survive it and serve the next guest on the same socket. SIGTERM stops them
//! cleanly, even with a guest connected. The guest's sequential read throughput is reported against the host's FUSE read of
//! the same cached file.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use imgstream_vm_tests::{
    RESULT,
    initramfs::{self, GuestBinaries},
    kernels::{self, GuestKernel},
    qemu::{Boot, Outcome, VirtioFsDevice},
    tree,
};
use support::{
    Fault, Mounted, Proxy, Registry,
    image_tree::{expected_merged, layer_dirs, tar_layers},
};

const KILL_MARKER: &str = "IMGSTREAM-KILL-ME";
/// The deadline of the share whose registry is stopped.
const FAULTY_DEADLINE_SECS: u64 = 4;
/// The longest a guest's read(2) of it may take: each FUSE request fails at the deadline, and
/// the guest kernel follows a failed readahead with one more read of the page it needs, so a
/// read(2) can take two deadlines; plus slack for the emulated guest.
const EIO_LIMIT_SECS: u64 = 2 * FAULTY_DEADLINE_SECS + 3;

/// `imgstream serve-vhost` as a child process.
struct Backend {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Backend {
    fn start(image: &str, socket: &Path, cache: &Path, registry: &str, extra: &[&str]) -> Self {
        let log = socket.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_imgstream"))
            .args(["serve-vhost", image, "--socket"])
            .arg(socket)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--insecure-registry", registry, "--no-background"])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut backend = Self {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                backend.alive(),
                "serve-vhost exited: {}",
                backend.log_text()
            );
            assert!(Instant::now() < deadline, "no socket after 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        backend
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM: exits 0 within seconds and removes its socket.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "serve-vhost ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = self.log_text();
        assert!(status.success(), "serve-vhost exited with {status}: {log}");
        assert!(!self.socket.exists(), "the socket outlived the backend");
        log
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn guest_binaries() -> GuestBinaries {
    let dir = std::env::var_os("IMGSTREAM_GUEST_BIN_DIR").expect(
        "IMGSTREAM_GUEST_BIN_DIR is not set: run the VM tests with `cargo xtask vm-test`, which \
         builds the static guest binaries first",
    );
    GuestBinaries::in_dir(Path::new(&dir))
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("needs root");
}

/// Seconds to read `path` sequentially with 1 MiB reads.
fn time_read(path: &Path) -> (u64, f64) {
    use std::io::Read;
    let started = Instant::now();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, started.elapsed().as_secs_f64())
}

/// The guest's `key=value` result fields.
/// Every regular file under `dir`: its path relative to `dir`, and its bytes.
fn walk_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(at) = dirs.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn result_field(lines: &[String], key: &str) -> Option<f64> {
    lines
        .iter()
        .filter_map(|l| l.split_once(RESULT).map(|(_, r)| r))
        .flat_map(str::split_whitespace)
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

struct Vm<'a> {
    kernel: &'a GuestKernel,
    bins: &'a GuestBinaries,
    dir: &'a Path,
    devices: Vec<VirtioFsDevice>,
    timeout: Duration,
}

impl Vm<'_> {
    fn boot(
        &self,
        name: &str,
        tests: &str,
        files: &[(&str, &[u8])],
        kill_on: Option<&str>,
    ) -> imgstream_vm_tests::qemu::Run {
        let image = initramfs::test_image(self.kernel, self.bins, tests, files).unwrap();
        let initrd = self
            .dir
            .join(format!("{}-{name}.cpio", self.kernel.release));
        std::fs::write(&initrd, image).unwrap();
        let log = self.dir.join(format!("{}-{name}.log", self.kernel.release));
        eprintln!("booting {} ({name})", self.kernel.release);
        Boot {
            kernel: self.kernel,
            initrd: &initrd,
            log: &log,
            timeout: self.timeout,
            virtiofs: self.devices.clone(),
            kill_on,
        }
        .run_retrying()
        .unwrap()
    }
}

#[test]
#[ignore = "boots QEMU guests: run by `cargo xtask vm-test`"]
fn guests_stream_the_image_over_virtio_fs_from_the_hosts_cache() {
    support::require_root();
    let bins = guest_binaries();
    let filter = std::env::var("IMGSTREAM_GUEST_KERNEL").ok();
    let kernels = kernels::all_installed(filter.as_deref()).unwrap();
    let bench = std::env::var_os("IMGSTREAM_VIRTIOFS_BENCH").is_some();
    let timeout = Duration::from_secs(
        std::env::var("IMGSTREAM_GUEST_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300),
    );
    let scratch = support::scratch("virtiofs-vm");
    let logs = std::env::var_os("IMGSTREAM_VM_LOG_DIR")
        .map_or_else(|| scratch.join("logs"), PathBuf::from);
    std::fs::create_dir_all(&logs).unwrap();

    // The image: every kind of file (the FUSE tests' layers), plus a file to time reads of.
    let dirs = layer_dirs(&scratch);
    let bench_bytes = if bench { 128 << 20 } else { 16 << 20 };
    std::fs::write(
        dirs[0].join("usr/lib/bench.bin"),
        support::noise(7, bench_bytes),
    )
    .unwrap();
    let tarballs = tar_layers(&dirs, &scratch);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let layout = scratch.join("layout");
    runtime.block_on(support::build_image_from_tarballs(
        &layout,
        "v1",
        &tarballs,
        &["/bin/sh"],
    ));
    // The same image as eStargz in an OCI layout, for the guests to mount with the agent's
    // own FUSE filesystem on their kernels (one with FUSE passthrough, one without).
    let esgz_layout = scratch.join("esgz-layout");
    support::imgstream(&[
        "convert",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci:{}:v1", esgz_layout.display()),
        "--chunk-size",
        "1M",
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    let layout_files: Vec<(String, Vec<u8>)> = walk_files(&esgz_layout)
        .into_iter()
        .map(|(rel, data)| (format!("/image/layout/{rel}"), data))
        .collect();
    let expected = scratch.join("expected");
    expected_merged(&tarballs, &expected);
    let expected_tree = tree::describe(&expected).unwrap();

    // Registry A holds the image; registry B the same image, to be stopped.
    let registry = Registry::start("virtiofs-a", None);
    let stopped = Registry::start("virtiofs-b", None);
    for reg in [&registry, &stopped] {
        support::skopeo_copy(
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://{}/src/app:v1", reg.host()),
        );
        support::imgstream(&[
            "convert",
            &format!("{}/src/app:v1", reg.host()),
            &format!("{}/esgz/app:v1", reg.host()),
            "--insecure-registry",
            &reg.host(),
            "--chunk-size",
            "1M",
            "--scratch",
            scratch.to_str().unwrap(),
        ]);
    }
    let proxy = Proxy::start(registry.addr, Fault::None);
    let image = format!("{}/esgz/app:v1", proxy.host());
    let cache = scratch.join("cache");

    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let main = Backend::start(
        &image,
        &scratch.join("image.sock"),
        &cache,
        &proxy.host(),
        &[
            "--request-queues",
            "2",
            "--metrics-addr",
            &metrics_addr.to_string(),
        ],
    );
    let faulty = Backend::start(
        &format!("{}/esgz/app:v1", stopped.host()),
        &scratch.join("faulty.sock"),
        &scratch.join("faulty-cache"),
        &stopped.host(),
        &[
            "--read-deadline-secs",
            &FAULTY_DEADLINE_SECS.to_string(),
            "--timeout-secs",
            "2",
        ],
    );
    // The backend has the manifest and TOCs; from now on the registry answers nothing.
    stopped.pause();

    // The host reads the whole image through FUSE, on the same cache.
    let host = Mounted::start(
        &image,
        &scratch.join("mnt"),
        &cache,
        &proxy.host(),
        &["--no-background"],
    );
    let diff = tree::differences(&tree::describe(&host.mountpoint).unwrap(), &expected_tree);
    assert!(diff.is_empty(), "host FUSE mount: {diff:?}");
    drop_page_cache();
    let (host_bytes, host_secs) = time_read(&host.mountpoint.join("usr/lib/bench.bin"));
    let host_rate = host_bytes as f64 / host_secs / 1e6;
    let fetched_by_host = proxy.bytes();
    assert!(
        fetched_by_host > bench_bytes as u64 / 2,
        "the host read fetched the image"
    );

    let tests = format!(
        "\
mount-image: /init mount virtiofs imgstream /mnt/image
throughput: /init read-throughput /mnt/image/usr/lib/bench.bin
tree: /init check-tree /mnt/image /etc/imgstream/expected-tree
overlay: /init overlay-ops /mnt/image etc/motd etc/hostname usr/big-symlink
mount-faulty: /init mount virtiofs faulty /mnt/faulty
stopped-registry-eio: /init expect-eio /mnt/faulty/usr/lib/big.bin {EIO_LIMIT_SECS}
detector-selftest: /bin/imgstream selftest --workdir /tmp
fuse-image: /init fuse-image /image/layout /mnt/fuse /etc/imgstream/expected-tree
"
    );
    let expected_text = tree::to_text(&expected_tree);
    let mut files: Vec<(&str, &[u8])> =
        vec![("/etc/imgstream/expected-tree", expected_text.as_bytes())];
    files.extend(
        layout_files
            .iter()
            .map(|(path, data)| (path.as_str(), data.as_slice())),
    );
    let devices = vec![
        VirtioFsDevice {
            socket: main.socket.clone(),
            tag: "imgstream".into(),
            request_queues: 2,
        },
        VirtioFsDevice {
            socket: faulty.socket.clone(),
            tag: "faulty".into(),
            request_queues: 1,
        },
    ];
    let (mut main, mut faulty) = (main, faulty);
    let mut rates = Vec::new();
    for (i, kernel) in kernels.iter().enumerate() {
        let vm = Vm {
            kernel,
            bins: &bins,
            dir: &logs,
            devices: devices.clone(),
            timeout,
        };
        let started = Instant::now();
        let run = vm.boot("virtiofs", &tests, &files, None);
        assert_eq!(
            run.outcome,
            Outcome::Pass,
            "{}: see the console log in {}",
            kernel.release,
            logs.display()
        );
        eprintln!(
            "{}: every guest test passed in {:.1} s",
            kernel.release,
            started.elapsed().as_secs_f32()
        );
        assert_eq!(
            proxy.bytes(),
            fetched_by_host,
            "the guest's reads came from the host's cache: nothing more from the registry"
        );
        // The backend's own figures say the same: requests served, none malformed, every
        // chunk from the cache and not one byte fetched.
        let (status, page) = support::http_get(metrics_addr, "/metrics");
        assert_eq!(status, 200);
        let sessions = support::metric(&page, "imgstream_virtiofs_sessions_total");
        assert!(
            sessions > i as u64,
            "{sessions} sessions after {} guests",
            i + 1
        );
        assert!(support::metric(&page, "imgstream_virtiofs_requests_total") > 0);
        assert_eq!(
            support::metric(&page, "imgstream_virtiofs_bad_requests_total"),
            0
        );
        assert!(support::metric(&page, "imgstream_fetch_cache_hits_total") > 0);
        for priority in ["on_demand", "read_around", "background"] {
            let series = format!("imgstream_fetch_bytes_total{{priority=\"{priority}\"}}");
            assert_eq!(support::metric(&page, &series), 0, "{series}");
        }
        // The agent's FUSE mount in the guest took the path its kernel allows.
        let passthrough = result_field(&run.lines, "fuse-passthrough").expect("fuse-image line");
        assert_eq!(
            passthrough == 1.0,
            kernel.has_fuse_passthrough().unwrap(),
            "{}: FUSE passthrough negotiated iff the kernel has it",
            kernel.release
        );
        eprintln!(
            "{}: the agent's FUSE mount, passthrough {}",
            kernel.release,
            if passthrough == 1.0 { "on" } else { "off" }
        );
        let guest_rate = result_field(&run.lines, "guest-read-mb-per-s").expect("throughput line");
        rates.push((kernel.release.clone(), guest_rate));
        assert!(
            main.alive() && faulty.alive(),
            "both backends outlive a guest"
        );

        if i == 0 {
            // A guest killed while its read waits on the stopped registry.
            let run = vm.boot(
                "killed",
                &format!(
                    "mount-faulty: /init mount virtiofs faulty /mnt/faulty\n\
                     hang: /init hang-read /mnt/faulty/usr/lib/big.bin {KILL_MARKER}\n"
                ),
                &[],
                Some(KILL_MARKER),
            );
            assert_eq!(run.outcome, Outcome::Killed, "the guest reached the read");
            std::thread::sleep(Duration::from_millis(FAULTY_DEADLINE_SECS * 1000 + 500));
            assert!(
                main.alive() && faulty.alive(),
                "both backends survive a guest killed mid-request"
            );
        }
    }

    // SIGTERM while a guest is connected: the backends stop at once and clean up.
    let sessions = kernels.len() + 2;
    let last = kernels.last().unwrap();
    let guest = std::thread::scope(|scope| {
        let guest = scope.spawn(|| {
            Vm {
                kernel: last,
                bins: &bins,
                dir: &logs,
                devices: devices.clone(),
                timeout,
            }
            .boot(
                "stopped-backend",
                "mount-image: /init mount virtiofs imgstream /mnt/image\n\
                 wait: /init sleep 10\n",
                &[],
                None,
            )
        });
        let connected = format!("session={sessions}");
        let deadline = Instant::now() + timeout;
        while !main.log_text().contains(&connected) {
            assert!(Instant::now() < deadline, "the last guest never connected");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(3));
        let stopped_at = Instant::now();
        let main_log = main.stop();
        let faulty_log = faulty.stop();
        eprintln!(
            "both backends stopped {:.1} s after SIGTERM with a guest connected",
            stopped_at.elapsed().as_secs_f32()
        );
        for log in [&main_log, &faulty_log] {
            assert!(
                log.contains(&format!("sessions={sessions}")),
                "one session per guest, on one socket: {log}"
            );
        }
        assert!(main_log.contains("stopping with a VMM still connected"));
        guest.join().unwrap()
    });
    // Whatever the guest made of losing its filesystem, its VM ended.
    eprintln!(
        "the guest of the stopped backends ended: {:?}",
        guest.outcome
    );
    host.stop();
    stopped.resume();

    eprintln!(
        "\nvirtio-fs sequential read of a cached {} MiB file:",
        bench_bytes >> 20
    );
    eprintln!("  host, FUSE:        {host_rate:8.1} MB/s");
    for (release, rate) in &rates {
        eprintln!(
            "  guest {release:28} {rate:8.1} MB/s  = {:.2}x the host's FUSE read",
            rate / host_rate
        );
    }
    eprintln!(
        "  (QEMU runs the guest under TCG here, an emulated CPU: the ratio measures this \
         machine's emulation as much as the transport; absolute guest numbers mean little)"
    );
    drop(runtime);
    drop(registry);
    drop(stopped);
    let _ = std::fs::remove_dir_all(&scratch);
}
