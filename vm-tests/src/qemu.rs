//! Booting a guest kernel and initramfs under QEMU and reading its verdict off the serial
//! console. `-accel tcg` always: KVM hangs on the machines this runs on. A FAIL verdict, a
//! kernel panic, a guest that exits without a verdict and one that outlives the timeout all
//! fail; the whole console output is kept in a log file.

use std::{
    fs,
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{VERDICT, kernels::GuestKernel};

/// A vhost-user-fs device for the guest: the backend's socket and the tag to mount.
#[derive(Clone, Debug)]
pub struct VirtioFsDevice {
    pub socket: PathBuf,
    pub tag: String,
    /// Request queues the device has (QEMU's `num-request-queues`).
    pub request_queues: u16,
}

/// One guest boot.
#[derive(Clone, Debug)]
pub struct Boot<'a> {
    pub kernel: &'a GuestKernel,
    pub initrd: &'a Path,
    /// Where the console output goes.
    pub log: &'a Path,
    pub timeout: Duration,
    pub virtiofs: Vec<VirtioFsDevice>,
    /// A console line (substring) on which the host kills QEMU with SIGKILL: the guest
    /// vanishes as a crashed or killed VM would, whatever it was doing.
    pub kill_on: Option<&'a str>,
}

/// How a guest run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    /// The kernel crashed before /init printed anything: nothing of ours ran yet.
    BootCrash(String),
    /// The host killed QEMU on the `kill_on` line.
    Killed,
}

/// The outcome and the guest's userspace console lines (kernel messages left out).
#[derive(Debug)]
pub struct Run {
    pub outcome: Outcome,
    pub lines: Vec<String>,
}

/// How long after the `kill_on` line QEMU is killed.
const KILL_DELAY: Duration = Duration::from_millis(1000);

/// Guest memory: shared (memfd) so that vhost-user backends can map it.
const MEMORY_MIB: u32 = 1024;

impl Boot<'_> {
    fn command(&self) -> Command {
        let mut qemu = Command::new("qemu-system-x86_64");
        // One vCPU: under multi-threaded TCG, the guest kernel's boot-time code patching
        // (static keys, via int3) raced across two vCPUs and oopsed now and then.
        qemu.args([
            "-accel",
            "tcg",
            "-m",
            &format!("{MEMORY_MIB}M"),
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(self.kernel.vmlinuz())
        .arg("-initrd")
        .arg(self.initrd)
        .args(["-append", "console=ttyS0 panic=-1 oops=panic loglevel=4"]);
        if !self.virtiofs.is_empty() {
            qemu.args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
                "-numa",
                "node,memdev=mem",
            ]);
        }
        for (i, device) in self.virtiofs.iter().enumerate() {
            qemu.arg("-chardev")
                .arg(format!("socket,id=fs{i},path={}", device.socket.display()))
                .arg("-device")
                .arg(format!(
                    "vhost-user-fs-pci,chardev=fs{i},tag={},num-request-queues={}",
                    device.tag, device.request_queues
                ));
        }
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        qemu
    }

    /// Boots once.
    pub fn run(&self) -> anyhow::Result<Run> {
        let mut qemu = self.command();
        let mut child = qemu.spawn().with_context(|| {
            format!("starting QEMU ({qemu:?}): `cargo xtask setup` installs it")
        })?;
        let lines = read_lines(&mut child)?;
        let run = watch(
            &lines,
            self.log,
            &self.kernel.release,
            self.timeout,
            self.kill_on,
        );
        if matches!(
            run,
            Ok(Run {
                outcome: Outcome::Killed,
                ..
            })
        ) {
            // Let the guest get on with what it announced (a request in flight), then kill.
            std::thread::sleep(KILL_DELAY);
            let _ = child.kill();
        }
        // After a verdict the guest powers itself off; give it a moment, then make sure.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        run
    }

    /// Boots, and boots once more if the kernel crashed before /init ran (seen rarely under
    /// TCG: an oops while the kernel patches its own code). A second crash fails.
    pub fn run_retrying(&self) -> anyhow::Result<Run> {
        let first = self.run()?;
        let Outcome::BootCrash(why) = &first.outcome else {
            return Ok(first);
        };
        eprintln!(
            "vm-test: {} crashed before /init ran ({why}); booting once more",
            self.kernel.release
        );
        let _ = fs::rename(self.log, self.log.with_extension("first-boot.log"));
        let mut second = self.run()?;
        if let Outcome::BootCrash(why) = &second.outcome {
            second.outcome = Outcome::Fail(format!("crashed twice before /init: {why}"));
        }
        Ok(second)
    }
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

