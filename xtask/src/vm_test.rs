//! `cargo xtask vm-test`: the guest tests, on real guest kernels under QEMU.
//!
//! 1. Builds the guest programs as static musl binaries: `imgstream` (the agent, with its eBPF
//!    object) and `imgstream-guest-init` (vm-tests/, PID 1 in the guest).
//! 2. For each kernel, writes an initramfs: `/init`, `/bin/imgstream`, the kernel modules the
//!    tests need (that kernel's own, in load order) and the list of tests.
//! 3. Boots it with `-accel tcg` (KVM hangs on this machine) and reads the serial console until
//!    the guest prints its verdict line. A FAIL verdict, a kernel panic, a guest that exits
//!    without a verdict and one that outlives the timeout all fail the run. The whole console
//!    output stays in `target/vm-tests/<kernel>/console.log`.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cmd,
    initramfs::Initramfs,
    kernels::{self, GuestKernel},
};

const MUSL: &str = "x86_64-unknown-linux-musl";
const VERDICT: &str = "IMGSTREAM-VERDICT:";

/// The tests the guest runs, as "name: command line" (see vm-tests/src/main.rs).
const GUEST_TESTS: &str = "\
# The rename-ENXIO detector, end to end, against an emulated regression.
detector-selftest: /bin/imgstream selftest --workdir /tmp
";

/// How a guest run ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail(String),
    /// The kernel crashed before /init printed anything: nothing of ours ran yet.
    BootCrash(String),
}

pub(crate) fn run(root: &Path, filter: Option<&str>, timeout: Duration) -> anyhow::Result<()> {
    let kernels = kernels::all_installed(filter)?;
    let bins = build_guest_binaries(root)?;
    let mut results = Vec::new();
    for kernel in &kernels {
        let dir = root.join("target/vm-tests").join(&kernel.release);
        fs::create_dir_all(&dir)?;
        let initrd = dir.join("initramfs.cpio");
        write_initramfs(kernel, &bins, &initrd)?;
        let log = dir.join("console.log");
        eprintln!(
            "vm-test: booting {} ({} series) under TCG",
            kernel.release, kernel.series
        );
        let started = Instant::now();
        let mut outcome = boot(kernel, &initrd, &log, timeout)?;
        if let Outcome::BootCrash(why) = &outcome {
            // Seen rarely under TCG: an oops while the kernel patches its own code at boot.
            // None of our code has run, so one more boot is fair; a second crash fails.
            eprintln!(
                "vm-test: {} crashed before /init ran ({why}); booting once more",
                kernel.release
            );
            let _ = fs::rename(&log, log.with_extension("first-boot.log"));
            outcome = match boot(kernel, &initrd, &log, timeout)? {
                Outcome::BootCrash(why) => {
                    Outcome::Fail(format!("crashed twice before /init: {why}"))
                }
                other => other,
            };
        }
        let took = started.elapsed().as_secs_f32();
        match &outcome {
            Outcome::Pass => eprintln!("vm-test: {} PASS in {took:.1} s", kernel.release),
            Outcome::Fail(why) | Outcome::BootCrash(why) => {
                eprintln!(
                    "vm-test: {} FAIL in {took:.1} s: {why}; console log: {}",
                    kernel.release,
                    log.display()
                )
            }
        }
        results.push((kernel.release.clone(), outcome));
    }
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, o)| *o != Outcome::Pass)
        .collect();
    println!(
        "vm-test: {} passed, {} failed",
        results.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!(
            "VM tests failed on {}",
            failed
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

struct GuestBinaries {
    imgstream: PathBuf,
    init: PathBuf,
}

fn build_guest_binaries(root: &Path) -> anyhow::Result<GuestBinaries> {
    cmd::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--profile", "guest", "--target", MUSL])
            .args(["-p", "imgstream-agent", "--bin", "imgstream"])
            .args(["-p", "imgstream-vm-tests", "--bin", "imgstream-guest-init"]),
    )
    .context("building the static guest binaries (needs the musl target: `cargo xtask setup`)")?;
    let dir = root.join("target").join(MUSL).join("guest");
    Ok(GuestBinaries {
        imgstream: dir.join("imgstream"),
        init: dir.join("imgstream-guest-init"),
    })
}

fn write_initramfs(kernel: &GuestKernel, bins: &GuestBinaries, to: &Path) -> anyhow::Result<()> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut image = Initramfs::new();
    for dir in [
        "/bin",
        "/dev",
        "/etc",
        "/etc/imgstream",
        "/lib",
        "/lib/modules",
        "/proc",
        "/sys",
        "/tmp",
    ] {
        image.dir(dir);
    }
    // The kernel opens /dev/console as init's stdin, stdout and stderr.
    image.char_dev("/dev/console", 5, 1);
    image.file("/init", 0o755, &read(&bins.init)?);
    image.file("/bin/imgstream", 0o755, &read(&bins.imgstream)?);
    let mut load_order = String::new();
    for module in kernel.modules(&kernels::GUEST_MODULES)? {
        let name = module
            .file_name()
            .context("module path")?
            .to_string_lossy()
            .into_owned();
        let guest_path = format!("/lib/modules/{name}");
        image.file(&guest_path, 0o644, &read(&module)?);
        load_order.push_str(&guest_path);
        load_order.push('\n');
    }
    image.file("/etc/imgstream/modules", 0o644, load_order.as_bytes());
    image.file("/etc/imgstream/tests", 0o644, GUEST_TESTS.as_bytes());
    let mut file = fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    image.finish(&mut file)?;
    Ok(())
}

