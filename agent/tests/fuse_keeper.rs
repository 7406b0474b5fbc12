//! `imgstream fuse-keeper` as a process: it stops on SIGTERM (it used to be SIGKILLed every
//! time: its signal task sat on a runtime nothing drove) and removes its socket; and a
//! connection it kept is served again only by a tree with the inode layout it was serving;
//! and a file a reader holds open in passthrough mode opens again after a graceful restart
//! and after the agent was killed.

mod support;

use std::{path::Path, sync::Arc};

use imgstream::{
    cache::ChunkCache,
    fs::keeper::Keeper,
    mount::{self, MountError, OpenedImage},
    oci::manifest::Platform,
    registry::{BlobSource, local::LocalLayout},
};
use support::FuseKeeper;

#[test]
fn the_keeper_stops_on_sigterm_and_removes_its_socket() {
    support::require_root();
    let scratch = support::scratch("fuse-keeper-term");
    let socket = scratch.join("keeper.sock");
    let keeper = FuseKeeper::start(&socket);
    let status = keeper.terminate();
    assert!(status.success(), "exited with {status}");
    assert!(!socket.exists(), "the socket went with the keeper");
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn the_keeper_runs_without_any_capability_in_a_private_directory() {
    support::require_root();
    let scratch = support::scratch("fuse-keeper-unprivileged");
    // A directory the keeper makes itself.
    let socket = scratch.join("keeper-run/fuse-keeper.sock");
    let keeper = FuseKeeper::start_under(
        &socket,
        &[
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
        ],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", keeper.pid()))
        .expect("the keeper's status");
    let caps = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim)
            .map(str::to_string)
    };
    assert_eq!(
        caps("CapEff:").as_deref(),
        Some("0000000000000000"),
        "{status}"
    );
    assert_eq!(caps("CapBnd:").as_deref(), Some("0000000000000000"));
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p)
            .expect("it exists")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(socket.parent().expect("a directory")), 0o700);
    assert_eq!(mode(&socket), 0o600);
    // It holds a FUSE connection and gives it back, with no capability at all.
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("/dev/fuse opens");
    let client = Keeper::new(&socket);
    let layout = imgstream::oci::digest::Digest::of(b"layout");
    client
        .put("/mnt/x", &layout, std::os::fd::AsFd::as_fd(&fuse))
        .expect("the keeper takes it");
    let held = client.get().expect("the keeper answers");
    let kept = std::fs::File::from(held["/mnt/x"].fd.try_clone().expect("a duplicate"));
    assert!(imgstream::fs::fusedev::is_fuse_device(&kept));
    assert_eq!(held["/mnt/x"].layout, Some(layout));
    let status = keeper.terminate();
    assert!(status.success(), "exited with {status}");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Hands `mounted`'s connection to the keeper under `key` and leaves the mount, as an agent
/// stopping on SIGTERM does.
fn leave_to_keeper(keeper: &Keeper, key: &str, mounted: mount::MountedImage) {
    keeper
        .put(
            key,
            &mounted.layout(),
            mounted.fuse_fd().expect("a FUSE descriptor"),
        )
        .expect("the keeper takes it");
    mounted.leave_mounted();
}

/// What the keeper holds under `key`, as the next agent takes it.
fn kept_by(keeper: &Keeper, key: &str) -> imgstream::fs::keeper::Kept {
    keeper
        .get()
        .expect("the keeper answers")
        .remove(key)
        .expect("kept")
}

fn open(
    runtime: &tokio::runtime::Runtime,
    layout: &Path,
    tag: &str,
    cache: &Arc<ChunkCache>,
) -> OpenedImage {
    let source: Arc<dyn BlobSource> =
        Arc::new(LocalLayout::open(layout).expect("the test layout opens"));
    runtime
        .block_on(mount::open_layers(source, tag, &Platform::host(), cache))
        .expect("the test image opens")
}

