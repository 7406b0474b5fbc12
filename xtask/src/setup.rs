//! `cargo xtask setup`: brings a fresh Debian 12 machine of this project's kind to the point
//! where every build and test runs. Idempotent: each step checks first and only acts when
//! something is missing, so a second run does nothing and says so within a second or two.
//! A failing step stops the run with the step's name and the fix.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{cmd, kernels};

/// Debian packages the project needs.
const PACKAGES: [&str; 17] = [
    "qemu-system-x86",   // the VM tests (TCG)
    "protobuf-compiler", // tonic code generation (containerd and CRI APIs)
    "containerd",
    "runc",
    "docker-registry", // CNCF distribution registry, for registry tests
    "musl-tools",      // static guest binaries of crates with C code
    "util-linux",      // setpriv, unshare: privilege and namespace tests
    "coreutils",       // mv in the demo
    "cpio",            // checks the initramfs writer against GNU cpio
    // stargz-snapshotter's own tooling, for eStargz compatibility tests both ways:
    // ctr-remote, and the Go estargz package built offline in GOPATH mode.
    "stargz-snapshotter",
    "golang-go",
    "golang-github-containerd-stargz-snapshotter-dev",
    "skopeo",         // copies images between registries and OCI layouts in tests
    "apache2-utils",  // htpasswd (bcrypt) for the basic-auth registry tests
    "busybox-static", // the userland of the test images
    "podman",         // writes zstd and zstd:chunked layers for the interoperability tests
    "binutils",       // readelf: what the ELF reader of the loader prefetch is checked against
];

/// The bpf-linker release that builds against the nightly's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

struct Setup {
    apt_updated: bool,
    acted: Vec<String>,
    checked: usize,
}

pub(crate) fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let mut setup = Setup {
        apt_updated: false,
        acted: Vec::new(),
        checked: 0,
    };
    type Step = fn(&mut Setup) -> anyhow::Result<()>;
    let steps: [(&str, Step); 5] = [
        ("Debian packages", Setup::packages),
        ("Rust toolchains", Setup::rust),
        ("bpf-linker", Setup::bpf_linker),
        ("guest kernels", Setup::guest_kernels),
        ("tracefs", Setup::tracefs),
    ];
    for (name, step) in steps {
        step(&mut setup).with_context(|| format!("setup step `{name}` failed"))?;
    }
    let took = start.elapsed().as_secs_f32();
    if setup.acted.is_empty() {
        eprintln!(
            "setup: nothing to do, all {} checks passed ({took:.1} s)",
            setup.checked
        );
    } else {
        eprintln!("setup: done in {took:.1} s: {}", setup.acted.join("; "));
    }
    Ok(())
}

impl Setup {
    fn apt_update(&mut self) -> anyhow::Result<()> {
        if !self.apt_updated {
            cmd::run(Command::new("apt-get").args(["update", "-q"])).context(
                "apt-get update failed: check apt's sources and that Debian's mirror is reachable",
            )?;
            self.apt_updated = true;
        }
        Ok(())
    }

    fn packages(&mut self) -> anyhow::Result<()> {
        self.checked += 1;
        let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !is_root() {
            bail!(
                "packages {missing:?} are missing and installing them needs root: run `sudo cargo xtask setup`"
            );
        }
        self.apt_update()?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| {
            format!(
                "installing {missing:?} failed: run `apt-get install {}` by hand to see why",
                missing.join(" ")
            )
        })?;
        self.acted.push(format!("installed {}", missing.join(", ")));
        Ok(())
    }

    fn rust(&mut self) -> anyhow::Result<()> {
        self.checked += 1;
        let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"])).context(
            "rustup not found: imgstream builds with rustup's stable and nightly toolchains",
        )?;
        if !toolchains.lines().any(|l| l.starts_with("nightly")) {
            bail!(
                "no nightly toolchain (the eBPF programs need one): `rustup toolchain install nightly`"
            );
        }
        let components = stdout(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))?;
        if !components.lines().any(|l| l.starts_with("rust-src")) {
            cmd::run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
            self.acted.push("added rust-src to nightly".into());
        }
        let targets = stdout(Command::new("rustup").args(["target", "list", "--installed"]))?;
        if !targets.lines().any(|l| l == "x86_64-unknown-linux-musl") {
            cmd::run(Command::new("rustup").args(["target", "add", "x86_64-unknown-linux-musl"]))?;
            self.acted.push("added the musl target".into());
        }
        Ok(())
    }

    fn bpf_linker(&mut self) -> anyhow::Result<()> {
        self.checked += 1;
        if cmd::available("bpf-linker", "--version") {
            return Ok(());
        }
        // bpf-linker must link the nightly's own LLVM: point LLVM_PREFIX at a folder holding
        // that library under the names the build and the runtime loader look for. The folder
        // stays: bpf-linker's RUNPATH points at it.
        let sysroot = stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        let nightly_lib = Path::new(sysroot.trim()).join("lib");
        let llvm = std::fs::read_dir(&nightly_lib)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so."))
            .with_context(|| {
                format!(
                    "no libLLVM.so.* in {}: is the nightly complete?",
                    nightly_lib.display()
                )
            })?;
        let prefix = crate::cache_dir().join("llvm");
        let lib = prefix.join("lib");
        std::fs::create_dir_all(&lib)?;
        for name in ["libLLVM.so", llvm.as_str()] {
            let link = lib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(nightly_lib.join(&llvm), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        cmd::run(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", &prefix),
        )
        .context("building bpf-linker failed (it needs the nightly's LLVM 22 and gcc)")?;
        self.acted
            .push(format!("built bpf-linker {BPF_LINKER_VERSION}"));
        Ok(())
    }

    fn guest_kernels(&mut self) -> anyhow::Result<()> {
        for series in &kernels::SERIES {
            self.checked += 1;
            if kernels::installed(series).is_some() {
                continue;
            }
            let package = match kernels::newest_package(series) {
                Ok(package) => package,
                Err(_) => {
                    self.apt_update()?;
                    kernels::newest_package(series)?
                }
            };
            let kernel = kernels::download(series, &package)?;
            self.acted
                .push(format!("unpacked guest kernel {}", kernel.release));
        }
        Ok(())
    }

    fn tracefs(&mut self) -> anyhow::Result<()> {
        self.checked += 1;
        if Path::new("/sys/kernel/tracing/events").is_dir() || !is_root() {
            return Ok(());
        }
        cmd::run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
            .context("mounting tracefs failed: the probes need it")?;
        self.acted.push("mounted tracefs".into());
        Ok(())
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    Ok(String::from_utf8_lossy(&cmd::output(cmd)?.stdout).into_owned())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