fn boot(
    kernel: &GuestKernel,
    initrd: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let mut qemu = Command::new("qemu-system-x86_64");
    // One vCPU: under multi-threaded TCG, the guest kernel's boot-time code patching
    // (static keys, via int3) raced across two vCPUs and oopsed now and then.
    qemu.args(["-accel", "tcg", "-m", "1024", "-smp", "1"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 oops=panic loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = qemu
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(&qemu)))?;
    let lines = read_lines(&mut child)?;
    let outcome = watch(&lines, log, &kernel.release, timeout);
    // After a verdict the guest powers itself off; give it a moment, then make sure.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// Forwards QEMU's stdout and stderr, line by line, into one channel.
fn read_lines(child: &mut Child) -> anyhow::Result<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

fn watch(
    lines: &mpsc::Receiver<String>,
    log: &Path,
    release: &str,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let deadline = Instant::now() + timeout;
    let mut userspace = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Ok(Outcome::Fail(format!(
                    "no verdict within {timeout:?} (hung guest)"
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(Outcome::Fail("QEMU exited without a verdict".into()));
            }
        };
        use std::io::Write as _;
        writeln!(log_file, "{line}")?;
        if !line.starts_with('[') {
            userspace = true;
            eprintln!("  [{release}] {line}");
        }
        if line.contains("Kernel panic") {
            let why = format!("kernel panic: {line}");
            return Ok(if userspace {
                Outcome::Fail(why)
            } else {
                Outcome::BootCrash(why)
            });
        }
        if let Some(verdict) = line.split_once(VERDICT).map(|(_, v)| v.trim()) {
            return Ok(if verdict.starts_with("PASS") {
                Outcome::Pass
            } else {
                Outcome::Fail(format!("guest verdict: {verdict}"))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome_of(lines: &[&str], hang: bool) -> Outcome {
        let (tx, rx) = mpsc::channel();
        for line in lines {
            tx.send(line.to_string()).unwrap();
        }
        // A hung guest keeps the console open; an exited one closes it.
        let _keep_open = hang.then(|| tx.clone());
        drop(tx);
        let log = std::env::temp_dir().join(format!("vm-test-watch-{}.log", std::process::id()));
        let outcome = watch(&rx, &log, "test", Duration::from_millis(300)).unwrap();
        let _ = fs::remove_file(log);
        outcome
    }

    #[test]
    fn only_a_pass_verdict_passes() {
        let pass = outcome_of(&["[ 0.1] boot", "IMGSTREAM-VERDICT: PASS kernel=x"], false);
        assert_eq!(pass, Outcome::Pass);
        let fail = outcome_of(&["IMGSTREAM-VERDICT: FAIL failed=selftest kernel=x"], false);
        assert!(matches!(fail, Outcome::Fail(why) if why.contains("failed=selftest")));
    }

    #[test]
    fn panics_hangs_and_silent_exits_fail() {
        let panic = outcome_of(
            &[
                "=== selftest",
                "[ 1.0] Kernel panic - not syncing: Attempted to kill init!",
            ],
            true,
        );
        assert!(matches!(panic, Outcome::Fail(why) if why.starts_with("kernel panic")));
        let early = outcome_of(
            &[
                "[ 0.9] Oops: int3",
                "[ 0.9] Kernel panic - not syncing: Fatal exception",
            ],
            true,
        );
        assert!(
            matches!(early, Outcome::BootCrash(_)),
            "a crash before /init is told apart"
        );
        let hang = outcome_of(&["[ 0.1] boot"], true);
        assert!(matches!(hang, Outcome::Fail(why) if why.contains("hung")));
        let exited = outcome_of(&["[ 0.1] boot"], false);
        assert!(matches!(exited, Outcome::Fail(why) if why.contains("without a verdict")));
    }
}
