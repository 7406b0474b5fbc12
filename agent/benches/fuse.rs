//! `cargo xtask bench fuse`: cached reads through the FUSE mount against the same files on
//! local disk: with each FUSE option on its own, none, all, and the default (all, with
//! passthrough of cached files to backing files), the last two also without the directory
//! read-ahead (on in every other row); the default again through overlayfs on top
//! (as containerd mounts a layer); and the miss path, reading from an empty cache. Needs
//! root.
//!
//! The image: 10,000 files of 20 KB in 500 directories and one 128 MB file, eStargz in an OCI
//! layout. It is mounted once and read whole to cache all of it, then mounted again and read
//! whole once more, which has every file's backing file written (as the first start of a
//! container on a cached image does); both mounts exit and everything is synced. Then for each
//! set, three times each: `imgstream mount` with that set's flags on that cache (its
//! background download finds it all cached, which sets the cached readahead; the readahead
//! rows instead hold a value with `--no-background --fuse-readahead-kb`), `sync` and the page
//! cache dropped, every small file read as `tar` reads a tree (each directory listed, its
//! files read in listing order), the page cache dropped again, the large file read;
//! unmounted. The rows without passthrough in their name are run with
//! `--no-passthrough`. The miss rows mount on an empty cache each time (the layout is on
//! local disk: no network, the cost of the FUSE path and the cache writes alone). The local
//! side reads the files written to the same disk, the same way, in the same run. Medians
//! (min-max) of the three.

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

/// Reads every file under `dir` as `tar` does: each directory listed, each entry in listing
/// order read whole (or descended into); returns the bytes read.
fn read_tree(dir: &Path) -> usize {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).expect("a listing") {
        let entry = entry.expect("an entry");
        if entry.file_type().expect("a type").is_dir() {
            bytes += read_tree(&entry.path());
        } else {
            bytes += std::fs::read(entry.path()).expect("a small file").len();
        }
    }
    bytes
}

/// (time to read every small file, time to read the large file) under `root`.
fn read_all(root: &Path) -> (Duration, Duration) {
    drop_page_cache();
    let started = Instant::now();
    let bytes = read_tree(&root.join("tree"));
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
    let cached_rx = support::processes::on_line(
        child.stderr.take().expect("piped"),
        "background download complete",
    );
    support::processes::wait_until_mounted(mnt, Duration::from_secs(60));
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

/// One row: what `imgstream mount` is given, and how the tree is read.
struct Set {
    name: String,
    flags: Vec<String>,
    /// Read through overlayfs with the mount as its lower layer.
    overlay: bool,
    /// Mount on an empty cache (the miss path).
    cold: bool,
}

impl Set {
    fn new(name: &str, flags: Vec<String>) -> Self {
        Self {
            name: name.into(),
            flags,
            overlay: false,
            cold: false,
        }
    }
}

/// An overlayfs at `dir/merged` whose lower layer is `lower` (fresh upper and work
/// directories under `dir`).
fn mount_overlay(lower: &Path, dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    for sub in ["upper", "work", "merged"] {
        std::fs::create_dir_all(dir.join(sub)).expect("a directory");
    }
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        ))
        .arg(dir.join("merged"))
        .status()
        .expect("mount runs");
    assert!(status.success(), "overlayfs mounts on the FUSE mount");
    dir.join("merged")
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

    // Every file opened again on a cached image: each one's backing file is written.
    let child = mount(&image, &mnt, &cache, &[]);
    read_all(&mnt);
    let files = cache.join("files");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_dir(&files).map_or(0, Iterator::count) < SMALL_FILES + 1 {
        assert!(Instant::now() < deadline, "backing files were written");
        std::thread::sleep(Duration::from_millis(200));
    }
    unmount(child);

    let local = root;
    // The options at the readahead a cached image's mount gets; then readahead alone, held
    // where it was set (no background download to find the image cached and raise it).
    let flags = |options: &str, readahead_kb: Option<&str>| -> Vec<String> {
        let mut flags = vec![
            "--fuse-options".to_string(),
            options.into(),
            "--no-passthrough".into(),
        ];
        if let Some(kb) = readahead_kb {
            flags.extend([
                "--no-background".to_string(),
                "--fuse-readahead-kb".into(),
                kb.to_string(),
            ]);
        }
        flags
    };
    let mut sets: Vec<Set> = vec![Set::new("none", flags("none", None))];
    for option in imgstream::fs::options::FUSE_OPTIONS {
        sets.push(Set::new(option.name, flags(option.name, None)));
    }
    sets.push(Set::new("all", flags("all", None)));
    let mut without_ahead = flags("all", None);
    without_ahead.push("--no-dir-readahead".into());
    sets.push(Set::new("all, no directory read-ahead", without_ahead));
    sets.push(Set::new("all + passthrough (default)", vec![]));
    sets.push(Set::new(
        "all + passthrough, no directory read-ahead",
        vec!["--no-dir-readahead".into()],
    ));
    sets.push(Set {
        overlay: true,
        ..Set::new("default, through overlayfs on the mount", vec![])
    });
    for kb in ["128", "1024", "4096", "16384"] {
        sets.push(Set::new(
            &format!("all, readahead {kb} KiB"),
            flags("all", Some(kb)),
        ));
    }
    sets.push(Set::new(
        "none, readahead 4096 KiB",
        flags("none", Some("4096")),
    ));
    sets.push(Set {
        cold: true,
        ..Set::new("miss path: none, empty cache", flags("none", None))
    });
    sets.push(Set {
        cold: true,
        ..Set::new("miss path: default, empty cache", vec![])
    });
    // `IMGSTREAM_BENCH_SETS=a,=b`: only the rows whose names contain `a` or are `b`.
    if let Ok(only) = std::env::var("IMGSTREAM_BENCH_SETS") {
        sets.retain(|set| {
            only.split(',').any(|part| match part.strip_prefix('=') {
                Some(name) => set.name == name,
                None => set.name.contains(part),
            })
        });
    }
    let mut local_small = Vec::new();
    let mut local_large = Vec::new();
    let mut results: Vec<(String, Vec<f64>, Vec<f64>, String)> = sets
        .iter()
        .map(|set| (set.name.clone(), vec![], vec![], String::new()))
        .collect();
    let overlay = scratch.join("overlay");
    for _ in 0..REPS {
        let (small, large) = read_all(&local);
        local_small.push(small.as_secs_f64());
        local_large.push(large.as_secs_f64());
        for (i, set) in sets.iter().enumerate() {
            let flags: Vec<&str> = set.flags.iter().map(String::as_str).collect();
            let cold_cache = scratch.join("cold-cache");
            let _ = std::fs::remove_dir_all(&cold_cache);
            let (child, read_from) = if set.cold {
                let mut flags = flags.clone();
                flags.push("--no-background");
                (mount(&image, &mnt, &cold_cache, &flags), mnt.clone())
            } else {
                (mount(&image, &mnt, &cache, &flags), mnt.clone())
            };
            results[i].3 = readahead_kb(&mnt);
            let read_from = if set.overlay {
                mount_overlay(&mnt, &overlay)
            } else {
                read_from
            };
            let (small, large) = read_all(&read_from);
            if set.overlay {
                let _ = Command::new("umount").arg(&read_from).status();
            }
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
    if std::env::var_os("IMGSTREAM_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
