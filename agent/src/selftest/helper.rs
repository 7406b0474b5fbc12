//! The short-lived processes the self-test runs: one that makes a single rename syscall from
//! inside a test cgroup (as a container's `mv` would), and one that just stays in the cgroup,
//! like a container's main process. Both are `imgstream selftest-helper ...`.

use std::{
    ffi::CString,
    io::{Read, Write},
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

/// Which syscall a rename helper makes (always through `syscall(2)`, so that it is exactly
/// that syscall whatever the libc does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Call {
    Rename,
    Renameat,
    Renameat2,
}

/// `imgstream selftest-helper` commands.
#[derive(Debug, clap::Subcommand)]
pub enum HelperCommand {
    /// Make one rename syscall and print `errno=N` (0 on success).
    Rename {
        #[arg(long, value_enum)]
        call: Call,
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        new: PathBuf,
        /// renameat2 flags.
        #[arg(long, default_value_t = 0)]
        flags: u32,
        /// Join this cgroup (a cgroup v2 directory) first.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Change to this directory first (relative paths are then relative to it).
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Resolve relative paths against an fd open on this directory (renameat/renameat2).
        #[arg(long)]
        dirfd: Option<PathBuf>,
        /// After the call, stay alive until stdin closes.
        #[arg(long)]
        linger: bool,
    },
    /// Join a cgroup and stay there until stdin closes.
    Stay {
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// Mount the ENXIO-emulating filesystem on a directory until stdin closes.
    Emulate {
        #[arg(long)]
        mountpoint: PathBuf,
    },
    /// Start a "container": join a cgroup, then exec `selftest-helper emit` in it (its first
    /// exec there).
    Container {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long, value_enum)]
        mode: EmitMode,
        #[arg(long)]
        sleep_ms: u64,
    },
    /// Write records into a store until killed (the store's crash test).
    StoreWriter(StoreWriter),
    /// A container's main process: read CLOCK_BOOTTIME, sleep, and write one line
    /// `start=NS log=NS` to stdout (or nothing), as its first log line.
    Emit {
        #[arg(long, value_enum)]
        mode: EmitMode,
        #[arg(long)]
        sleep_ms: u64,
    },
}

/// Internal to the store's crash test: write start records into a store as fast as it
/// commits them, forever (until killed).
#[derive(Debug, clap::Args)]
pub struct StoreWriter {
    #[arg(long)]
    pub path: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub max_records: u64,
}

/// What an emitting "container" writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EmitMode {
    /// One line to stdout.
    Log,
    /// First a line to stdout redirected to a file, then one to the real stdout.
    Redirect,
    /// Nothing at all.
    Silent,
}

