//! `cargo xtask bench fuse`: cached reads through the FUSE mount against the same files on
//! local disk, with each FUSE option on its own, none, and all (the default). Needs root.
//!
//! The image: 10,000 files of 20 KB in 500 directories and one 128 MB file, eStargz in an OCI
//! layout. It is mounted once and read whole to cache all of it; then for each set, three
//! times each: `imgstream mount --fuse-options SET` on that cache (its background download
//! finds it all cached, which sets the cached readahead; the readahead rows instead hold a
//! value with `--no-background --fuse-readahead-kb`), `sync` and the page cache dropped,
//! every small file read in turn, the page cache dropped again, the large file read;
//! unmounted. The local side reads the files written to the same disk, the same way, in the
//! same run. Medians (min-max) of the three.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

const IMGSTREAM: &str = env!("CARGO_BIN_EXE_imgstream");
const SMALL_FILES: usize = 10_000;
const LARGE: usize = 128 << 20;
const REPS: usize = 3;

fn small_file(i: usize) -> (String, Vec<u8>) {
    (
        format!("tree/d{:03}/f{i}", i % 500),
        support::noise(i as u64 + 11, 20_000),
    )
}

fn drop_page_cache() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping caches needs root");
}

/// (time to read every small file, time to read the large file) under `root`.
fn read_all(root: &Path) -> (Duration, Duration) {
    drop_page_cache();
    let started = Instant::now();
    let mut bytes = 0;
    for i in 0..SMALL_FILES {
        bytes += std::fs::read(root.join(small_file(i).0))
            .expect("a small file")
            .len();
    }
    let small = started.elapsed();
    assert_eq!(bytes, SMALL_FILES * 20_000);
    drop_page_cache();
    let started = Instant::now();
    let large = std::fs::read(root.join("large.bin")).expect("the large file");
    let took = started.elapsed();
    assert_eq!(large.len(), LARGE);
    (small, took)
}

/// `imgstream mount` of `image` at `mnt` on `cache`, with `extra` flags; returns once mounted
/// and, unless `extra` turns the background download off, once it found the image all
/// cached (the state of a cached image's mount).
fn mount(image: &str, mnt: &Path, cache: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(IMGSTREAM)
        .args(["mount", image])
        .arg(mnt)
        .arg("--cache-dir")
        .arg(cache)
        .args(["--background-delay-secs", "0"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("imgstream runs");
    let (cached_tx, cached_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("background download complete") {
                let _ = cached_tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .contains(mnt.to_str().expect("a UTF-8 path"))
    {
        assert!(Instant::now() < deadline, "the mount did not appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    if !extra.contains(&"--no-background") {
        cached_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the background download found the image cached");
    }
    child
}

/// The kernel's readahead on the mount at `mnt`, KiB.
fn readahead_kb(mnt: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(mnt).expect("the mount answers").dev();
    std::fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
    .map_or_else(|_| "?".into(), |kb| kb.trim().to_string())
}

fn unmount(mut child: Child) {
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().expect("it exits");
}

/// "median (min-max)" of `values`, in seconds.
fn spread(values: &mut [f64]) -> (f64, String) {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    (
        median,
        format!(
            "{median:.3} s ({:.3}-{:.3})",
            values[0],
            values[values.len() - 1]
        ),
    )
}

fn main() {
    support::require_root();
    let scratch = support::scratch("bench-fuse");
    let root = scratch.join("root");
    for i in 0..SMALL_FILES {
        let (path, data) = small_file(i);
        let path = root.join(path);
        if i < 500 {
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("a directory");
        }
        std::fs::write(path, data).expect("a file");
    }
    std::fs::write(root.join("large.bin"), support::noise(5, LARGE)).expect("a file");
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let plain = scratch.join("layout");
    rt.block_on(support::build_image(
        &plain,
        "v1",
        std::slice::from_ref(&root),
        &["/bin/true"],
    ));
    let esgz = scratch.join("layout-esgz");
    let out = support::imgstream(&[
        "convert",
        &format!("oci:{}:v1", plain.display()),
        &format!("oci:{}:v1", esgz.display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = format!("oci:{}:v1", esgz.display());
    let (cache, mnt) = (scratch.join("cache"), scratch.join("mnt"));
    std::fs::create_dir_all(&mnt).expect("a mount point");

    // The whole image into the cache, by reading it all once.
    let child = mount(&image, &mnt, &cache, &["--no-background"]);
    read_all(&mnt);
    unmount(child);

    let local = root;
    // The options at the readahead a cached image's mount gets; then readahead alone, held
    // where it was set (no background download to find the image cached and raise it).
    let flags = |options: &str, readahead_kb: Option<&str>| -> Vec<String> {
        let mut flags = vec!["--fuse-options".to_string(), options.into()];
        if let Some(kb) = readahead_kb {
            flags.extend([
                "--no-background".to_string(),
                "--fuse-readahead-kb".into(),
                kb.to_string(),
            ]);
        }
        flags
    };
    let mut sets: Vec<(String, Vec<String>)> = vec![("none".into(), flags("none", None))];
    for option in imgstream::fs::options::FUSE_OPTIONS {
        sets.push((option.name.into(), flags(option.name, None)));
    }
    sets.push(("all (default)".into(), flags("all", None)));
    for kb in ["128", "1024", "4096", "16384"] {
        sets.push((format!("all, readahead {kb} KiB"), flags("all", Some(kb))));
    }
    sets.push((
        "none, readahead 4096 KiB".into(),
        flags("none", Some("4096")),
    ));
    let mut local_small = Vec::new();
    let mut local_large = Vec::new();
    let mut results: Vec<(String, Vec<f64>, Vec<f64>, String)> = sets
        .iter()
        .map(|(n, _)| (n.clone(), vec![], vec![], String::new()))
        .collect();
    for _ in 0..REPS {
        let (small, large) = read_all(&local);
        local_small.push(small.as_secs_f64());
        local_large.push(large.as_secs_f64());
        for (i, (_, flags)) in sets.iter().enumerate() {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let child = mount(&image, &mnt, &cache, &flags);
            results[i].3 = readahead_kb(&mnt);
            let (small, large) = read_all(&mnt);
            unmount(child);
            results[i].1.push(small.as_secs_f64());
            results[i].2.push(large.as_secs_f64());
        }
    }
    let (local_small_median, local_small_text) = spread(&mut local_small);
    let (local_large_median, local_large_text) = spread(&mut local_large);
    let mut table = String::from(
        "| FUSE options | readahead | 10,000 files of 20 KB | vs local disk | one 128 MB file | vs local disk |\n|---|---|---|---|---|---|\n",
    );
    writeln!(
        table,
        "| local disk (the same files, same run) | | {local_small_text} | 100 % | {local_large_text} | 100 % |"
    )
    .expect("to a string");
    for (name, mut small, mut large, readahead) in results {
        let (small_median, small_text) = spread(&mut small);
        let (large_median, large_text) = spread(&mut large);
        writeln!(
            table,
            "| {name} | {readahead} KiB | {small_text} | {:.0} % | {large_text} | {:.0} % |",
            100.0 * local_small_median / small_median,
            100.0 * local_large_median / large_median,
        )
        .expect("to a string");
    }
    println!("\n{table}");
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir).expect("an output directory");
    std::fs::write(out_dir.join("fuse.md"), &table).expect("the table");
    let _ = std::fs::remove_dir_all(&scratch);
}