#[test]
fn a_kept_connection_is_served_again_only_by_a_tree_of_the_same_inode_layout() {
    support::require_root();
    let scratch = support::scratch("fuse-keeper-layout");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // Two images with the same paths; in the second, one file is longer.
    let (a, b) = (scratch.join("a"), scratch.join("b"));
    for (dir, text) in [(&a, "hello\n"), (&b, "hello, world\n")] {
        std::fs::create_dir_all(dir.join("etc")).expect("a scratch directory");
        std::fs::write(dir.join("etc/hello"), text).expect("a scratch file");
    }
    let layout = scratch.join("layout");
    runtime.block_on(support::build_image(&layout, "a", &[a], &["/bin/true"]));
    runtime.block_on(support::build_image(&layout, "b", &[b], &["/bin/true"]));
    let options =
        support::local_mount_options(&scratch.join("cache"), std::time::Duration::from_secs(30));
    let cache = Arc::new(ChunkCache::open(&options.cache).expect("a cache"));
    let mountpoint = scratch.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("a mount point");
    let key = mountpoint.display().to_string();
    let adopt = |tag: &str, kept| {
        mount::adopt(
            runtime.handle().clone(),
            open(&runtime, &layout, tag, &cache),
            cache.clone(),
            &mountpoint,
            kept,
            &options,
        )
    };
    let keeper_process = FuseKeeper::start(&scratch.join("keeper.sock"));
    let keeper = Keeper::new(&keeper_process.socket);

    // An agent mounts image a, hands its connection to the keeper and stops serving.
    let mounted = mount::mount(
        runtime.handle().clone(),
        open(&runtime, &layout, "a", &cache),
        cache.clone(),
        &mountpoint,
        &options,
    )
    .expect("image a mounts");
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("etc/hello")).expect("a file of a"),
        "hello\n"
    );
    leave_to_keeper(&keeper, &key, mounted);

    // The next agent would serve image b's tree on it: refused, before anything is served.
    let kept = kept_by(&keeper, &key);
    let err = adopt("b", kept).expect_err("another layout is refused");
    assert!(matches!(err, MountError::LayoutChanged { .. }), "{err}");
    // A connection kept without a layout (an agent that did not say) is refused too.
    let mut unknown = kept_by(&keeper, &key);
    unknown.layout = None;
    let err = adopt("a", unknown).expect_err("an unknown layout is refused");
    assert!(matches!(err, MountError::LayoutChanged { .. }), "{err}");

    // Image a's tree has the kept layout: served again, the same file through the same mount.
    let kept = kept_by(&keeper, &key);
    let again = adopt("a", kept).expect("the same layout is served again");
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("etc/hello")).expect("a file of a, again"),
        "hello\n"
    );
    keeper.del(&key).expect("the keeper lets go");
    drop(again);
    drop(keeper_process);
    support::umount_below(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Opens `path`, reads it whole and keeps it open; returns the file, its bytes, and whether
/// the open was handed to a backing file.
fn open_counting(path: &Path) -> (std::fs::File, Vec<u8>, bool) {
    use std::sync::atomic::Ordering::SeqCst;
    let passed = imgstream::fs::passthrough::TOTALS.opens.load(SeqCst);
    let mut file = std::fs::File::open(path).expect("it opens");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).expect("it reads");
    let through = imgstream::fs::passthrough::TOTALS.opens.load(SeqCst) > passed;
    (file, bytes, through)
}

