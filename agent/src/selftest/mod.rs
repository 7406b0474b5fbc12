//! `imgstream selftest`: proves, on this very kernel, that the rename-ENXIO detector works end
//! to end. It attaches the real probes, mounts a FUSE filesystem that emulates the overlayfs
//! regression (no kernel reachable here still has the bug), puts helper processes in a
//! container-like cgroup, makes them rename symlinks and other files with each of the three
//! syscalls, and checks what the detector reports, and what it does not.
//!
//! Used by operators on a node, by the host integration tests and inside the VM tests' guests.

mod enxio_fs;
pub mod helper;
mod maps;
mod scenario;
mod start_latency;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

pub use enxio_fs::{EnxioMount, MountError};
pub use scenario::{CaseResult, Report, run};

use crate::{attribution::ResolveError, probes::ProbeError};

/// Errors that stop the self-test before it can judge anything.
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("attaching the probes")]
    Probes(#[from] ProbeError),
    #[error("mounting the emulated regression")]
    Mount(#[from] MountError),
    #[error("finding the cgroup v2 hierarchy")]
    Cgroup(#[from] ResolveError),
    #[error("preparing {0}")]
    Prepare(PathBuf, #[source] std::io::Error),
    #[error("running helper `{0}`")]
    Helper(String, #[source] std::io::Error),
}

/// Where the self-test works and which binary provides `selftest-helper`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `imgstream` binary (normally the running one).
    pub helper: PathBuf,
    /// A directory for the mount point and scratch files.
    pub workdir: PathBuf,
}

/// A helper process, killed (by closing its stdin) and reaped when dropped.
struct Helper {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Helper {
    fn spawn(binary: &Path, args: &[String]) -> Result<Self, SelftestError> {
        let name = args.join(" ");
        let mut child = Command::new(binary)
            .arg("selftest-helper")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| SelftestError::Helper(name.clone(), e))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Ok(Self {
            name,
            child,
            stdin,
            stdout,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The helper's next stdout line (it prints one when it is ready or has made its call).
    fn line(&mut self) -> Result<String, SelftestError> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err(SelftestError::Helper(
                self.name.clone(),
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "exited without reporting",
                ),
            )),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(SelftestError::Helper(self.name.clone(), e)),
        }
    }

    /// Closes stdin and waits for the exit.
    fn finish(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.finish();
    }
}
