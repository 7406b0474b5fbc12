//! `cargo xtask bench probes`: what the agent's eBPF probes cost the rest of the node: each
//! workload timed with no probes, with the probes as the agent keeps them at rest (the
//! rename-ENXIO programs and the start-latency programs without the write ones), and with the
//! write programs attached too (while a container waits for its first log line), rounds
//! alternating, in the same run. Needs root. Workloads:
//!
//! - small writes: 200,000 writes of a 128-byte line to a pipe a thread drains (the worst
//!   case: a syscall that does almost nothing else);
//! - large writes: 256 writes of 1 MiB to a file on tmpfs;
//! - exec-heavy: 1,000 fork + exec of /bin/true.
//!
//! The table goes to stdout and `target/bench/probes.md`.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd},
    path::PathBuf,
    process::Command,
    time::Instant,
};

use imgstream::probes::{RenameProbes, StartProbes};

const WRITES: usize = 200_000;
const LINE: &[u8; 128] = &[b'x'; 128];
const BIG_WRITES: usize = 256;
const EXECS: usize = 1_000;
const ROUNDS: usize = 9;

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0i32; 2];
    // SAFETY: a valid array for the two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created and are owned here.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

fn small_writes() -> f64 {
    let (mut rx, tx) = pipe();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(rx.read(&mut buf), Ok(n) if n > 0) {}
    });
    let fd = tx.as_raw_fd();
    let started = Instant::now();
    for _ in 0..WRITES {
        // SAFETY: a valid buffer; fd is open for the loop.
        unsafe { libc::write(fd, LINE.as_ptr().cast(), LINE.len()) };
    }
    let took = started.elapsed().as_secs_f64();
    drop(tx);
    drain.join().unwrap();
    took
}

fn large_writes() -> f64 {
    let path = PathBuf::from(format!("/dev/shm/imgstream-bench-{}", std::process::id()));
    let block = vec![7u8; 1 << 20];
    let mut file = std::fs::File::create(&path).unwrap();
    let started = Instant::now();
    for _ in 0..BIG_WRITES {
        file.write_all(&block).unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).unwrap();
    took
}

fn exec_heavy() -> f64 {
    let started = Instant::now();
    for _ in 0..EXECS {
        let status = Command::new("/bin/true").status().unwrap();
        assert!(status.success());
    }
    started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    None,
    AtRest,
    Armed,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list.
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the probes bench needs root");
    type Workload = (&'static str, fn() -> f64);
    let workloads: [Workload; 3] = [
        ("small writes (200,000 x 128 B to a pipe)", small_writes),
        ("large writes (256 x 1 MiB to tmpfs)", large_writes),
        ("exec-heavy (1,000 fork+exec of /bin/true)", exec_heavy),
    ];
    let setups = [Setup::None, Setup::AtRest, Setup::Armed];
    // times[workload][setup]
    let mut times = vec![vec![Vec::new(); setups.len()]; workloads.len()];
    for (_, workload) in &workloads {
        workload(); // warm up
    }
    for round in 0..ROUNDS {
        // Rotate the order of the setups each round, so that none always runs first.
        for k in 0..setups.len() {
            let s = (k + round) % setups.len();
            let probes = (setups[s] != Setup::None).then(|| {
                let rename = RenameProbes::attach().unwrap();
                let mut starts = StartProbes::attach().unwrap();
                if setups[s] == Setup::Armed {
                    starts.arm_writes().unwrap();
                }
                (rename, starts)
            });
            for (w, (_, workload)) in workloads.iter().enumerate() {
                times[w][s].push(workload());
            }
            drop(probes);
        }
    }
    let mut table = String::from(
        "| workload | no probes | agent at rest | overhead | write probes attached | overhead |\n|---|---|---|---|---|---|\n",
    );
    for (w, (name, _)) in workloads.iter().enumerate() {
        let m: Vec<f64> = times[w].iter().map(|t| median(t.clone())).collect();
        let pct = |x: f64| (x / m[0] - 1.0) * 100.0;
        let _ = writeln!(
            table,
            "| {name} | {:.3} s | {:.3} s | {:+.1} % | {:.3} s | {:+.1} % |",
            m[0],
            m[1],
            pct(m[1]),
            m[2],
            pct(m[2])
        );
    }
    let _ = writeln!(
        table,
        "\nMedians of {ROUNDS} rounds; each round runs the three setups in a rotating order."
    );
    println!("\n{table}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::File::create(out.join("probes.md"))
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
}