#[test]
fn a_file_held_open_in_passthrough_mode_opens_again_after_a_graceful_restart() {
    support::require_root();
    let scratch = support::scratch("fuse-keeper-passthrough");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let tree = scratch.join("tree");
    std::fs::create_dir_all(tree.join("bin")).expect("a scratch directory");
    let content = support::noise(3, 300_000);
    std::fs::write(tree.join("bin/app"), &content).expect("a scratch file");
    let layout = scratch.join("layout");
    runtime.block_on(support::build_image(&layout, "v1", &[tree], &["/bin/true"]));
    let options =
        support::local_mount_options(&scratch.join("cache"), std::time::Duration::from_secs(30));
    let cache = Arc::new(ChunkCache::open(&options.cache).expect("a cache"));
    let mountpoint = scratch.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("a mount point");
    let key = mountpoint.display().to_string();
    let keeper_process = FuseKeeper::start(&scratch.join("keeper.sock"));
    let keeper = Keeper::new(&keeper_process.socket);
    let mounted = mount::mount(
        runtime.handle().clone(),
        open(&runtime, &layout, "v1", &cache),
        cache.clone(),
        &mountpoint,
        &options,
    )
    .expect("it mounts");
    let app = mountpoint.join("bin/app");
    if !mounted.passthrough_enabled() {
        // Linux before 6.9, or built without CONFIG_FUSE_PASSTHROUGH: the agent's own path.
        let (_, bytes, through) = open_counting(&app);
        assert!(bytes == content && !through);
        eprintln!("this kernel has no FUSE passthrough: the restart with it is not tested here");
        drop(mounted);
        support::umount_below(&scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    // Read until the file is cached and its backing file written; then held open by a reader
    // (as a running program holds its binary), in passthrough mode.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let held = loop {
        let (file, bytes, through) = open_counting(&app);
        assert!(bytes == content, "the same bytes");
        if through {
            break file;
        }
        drop(file);
        assert!(
            std::time::Instant::now() < deadline,
            "the cached file was never handed to a backing file"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    leave_to_keeper(&keeper, &key, mounted);

    // The next agent goes on from the table the last one left: the file opens again (an open
    // answered outside passthrough would fail with EIO while the reader holds it), and the
    // reader's descriptor still reads it.
    let kept = kept_by(&keeper, &key);
    let again = mount::adopt(
        runtime.handle().clone(),
        open(&runtime, &layout, "v1", &cache),
        cache.clone(),
        &mountpoint,
        kept,
        &options,
    )
    .expect("served again");
    assert!(again.passthrough_enabled(), "passthrough goes on");
    let (second, bytes, through) = open_counting(&app);
    assert!(bytes == content && through, "opened again, in passthrough");
    let mut from_held = vec![0; 1000];
    std::os::unix::fs::FileExt::read_exact_at(&held, &mut from_held, 5000)
        .expect("the held descriptor reads");
    assert!(from_held == content[5000..6000]);
    drop((held, second));
    keeper.del(&key).expect("the keeper lets go");
    drop(again);
    drop(keeper_process);
    support::umount_below(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The image and the places the passthrough restart tests share with their killed agent.
struct PassthroughScene {
    scratch: std::path::PathBuf,
    layout: std::path::PathBuf,
    options: mount::MountOptions,
    mountpoint: std::path::PathBuf,
    socket: std::path::PathBuf,
    content: Vec<u8>,
}

impl PassthroughScene {
    /// In `scratch`, made by the caller (the test) or found (its agent process).
    fn at(scratch: &Path) -> Self {
        Self {
            scratch: scratch.to_path_buf(),
            layout: scratch.join("layout"),
            options: support::local_mount_options(
                &scratch.join("cache"),
                std::time::Duration::from_secs(30),
            ),
            mountpoint: scratch.join("mnt"),
            socket: scratch.join("keeper.sock"),
            content: support::noise(3, 300_000),
        }
    }

    fn make(&self, runtime: &tokio::runtime::Runtime) {
        let tree = self.scratch.join("tree");
        std::fs::create_dir_all(tree.join("bin")).expect("a scratch directory");
        std::fs::write(tree.join("bin/app"), &self.content).expect("a scratch file");
        runtime.block_on(support::build_image(
            &self.layout,
            "v1",
            &[tree],
            &["/bin/true"],
        ));
        std::fs::create_dir_all(&self.mountpoint).expect("a mount point");
    }

    fn key(&self) -> String {
        self.mountpoint.display().to_string()
    }
}

/// The agent the next test kills: run by it as a process of its own (this test binary, with
/// `IMGSTREAM_TEST_AGENT_DIR` set), never on its own. Mounts the scene's image, hands the
/// connection to the keeper as the snapshotter does at mount time, reads `bin/app` until its
/// opens pass through, says `READY` and waits.
#[test]
#[ignore = "run by a_file_held_open_in_passthrough_mode_opens_again_after_the_agent_is_killed"]
fn passthrough_agent_to_be_killed() {
    let Some(dir) = std::env::var_os("IMGSTREAM_TEST_AGENT_DIR") else {
        return;
    };
    let scene = PassthroughScene::at(Path::new(&dir));
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let cache = Arc::new(ChunkCache::open(&scene.options.cache).expect("a cache"));
    let mounted = mount::mount(
        runtime.handle().clone(),
        open(&runtime, &scene.layout, "v1", &cache),
        cache.clone(),
        &scene.mountpoint,
        &scene.options,
    )
    .expect("it mounts");
    Keeper::new(&scene.socket)
        .put(
            &scene.key(),
            &mounted.layout(),
            mounted.fuse_fd().expect("a FUSE descriptor"),
        )
        .expect("the keeper takes it");
    if !mounted.passthrough_enabled() {
        println!("NO-PASSTHROUGH");
    } else {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !open_counting(&scene.mountpoint.join("bin/app")).2 {
            assert!(std::time::Instant::now() < deadline, "never passed through");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        println!("READY");
    }
    std::io::Write::flush(&mut std::io::stdout()).expect("said");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[test]
fn a_file_held_open_in_passthrough_mode_opens_again_after_the_agent_is_killed() {
    use std::io::BufRead as _;
    support::require_root();
    let scratch = support::scratch("fuse-keeper-killed");
    let scene = PassthroughScene::at(&scratch);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    scene.make(&runtime);
    let keeper_process = FuseKeeper::start(&scene.socket);
    let keeper = Keeper::new(&keeper_process.socket);
    let mut agent = std::process::Command::new(std::env::current_exe().expect("this test"))
        .args([
            "--exact",
            "passthrough_agent_to_be_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("IMGSTREAM_TEST_AGENT_DIR", &scratch)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the agent runs");
    let said = std::io::BufReader::new(agent.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
        .find(|line| line == "READY" || line == "NO-PASSTHROUGH");
    let app = scene.mountpoint.join("bin/app");
    if said.as_deref() != Some("READY") {
        let _ = agent.kill();
        let _ = agent.wait();
        assert_eq!(
            said.as_deref(),
            Some("NO-PASSTHROUGH"),
            "the agent got ready"
        );
        eprintln!(
            "this kernel has no FUSE passthrough: a killed agent's successor is not tested with it"
        );
        support::umount_below(&scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    // Held open, in passthrough mode (the agent has the file's backing id idle), as a running
    // program holds its binary; then the agent is killed with no chance to say anything.
    let held = std::fs::File::open(&app).expect("it opens");
    agent.kill().expect("killed");
    agent.wait().expect("reaped");

    // The next agent goes on from the ledger the killed one kept: the file opens again (an
    // open answered outside passthrough would fail with EIO while the reader holds it).
    let cache = Arc::new(ChunkCache::open(&scene.options.cache).expect("a cache"));
    let again = mount::adopt(
        runtime.handle().clone(),
        open(&runtime, &scene.layout, "v1", &cache),
        cache.clone(),
        &scene.mountpoint,
        kept_by(&keeper, &scene.key()),
        &scene.options,
    )
    .expect("served again");
    assert!(again.passthrough_enabled(), "passthrough goes on");
    let (second, bytes, through) = open_counting(&app);
    assert!(
        bytes == scene.content && through,
        "opened again, in passthrough"
    );
    let mut from_held = vec![0; 1000];
    std::os::unix::fs::FileExt::read_exact_at(&held, &mut from_held, 5000)
        .expect("the held descriptor reads");
    assert!(from_held == scene.content[5000..6000]);
    drop((held, second));
    keeper.del(&scene.key()).expect("the keeper lets go");
    drop(again);
    drop(keeper_process);
    support::umount_below(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
}
