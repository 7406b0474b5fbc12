//! The checks a guest test line can run, as `/init CHECK ARGS...`; each exits 0 when it
//! holds and prints why not otherwise:
//!
//! - `mount FSTYPE SOURCE TARGET [DATA]`: mount(2), creating TARGET.
//! - `check-tree DIR EXPECTED`: DIR's tree description equals the one in file EXPECTED.
//! - `overlay-ops LOWER FILE DELETE SYMLINK`: overlayfs over LOWER with a tmpfs upper; write
//!   a new file, rewrite FILE (copy-up), rename and delete it, delete DELETE, rename SYMLINK
//!   with rename(2), renameat(2) and renameat2(RENAME_NOREPLACE); LOWER stays as it was.
//! - `expect-eio FILE MAX_SECS`: reading FILE fails with EIO within MAX_SECS, twice, and
//!   FILE's directory still lists (the backend survived).
//! - `hang-read FILE MARKER`: prints MARKER, then reads FILE (the host kills the VM on it).
//! - `read-throughput FILE`: reads FILE sequentially and reports bytes and seconds.
//! - `fuse-image LAYOUT MOUNTPOINT EXPECTED`: `imgstream mount oci:LAYOUT:v1 MOUNTPOINT` (the
//!   agent's own FUSE filesystem, on this kernel), its tree checked against file EXPECTED
//!   twice (the second pass opens cached files, passthrough's case), then the mount point
//!   unmounted with umount(2) and the agent's clean exit awaited; reports whether INIT
//!   negotiated FUSE passthrough (`fuse-passthrough=1` or `0`).
//! - `sleep SECS`: waits (while the host does something to the backends).

use std::{
    ffi::CString,
    fs,
    io::{self, Read},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use imgstream_vm_tests::{RESULT, tree};

pub(crate) fn main(args: Vec<String>) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["mount", fstype, source, target] => mount(fstype, source, target, None),
        ["mount", fstype, source, target, data] => mount(fstype, source, target, Some(data)),
        ["check-tree", dir, expected] => check_tree(Path::new(dir), Path::new(expected)),
        ["overlay-ops", lower, file, delete, symlink] => {
            overlay_ops(Path::new(lower), file, delete, symlink)
        }
        ["expect-eio", file, secs] => match secs.parse() {
            Ok(secs) => expect_eio(Path::new(file), Duration::from_secs(secs)),
            Err(_) => Err(format!("{secs:?} is not a number of seconds")),
        },
        ["hang-read", file, marker] => hang_read(Path::new(file), marker),
        ["read-throughput", file] => read_throughput(Path::new(file)),
        ["fuse-image", layout, mountpoint, expected] => {
            fuse_image(layout, Path::new(mountpoint), Path::new(expected))
        }
        ["sleep", secs] => match secs.parse() {
            Ok(secs) => {
                std::thread::sleep(Duration::from_secs(secs));
                Ok(())
            }
            Err(_) => Err(format!("{secs:?} is not a number of seconds")),
        },
        _ => Err(format!("unknown check {args:?}")),
    };
    match result {
        Ok(()) => 0,
        Err(why) => {
            println!("check failed: {why}");
            1
        }
    }
}

fn mount(fstype: &str, source: &str, target: &str, data: Option<&str>) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    crate::mount_with(source, target, fstype, data)?;
    println!("mounted {fstype} {source} on {target}");
    Ok(())
}

fn check_tree(dir: &Path, expected: &Path) -> Result<(), String> {
    let started = Instant::now();
    let want = fs::read_to_string(expected)
        .map_err(|e| format!("reading {}: {e}", expected.display()))
        .and_then(|text| tree::from_text(&text))?;
    let got = tree::describe(dir).map_err(|e| format!("walking {}: {e}", dir.display()))?;
    let diff = tree::differences(&got, &want);
    for line in diff.iter().take(30) {
        println!("  {line}");
    }
    if !diff.is_empty() {
        return Err(format!("{} of {} paths differ", diff.len(), want.len()));
    }
    if want.len() < 10 {
        return Err(format!("only {} paths compared", want.len()));
    }
    println!(
        "{} paths match (types, modes, owners, sizes, times, links, devices, xattrs, sha256) in {:.1} s",
        want.len(),
        started.elapsed().as_secs_f32()
    );
    Ok(())
}

fn io_err(what: impl std::fmt::Display) -> impl Fn(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn cstring(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())
}

/// renameat2(2) through the raw syscall (older C libraries lack the wrapper).
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (
        cstring(from).map_err(io::Error::other)?,
        cstring(to).map_err(io::Error::other)?,
    );
    // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD dirfds.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// renameat(2) relative to an open directory.
