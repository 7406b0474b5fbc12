//! `cargo xtask ci`: the README's test command and what `.ci/run` calls. Sets the machine up,
//! then runs every check in order and stops at the first failure.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{cmd, setup, vm_test};

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("cargo xtask ci needs root: it loads eBPF programs, mounts FUSE and boots VMs");
    }
    let started = Instant::now();
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root).args(args);
        cmd
    };
    type Step<'a> = (&'a str, Box<dyn Fn() -> anyhow::Result<()> + 'a>);
    let steps: Vec<Step> = vec![
        ("setup", Box::new(setup::run)),
        (
            "rustfmt",
            Box::new(|| cmd::run(&mut cargo(&["fmt", "--all", "--", "--check"]))),
        ),
        (
            "clippy",
            Box::new(|| {
                cmd::run(&mut cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))
            }),
        ),
        (
            "clippy (eBPF programs, bpfel target)",
            Box::new(|| {
                cmd::run(&mut cargo(&[
                    "+nightly",
                    "clippy",
                    "-Z",
                    "build-std=core",
                    "--target",
                    "bpfel-unknown-none",
                    "-p",
                    "imgstream-ebpf",
                    "--bins",
                    "--release",
                    "--target-dir",
                    "target/ebpf-clippy",
                    "--",
                    "-D",
                    "warnings",
                ]))
            }),
        ),
        (
            "unit and integration tests (root: registry, containerd)",
            Box::new(|| cmd::run(&mut cargo(&["test", "--workspace"]))),
        ),
        (
            "host eBPF and FUSE tests (root)",
            Box::new(|| {
                cmd::run(&mut cargo(&[
                    "test",
                    "-p",
                    "imgstream-agent",
                    "--test",
                    "detector",
                    "--",
                    "--ignored",
                ]))
            }),
        ),
        (
            "VM tests",
            Box::new(|| vm_test::run(root, vm_test::Options::default())),
        ),
    ];
    let total = steps.len();
    for (i, (name, step)) in steps.into_iter().enumerate() {
        eprintln!("\n==> ci step {}/{total}: {name}", i + 1);
        step().with_context(|| format!("ci step `{name}` failed"))?;
    }
    eprintln!(
        "\nci: every step passed in {:.0} s",
        started.elapsed().as_secs_f32()
    );
    println!("ci: {total} passed, 0 failed");
    Ok(())
}
