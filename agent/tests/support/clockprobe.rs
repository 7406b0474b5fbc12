//! A container entrypoint for the start-latency tests, compiled by the tests with plain
//! `rustc --target x86_64-unknown-linux-musl` (static, no dependencies). It reads
//! CLOCK_BOOTTIME (the clock of the eBPF timestamps) as its first act, and again just before
//! the write that should count as its first log line, and records both in a truth file, so
//! the test knows what the probes should measure.
//!
//! `clockprobe MODE SLEEP_MS TRUTH_FILE`:
//! - `log`: sleep, then one write to stdout;
//! - `silent`: sleep, exit without writing;
//! - `redirect`: write to stdout redirected to a regular file, sleep, then one write to
//!   stderr (the real first log line);
//! - `pause`: sleep forever (a pod sandbox's pause process);
//! - `readafter`, then pairs `TRIGGER FILE`: write `waiting`, then for each pair wait until
//!   TRIGGER exists and write `FILE LENGTH FNV1A64` of FILE's bytes (or `FILE error ...`).

use std::{io::Write, os::fd::AsRawFd, time::Duration};

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn write(fd: i32, buf: *const u8, len: usize) -> isize;
}

const CLOCK_BOOTTIME: i32 = 7;

fn boottime_ns() -> u64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: a valid out pointer.
    unsafe { clock_gettime(CLOCK_BOOTTIME, &mut ts) };
    ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
}

fn raw_write(fd: i32, line: &str) {
    // SAFETY: a valid buffer of the given length.
    unsafe { write(fd, line.as_ptr(), line.len()) };
}

fn main() {
    let start = boottime_ns();
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("log");
    let sleep_ms: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let truth = args.get(3).cloned();
    let record = |what: &str, ns: u64| {
        if let Some(path) = &truth {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("truth file");
            writeln!(f, "{what} {ns}").expect("truth write");
        }
    };
    record("start", start);
    match mode {
        "log" => {
            std::thread::sleep(Duration::from_millis(sleep_ms));
            let now = boottime_ns();
            record("log", now);
            raw_write(1, &format!("boottime={now}\n"));
        }
        "silent" => std::thread::sleep(Duration::from_millis(sleep_ms)),
        "redirect" => {
            let file = std::fs::File::create("/tmp/redirected").expect("redirect target");
            // SAFETY: both fds are open.
            unsafe { dup2(file.as_raw_fd(), 1) };
            record("redirected", boottime_ns());
            raw_write(1, "this goes to a file, not to the log\n");
            std::thread::sleep(Duration::from_millis(sleep_ms));
            let now = boottime_ns();
            record("log", now);
            raw_write(2, &format!("boottime={now}\n"));
        }
        "readafter" => {
            raw_write(1, "waiting\n");
            for pair in args.get(4..).unwrap_or_default().chunks(2) {
                let [trigger, file] = pair else { break };
                while !std::path::Path::new(trigger).exists() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let line = match std::fs::read(file) {
                    Ok(data) => format!("{file} {} {:016x}\n", data.len(), fnv1a(&data)),
                    Err(e) => format!("{file} error {e}\n"),
                };
                raw_write(1, &line);
            }
        }
        "pause" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        other => panic!("unknown mode {other}"),
    }
}

/// FNV-1a, 64 bits: a checksum with no dependencies (the test computes the same).
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
