//! The store is never corrupted by a crash mid-write: a process writing records as fast as
//! the store commits them is killed with SIGKILL at varying moments, again and again; each
//! time the store opens, every record in it reads back whole, and nothing committed is lost.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use imgstream::starts::store::{Filter, Store};

#[test]
fn sigkill_mid_write_leaves_a_readable_store_that_lost_nothing_committed() {
    let dir = std::env::temp_dir().join(format!("imgstream-store-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.redb");
    let mut seen = 0u64;
    for round in 0..10u64 {
        let mut writer = Command::new(env!("CARGO_BIN_EXE_imgstream"))
            .args([
                "selftest-helper",
                "store-writer",
                "--max-records",
                "400",
                "--path",
            ])
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(writer.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "round {round}");
        // A different moment each round, mid-commit more often than not.
        std::thread::sleep(Duration::from_millis(20 + round * 37 % 150));
        writer.kill().unwrap();
        writer.wait().unwrap();

        let store = Store::open(&path, 400).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let records = store.starts(&Filter::default()).unwrap();
        assert!(
            !records.is_empty() && records.len() <= 400,
            "round {round}: {}",
            records.len()
        );
        for r in &records {
            assert_eq!(r.cgroup_id, r.created_ns, "round {round}: a torn record");
            assert_eq!(r.container_id, format!("{:064x}", r.created_ns));
            assert_eq!(r.cgroup_path.len() as u64, r.created_ns % 512);
        }
        // Keys are consecutive: pruning takes the oldest, a crash takes at most the write in
        // flight, never one before it.
        let newest = records.last().unwrap().created_ns;
        let oldest = records.first().unwrap().created_ns;
        assert_eq!(
            newest - oldest + 1,
            records.len() as u64,
            "round {round}: a hole"
        );
        assert!(newest >= seen, "round {round}: committed records were lost");
        seen = newest;
    }
    assert!(seen > 10, "the writers committed records");
    std::fs::remove_dir_all(&dir).unwrap();
}