fn renameat_in(dir: &Path, from: &str, to: &str) -> io::Result<()> {
    let dirfd = fs::File::open(dir)?;
    let (from, to) = (
        CString::new(from).map_err(io::Error::other)?,
        CString::new(to).map_err(io::Error::other)?,
    );
    use std::os::fd::AsRawFd as _;
    // SAFETY: an open directory fd and two NUL-terminated names, all live for the call.
    let rc = unsafe {
        libc::renameat(
            dirfd.as_raw_fd(),
            from.as_ptr(),
            dirfd.as_raw_fd(),
            to.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn overlay_ops(lower: &Path, file: &str, delete: &str, symlink: &str) -> Result<(), String> {
    let base = PathBuf::from("/tmp/overlay");
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    for dir in [&upper, &work, &merged] {
        fs::create_dir_all(dir).map_err(io_err(dir.display()))?;
    }
    let lower_before = tree::describe(lower).map_err(io_err("describing the lower dir"))?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    crate::mount_with(
        "overlay",
        &merged.to_string_lossy(),
        "overlay",
        Some(&options),
    )?;
    println!("overlayfs: {options}");

    // A new file.
    let new = merged.join("imgstream-new.txt");
    fs::write(&new, b"written in the guest\n").map_err(io_err("writing a new file"))?;
    expect_eq(
        &fs::read(&new).map_err(io_err("reading it back"))?,
        b"written in the guest\n",
    )?;

    // Rewrite a file of the image: copy-up, the lower copy untouched.
    let target = merged.join(file);
    fs::write(&target, b"rewritten\n").map_err(io_err(format!("rewriting {file}")))?;
    expect_eq(
        &fs::read(&target).map_err(io_err("reading it back"))?,
        b"rewritten\n",
    )?;

    // Rename it, then delete it.
    let moved = merged.join(format!("{file}.moved"));
    fs::rename(&target, &moved).map_err(io_err(format!("renaming {file}")))?;
    if target.exists() {
        return Err(format!("{file} still there after its rename"));
    }
    expect_eq(
        &fs::read(&moved).map_err(io_err("reading the renamed file"))?,
        b"rewritten\n",
    )?;
    fs::remove_file(&moved).map_err(io_err("deleting the renamed file"))?;
    if moved.exists() {
        return Err("the deleted file is still there".into());
    }

    // Delete a file only the lower layer has (a whiteout in the upper).
    fs::remove_file(merged.join(delete)).map_err(io_err(format!("deleting {delete}")))?;
    if fs::symlink_metadata(merged.join(delete)).is_ok() {
        return Err(format!("{delete} is still there after its deletion"));
    }

    // Rename a symlink of the image three ways: these kernels have the overlayfs fix, so
    // none may fail with ENXIO.
    let link_target = fs::read_link(lower.join(symlink)).map_err(io_err("readlink lower"))?;
    let (a, b, c) = (
        format!("{symlink}.rename"),
        format!("{symlink}.renameat"),
        format!("{symlink}.renameat2"),
    );
    fs::rename(merged.join(symlink), merged.join(&a)).map_err(io_err("rename(2) of a symlink"))?;
    let parent = merged.join(symlink);
    let parent = parent.parent().unwrap_or(&merged);
    let name = |p: &str| {
        Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    renameat_in(parent, &name(&a), &name(&b)).map_err(io_err("renameat(2) of a symlink"))?;
    renameat2(&merged.join(&b), &merged.join(&c), libc::RENAME_NOREPLACE)
        .map_err(io_err("renameat2(RENAME_NOREPLACE) of a symlink"))?;
    let now = fs::read_link(merged.join(&c)).map_err(io_err("readlink after renames"))?;
    if now != link_target {
        return Err(format!(
            "the renamed symlink points at {}, not {}",
            now.display(),
            link_target.display()
        ));
    }
    for gone in [symlink, &a, &b] {
        if fs::symlink_metadata(merged.join(gone)).is_ok() {
            return Err(format!("{gone} still there after the renames"));
        }
    }

    // The image below is exactly as it was.
    let lower_after = tree::describe(lower).map_err(io_err("describing the lower dir"))?;
    let diff = tree::differences(&lower_after, &lower_before);
    if !diff.is_empty() {
        return Err(format!("the lower dir changed: {diff:?}"));
    }
    let upper_entries = tree::describe(&upper).map_err(io_err("describing the upper dir"))?;
    println!(
        "overlayfs over virtio-fs: new file, copy-up, rename, delete, whiteout, symlink \
         rename/renameat/renameat2 all worked; the lower tree is unchanged; the upper holds {} entries",
        upper_entries.len()
    );
    // SAFETY: a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(cstring(&merged)?.as_ptr(), 0) };
    if rc != 0 {
        return Err(format!("umount overlay: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn expect_eq(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "read {:?}, expected {:?}",
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want)
        ))
    }
}

fn read_all(file: &Path) -> io::Result<u64> {
    let mut f = fs::File::open(file)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn expect_eio(file: &Path, limit: Duration) -> Result<(), String> {
    for attempt in 1..=2 {
        let started = Instant::now();
        let result = read_all(file);
        let took = started.elapsed();
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                println!(
                    "read {attempt} of {}: EIO after {:.1} s",
                    file.display(),
                    took.as_secs_f32()
                );
            }
            Err(e) => return Err(format!("read {attempt}: {e}, expected EIO")),
            Ok(n) => return Err(format!("read {attempt}: {n} bytes, expected EIO")),
        }
        if took > limit {
            return Err(format!(
                "EIO came after {:.1} s, later than {limit:?}",
                took.as_secs_f32()
            ));
        }
    }
    let dir = file.parent().unwrap_or(Path::new("/"));
    let listed = fs::read_dir(dir)
        .map_err(io_err(format!("listing {} after the EIO", dir.display())))?
        .count();
    println!(
        "{} still lists ({listed} entries): the backend is alive",
        dir.display()
    );
    Ok(())
}

fn hang_read(file: &Path, marker: &str) -> Result<(), String> {
    // Open first, so that the request the VM dies in is the read itself.
    let mut f = fs::File::open(file).map_err(io_err(file.display()))?;
    println!("{marker}");
    let mut buf = vec![0u8; 1 << 20];
    let result = f.read(&mut buf);
    Err(format!(
        "the read returned ({result:?}) before the host killed the VM"
    ))
}

fn read_throughput(file: &Path) -> Result<(), String> {
    let started = Instant::now();
    let bytes = read_all(file).map_err(io_err(file.display()))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{RESULT} guest-read-bytes={bytes} guest-read-secs={secs:.3} guest-read-mb-per-s={:.1}",
        bytes as f64 / secs / 1e6
    );
    Ok(())
}

/// The longest the agent may take to mount, or to exit once unmounted (TCG is slow).
const FUSE_WAIT: Duration = Duration::from_secs(120);

fn fuse_image(layout: &str, mountpoint: &Path, expected: &Path) -> Result<(), String> {
    use std::process::{Command, Stdio};
    fs::create_dir_all(mountpoint).map_err(io_err(mountpoint.display()))?;
    let log_path = Path::new("/tmp/fuse-image.log");
    let log = fs::File::create(log_path).map_err(io_err(log_path.display()))?;
    let mut agent = Command::new("/bin/imgstream")
        .args(["mount", &format!("oci:{layout}:v1")])
        .arg(mountpoint)
        .args(["--cache-dir", "/tmp/fuse-cache", "--no-background"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(io_err("/bin/imgstream mount"))?;
    let result = serve_and_check(&mut agent, mountpoint, expected);
    if result.is_err() {
        let _ = agent.kill();
        let _ = agent.wait();
        // A lazy unmount of what may be left.
        if let Ok(path) = cstring(mountpoint) {
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let text = fs::read_to_string(log_path).unwrap_or_default();
    let negotiated = text.lines().find(|l| l.contains("FUSE options negotiated"));
    println!("agent: {}", negotiated.unwrap_or("(no FUSE INIT line)"));
    if result.is_err() {
        for line in text.lines().rev().take(20) {
            println!("  agent: {line}");
        }
    }
    result?;
    let passthrough = match negotiated {
        Some(line) if line.contains("passthrough=true") => 1,
        Some(line) if line.contains("passthrough=false") => 0,
        _ => return Err("the agent's log does not say what INIT negotiated".into()),
    };
    println!("{RESULT} fuse-passthrough={passthrough}");
    Ok(())
}

/// Waits for the agent's mount, checks the tree twice, unmounts it from outside and waits for
/// the agent to exit 0.
fn serve_and_check(
    agent: &mut std::process::Child,
    mountpoint: &Path,
    expected: &Path,
) -> Result<(), String> {
    let started = Instant::now();
    let wanted = format!(" {} fuse", mountpoint.display());
    loop {
        if let Some(status) = agent.try_wait().map_err(io_err("waiting for the agent"))? {
            return Err(format!("the agent exited before mounting: {status}"));
        }
        let mounts =
            fs::read_to_string("/proc/self/mounts").map_err(io_err("/proc/self/mounts"))?;
        if mounts.contains(&wanted) {
            break;
        }
        if started.elapsed() > FUSE_WAIT {
            return Err(format!("not mounted within {FUSE_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "mounted by the agent in {:.1} s",
        started.elapsed().as_secs_f32()
    );
    check_tree(mountpoint, expected)?;
    check_tree(mountpoint, expected)?;
    let path = cstring(mountpoint)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
        return Err(format!("umount: {}", io::Error::last_os_error()));
    }
    let unmounted = Instant::now();
    loop {
        if let Some(status) = agent.try_wait().map_err(io_err("waiting for the agent"))? {
            return if status.success() {
                println!("the agent exited once unmounted");
                Ok(())
            } else {
                Err(format!("the agent exited with {status} once unmounted"))
            };
        }
        if unmounted.elapsed() > FUSE_WAIT {
            return Err(format!(
                "the agent still runs {FUSE_WAIT:?} after the unmount"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