/// Reads console lines until a verdict, a panic, the kill line, silence or the timeout.
pub fn watch(
    lines: &mpsc::Receiver<String>,
    log: &Path,
    release: &str,
    timeout: Duration,
    kill_on: Option<&str>,
) -> anyhow::Result<Run> {
    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let deadline = Instant::now() + timeout;
    let mut userspace = Vec::new();
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Outcome::Fail(format!("no verdict within {timeout:?} (hung guest)"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Outcome::Fail("QEMU exited without a verdict".into());
            }
        };
        writeln!(log_file, "{line}")?;
        if !line.starts_with('[') {
            eprintln!("  [{release}] {line}");
            userspace.push(line.clone());
        }
        if line.contains("Kernel panic") {
            let why = format!("kernel panic: {line}");
            break if userspace.is_empty() {
                Outcome::BootCrash(why)
            } else {
                Outcome::Fail(why)
            };
        }
        if kill_on.is_some_and(|marker| line.contains(marker)) {
            break Outcome::Killed;
        }
        if let Some(verdict) = line.split_once(VERDICT).map(|(_, v)| v.trim()) {
            break if verdict.starts_with("PASS") {
                Outcome::Pass
            } else {
                Outcome::Fail(format!("guest verdict: {verdict}"))
            };
        }
    };
    Ok(Run {
        outcome,
        lines: userspace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome_of(lines: &[&str], hang: bool, kill_on: Option<&str>) -> Outcome {
        let (tx, rx) = mpsc::channel();
        for line in lines {
            tx.send(line.to_string()).unwrap();
        }
        // A hung guest keeps the console open; an exited one closes it.
        let _keep_open = hang.then(|| tx.clone());
        drop(tx);
        let log = std::env::temp_dir().join(format!("vm-test-watch-{}.log", std::process::id()));
        let run = watch(&rx, &log, "test", Duration::from_millis(300), kill_on).unwrap();
        let _ = fs::remove_file(log);
        run.outcome
    }

    #[test]
    fn only_a_pass_verdict_passes() {
        let pass = outcome_of(
            &["[ 0.1] boot", "IMGSTREAM-VERDICT: PASS kernel=x"],
            false,
            None,
        );
        assert_eq!(pass, Outcome::Pass);
        let fail = outcome_of(
            &["IMGSTREAM-VERDICT: FAIL failed=selftest kernel=x"],
            false,
            None,
        );
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
            None,
        );
        assert!(matches!(panic, Outcome::Fail(why) if why.starts_with("kernel panic")));
        let early = outcome_of(
            &[
                "[ 0.9] Oops: int3",
                "[ 0.9] Kernel panic - not syncing: Fatal exception",
            ],
            true,
            None,
        );
        assert!(
            matches!(early, Outcome::BootCrash(_)),
            "a crash before /init is told apart"
        );
        let hang = outcome_of(&["[ 0.1] boot"], true, None);
        assert!(matches!(hang, Outcome::Fail(why) if why.contains("hung")));
        let exited = outcome_of(&["[ 0.1] boot"], false, None);
        assert!(matches!(exited, Outcome::Fail(why) if why.contains("without a verdict")));
    }

    #[test]
    fn the_kill_line_ends_the_run_before_any_verdict() {
        let killed = outcome_of(
            &["=== read", "KILL-ME now", "IMGSTREAM-VERDICT: PASS"],
            true,
            Some("KILL-ME"),
        );
        assert_eq!(killed, Outcome::Killed);
    }
}
