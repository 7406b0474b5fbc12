//! `/init` of the VM tests' initramfs (PID 1 in the guest), and the checks the tests run.
//!
//! As PID 1 it mounts the pseudo filesystems the agent needs, loads the kernel modules `cargo xtask
//! vm-test` put in the image, runs each test command listed in `/etc/imgstream/tests`, and
//! prints one verdict line on the console for the host to read:
//!
//! ```text
//! IMGSTREAM-VERDICT: PASS kernel=6.1.0-57-cloud-amd64 tests=1
//! IMGSTREAM-VERDICT: FAIL kernel=... failed=selftest
//! ```
//!
//! then powers the guest off. Whatever goes wrong, including a panic here, ends in a FAIL
//! verdict or, at worst, no verdict, which the host also counts as a failure.
//!
//! Run with arguments (`/init CHECK ARGS...`, not as PID 1), it is one of the checks the test
//! lists name; see [`checks`].

use std::{
    ffi::CString,
    fs,
    io::Write,
    os::fd::AsRawFd,
    path::Path,
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

mod checks;

use imgstream_vm_tests::VERDICT;

/// `finit_module` flag: the kernel decompresses the module itself (`.ko.xz`).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
/// The longest one test command may run.
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    if std::process::id() != 1 {
        std::process::exit(checks::main(std::env::args().skip(1).collect()));
    }
    std::panic::set_hook(Box::new(|info| {
        println!("guest-init panicked: {info}");
        println!("{VERDICT} FAIL kernel={} failed=guest-init-panic", kernel());
        power_off();
    }));
    let verdict = match run() {
        Ok(failed) if failed.is_empty() => "PASS".to_string(),
        Ok(failed) => format!("FAIL failed={}", failed.join(",")),
        Err(err) => format!("FAIL failed=setup error={err}"),
    };
    println!("{VERDICT} {verdict} kernel={}", kernel());
    power_off();
}

/// Sets the guest up and runs the tests; returns the names of those that failed.
fn run() -> Result<Vec<String>, String> {
    mount_pseudo_filesystems()?;
    for module in lines("/etc/imgstream/modules") {
        load_module(Path::new(&module))?;
    }
    let mut failed = Vec::new();
    let tests = lines("/etc/imgstream/tests");
    if tests.is_empty() {
        return Err("no tests listed in /etc/imgstream/tests".into());
    }
    for test in tests {
        // "name: argv..." per line.
        let Some((name, command)) = test.split_once(':') else {
            return Err(format!("malformed test line {test:?}"));
        };
        let argv: Vec<&str> = command.split_whitespace().collect();
        println!("=== {name}: {}", argv.join(" "));
        match run_test(&argv) {
            Ok(status) if status.success() => println!("=== {name}: passed"),
            Ok(status) => {
                println!("=== {name}: failed ({status})");
                failed.push(name.to_string());
            }
            Err(err) => {
                println!("=== {name}: could not run: {err}");
                failed.push(name.to_string());
            }
        }
    }
    Ok(failed)
}

fn run_test(argv: &[&str]) -> Result<ExitStatus, String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(program)
        .args(args)
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if start.elapsed() > TEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {TEST_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mount_pseudo_filesystems() -> Result<(), String> {
    // (source, target, fstype); /dev comes first so that /dev/fuse appears once fuse loads.
    let mounts = [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("tracefs", "/sys/kernel/tracing", "tracefs"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2"),
        ("tmpfs", "/tmp", "tmpfs"),
    ];
    for (source, target, fstype) in mounts {
        fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
        mount(source, target, fstype)?;
    }
    Ok(())
}

pub(crate) fn mount(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    mount_with(source, target, fstype, None)
}

/// mount(2) with an optional data string (filesystem options).
pub(crate) fn mount_with(
    source: &str,
    target: &str,
    fstype: &str,
    data: Option<&str>,
) -> Result<(), String> {
    let cstr = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (src, tgt, fst) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let data = data.map(cstr).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: NUL-terminated strings (and optional data) that outlive the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), 0, data_ptr) };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn load_module(path: &Path) -> Result<(), String> {
    let file = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: `file` is an open fd for the duration of the call; the parameter string is a
    // static empty C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("loading {}: {err}", path.display()));
        }
    }
    println!("loaded {}", path.display());
    Ok(())
}

/// Non-empty, non-comment lines of a file (none if it does not exist).
fn lines(path: &str) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot take no pointers; as PID 1 we may power the machine off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot(2) only returns on error; PID 1 must not exit (that panics the kernel).
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