/// Runs a helper command; returns the process exit code.
pub fn run(command: HelperCommand) -> i32 {
    match command {
        HelperCommand::Stay { cgroup } => {
            if let Err(err) = join_cgroup(&cgroup) {
                eprintln!("selftest-helper: {err}");
                return 2;
            }
            println!("ready");
            wait_for_stdin_eof();
            0
        }
        HelperCommand::Emulate { mountpoint } => match super::EnxioMount::mount(&mountpoint) {
            Ok(mount) => {
                println!("ready");
                let _ = std::io::stdout().flush();
                wait_for_stdin_eof();
                drop(mount);
                0
            }
            Err(err) => {
                eprintln!(
                    "selftest-helper: {err}: {}",
                    std::error::Error::source(&err).map_or(String::new(), |s| s.to_string())
                );
                2
            }
        },
        HelperCommand::Container {
            cgroup,
            mode,
            sleep_ms,
        } => {
            use std::os::unix::process::CommandExt as _;
            if let Err(err) = join_cgroup(&cgroup) {
                eprintln!("selftest-helper: {err}");
                return 2;
            }
            let err = std::process::Command::new("/proc/self/exe")
                .args(["selftest-helper", "emit", "--mode"])
                .arg(format!("{mode:?}").to_lowercase())
                .args(["--sleep-ms", &sleep_ms.to_string()])
                .exec();
            eprintln!("selftest-helper: exec: {err}");
            2
        }
        HelperCommand::StoreWriter(args) => {
            let store = match crate::starts::store::Store::open(&args.path, args.max_records) {
                Ok(store) => store,
                Err(err) => {
                    eprintln!("selftest-helper: {err}");
                    return 2;
                }
            };
            let mut next = store
                .starts(&Default::default())
                .map_or(1, |r| r.last().map_or(1, |r| r.created_ns + 1));
            let mut announced = false;
            loop {
                let record = crate::starts::StartRecord {
                    created_ns: next,
                    cgroup_id: next,
                    container_id: format!("{next:064x}"),
                    cgroup_path: "x".repeat((next % 512) as usize),
                    ..Default::default()
                };
                if let Err(err) = store.put_start(&record) {
                    eprintln!("selftest-helper: {err}");
                    return 2;
                }
                next += 1;
                if !announced {
                    println!("ready");
                    let _ = std::io::stdout().flush();
                    announced = true;
                }
            }
        }
        HelperCommand::Emit { mode, sleep_ms } => {
            let start = crate::events::boot_ns_now();
            if mode == EmitMode::Redirect
                && let Err(err) = write_redirected()
            {
                eprintln!("selftest-helper: {err}");
                return 2;
            }
            std::thread::sleep(std::time::Duration::from_millis(sleep_ms));
            if mode != EmitMode::Silent {
                let line = format!("start={start} log={}\n", crate::events::boot_ns_now());
                // One write(2): the first log line.
                // SAFETY: a valid buffer of the given length; fd 1 is open.
                unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
            }
            0
        }
        HelperCommand::Rename {
            call,
            old,
            new,
            flags,
            cgroup,
            cwd,
            dirfd,
            linger,
        } => {
            let setup = || -> std::io::Result<Option<std::fs::File>> {
                if let Some(cgroup) = &cgroup {
                    join_cgroup(cgroup)?;
                }
                if let Some(cwd) = &cwd {
                    std::env::set_current_dir(cwd)?;
                }
                dirfd.as_deref().map(std::fs::File::open).transpose()
            };
            let dir = match setup() {
                Ok(dir) => dir,
                Err(err) => {
                    eprintln!("selftest-helper: {err}");
                    return 2;
                }
            };
            let dfd = dir.as_ref().map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
            let errno = rename_syscall(call, dfd, &old, &new, flags);
            println!("errno={errno}");
            let _ = std::io::stdout().flush();
            if linger {
                wait_for_stdin_eof();
            }
            0
        }
    }
}

fn rename_syscall(call: Call, dfd: i32, old: &Path, new: &Path, flags: u32) -> i32 {
    let (Ok(old), Ok(new)) = (
        CString::new(old.as_os_str().as_bytes()),
        CString::new(new.as_os_str().as_bytes()),
    ) else {
        return libc::EINVAL;
    };
    // SAFETY: both paths are NUL-terminated strings that outlive the call; `dfd` is AT_FDCWD
    // or an fd held open by the caller; the kernel only reads the arguments.
    let rc = unsafe {
        match call {
            Call::Rename => libc::syscall(libc::SYS_rename, old.as_ptr(), new.as_ptr()),
            Call::Renameat => {
                libc::syscall(libc::SYS_renameat, dfd, old.as_ptr(), dfd, new.as_ptr())
            }
            Call::Renameat2 => libc::syscall(
                libc::SYS_renameat2,
                dfd,
                old.as_ptr(),
                dfd,
                new.as_ptr(),
                flags,
            ),
        }
    };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Writes a line to stdout while stdout points at a regular file, then puts stdout back.
fn write_redirected() -> std::io::Result<()> {
    let path = std::env::temp_dir().join(format!(
        "imgstream-selftest-redirect-{}",
        std::process::id()
    ));
    let file = std::fs::File::create(&path)?;
    let _ = std::fs::remove_file(&path);
    // SAFETY: dup/dup2 on fds this process owns; the saved fd is restored and closed.
    unsafe {
        let saved = libc::dup(1);
        if saved < 0 || libc::dup2(file.as_raw_fd(), 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let line = b"redirected, not a log line\n";
        libc::write(1, line.as_ptr().cast(), line.len());
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    Ok(())
}

fn join_cgroup(cgroup: &Path) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
}

fn wait_for_stdin_eof() {
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
}
