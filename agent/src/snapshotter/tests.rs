//! The snapshotter's filters and the gRPC service over a real unix socket, without FUSE:
//! prepare, unpack-style commit, views, the chain's overlay mounts, updates, removal order,
//! and the metadata surviving a reopen.

use std::collections::HashMap;

use super::{
    filter::Filter,
    proto::{
        CommitSnapshotRequest, Info, Kind, PrepareSnapshotRequest, PrepareSnapshotResponse,
        RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest, ViewSnapshotRequest,
        snapshots_client::SnapshotsClient,
    },
    *,
};

#[test]
fn filters_are_conjunctions_of_selectors() {
    let info = Info {
        name: "sha256:aa".into(),
        parent: "k8s.io/3/sha256:bb".into(),
        kind: Kind::Committed as i32,
        labels: HashMap::from([(TARGET_REF.to_string(), "sha256:aa".to_string())]),
        ..Default::default()
    };
    let f = |s: &str| Filter::parse(s).unwrap().matches(&info);
    assert!(f(
        r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent==k8s.io/3/sha256:bb"#
    ));
    assert!(!f(
        r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent==other"#
    ));
    assert!(f("kind==committed"));
    assert!(f(r#"labels."containerd.io/snapshot.ref""#));
    assert!(
        !f(r#"labels."a,b"==c"#),
        "commas inside quotes do not split"
    );
    for bad in ["kind==frozen", "size>3", "name"] {
        assert!(Filter::parse(bad).is_err(), "{bad}");
    }
}

/// The snapshotter (no FUSE keeper, no background download) in a fresh `dir`, served on its
/// socket: its config, its stop, its task and a channel to it.
async fn serving(
    dir: &std::path::Path,
    http: HttpConfig,
) -> (
    SnapshotterConfig,
    Shutdown,
    tokio::task::JoinHandle<Result<(), SnapshotterError>>,
    tonic::transport::Channel,
) {
    let _ = std::fs::remove_dir_all(dir);
    let config = SnapshotterConfig {
        root: dir.join("root"),
        socket: dir.join("snapshotter.sock"),
        http,
        mount: MountOptions {
            view: crate::fs::View::Merged,
            cache: crate::cache::CacheConfig {
                dir: dir.join("cache"),
                limit_bytes: None,
                prefer_uring: false,
            },
            fs: Default::default(),
            background: None,
            threads: 1,
            readahead_kb: None,
            prefetch: true,
            learned: None,
            share_learned: Default::default(),
            platform: crate::oci::manifest::Platform::host(),
            fetch_totals: None,
            fetch_journal: None,
            image_name: None,
        },
        keeper: None,
        pull_log: None,
    };
    let stop = Shutdown::new();
    let service = Snapshotter::open(config.clone()).await.unwrap();
    let listener = service.listen().unwrap();
    let server = tokio::spawn(service.serve(listener, stop.clone()));
    let channel = crate::cri::channel(&config.socket).await.unwrap();
    (config, stop, server, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_overlay_chains_and_its_metadata() {
    let dir = std::env::temp_dir().join(format!("imgstream-snapshotter-{}", std::process::id()));
    let (config, stop, server, channel) = serving(&dir, HttpConfig::default()).await;
    let mut client = SnapshotsClient::new(channel);

    // Layer 1 unpacked (no parent: a bind mount), committed; layer 2 on top of it.
    let prepare = |key: &str, parent: &str| PrepareSnapshotRequest {
        snapshotter: "imgstream".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    };
    let mounts = client
        .prepare(prepare("extract-1", ""))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    let commit = |name: &str, key: &str| CommitSnapshotRequest {
        snapshotter: "imgstream".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    };
    client.commit(commit("layer-1", "extract-1")).await.unwrap();
    client
        .prepare(prepare("extract-2", "layer-1"))
        .await
        .unwrap();
    client.commit(commit("layer-2", "extract-2")).await.unwrap();
    let mounts = client
        .prepare(prepare("container", "layer-2"))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "overlay");
    let lower = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lower.split(':').count(), 2, "nearest parent first: {lower}");
    // No other user reaches a layer by path: the snapshots and each snapshot are 0700 (the
    // container's root, `fs`, keeps 0755), and containerd's socket is 0600.
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    };
    let snapshots = config.root.join("snapshots");
    assert_eq!(mode(&snapshots), 0o700);
    for entry in std::fs::read_dir(&snapshots).unwrap() {
        let dir = entry.unwrap().path();
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        assert_eq!(mode(&dir.join("fs")), 0o755, "{}", dir.display());
    }
    assert_eq!(mode(&config.socket), 0o600);
    let view = client
        .view(ViewSnapshotRequest {
            snapshotter: "imgstream".into(),
            key: "view".into(),
            parent: "layer-1".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        (view[0].r#type.as_str(), view[0].options[0].as_str()),
        ("bind", "ro")
    );

    // Errors containerd relies on.
    let code =
        |r: Result<tonic::Response<PrepareSnapshotResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(client.prepare(prepare("container", "layer-2")).await),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(client.prepare(prepare("x", "missing")).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(client.prepare(prepare("y", "container")).await),
        tonic::Code::FailedPrecondition
    );
    let removed = client
        .remove(RemoveSnapshotRequest {
            snapshotter: "imgstream".into(),
            key: "layer-1".into(),
        })
        .await;
    assert_eq!(
        removed.unwrap_err().code(),
        tonic::Code::FailedPrecondition,
        "it has children"
    );

    // Labels update through a mask.
    let info = Info {
        name: "layer-2".into(),
        labels: HashMap::from([("containerd.io/gc.root".to_string(), "x".to_string())]),
        ..Default::default()
    };
    let updated = client
        .update(UpdateSnapshotRequest {
            snapshotter: "imgstream".into(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.containerd.io/gc.root".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.info.unwrap().labels["containerd.io/gc.root"], "x");

    stop.trigger();
    server.await.unwrap().unwrap();

    // Reopened: the same snapshots.
    let stop = Shutdown::new();
    let service = Snapshotter::open(config.clone()).await.unwrap();
    let names: Vec<String> = service
        .meta
        .all()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["container", "layer-1", "layer-2", "view"]);
    drop((stop, service));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A registry that answers every request with a large body, one byte every half second:
/// each frame is in time, the body never ends. Returns its host and whether it was asked.
fn trickling_registry() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let host = listener
        .local_addr()
        .expect("the bound address")
        .to_string();
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = asked.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 100000\r\n\r\n",
                );
                while conn.write_all(b" ").is_ok() {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            });
        }
    });
    (host, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_trickles_holds_up_only_its_own_layer() {
    let dir = std::env::temp_dir().join(format!("imgstream-snap-trickle-{}", std::process::id()));
    let (registry, asked) = trickling_registry();
    let http = HttpConfig {
        insecure: vec![registry.clone()],
        ..HttpConfig::default()
    };
    let (_config, stop, server, channel) = serving(&dir, http).await;
    let mut client = SnapshotsClient::new(channel.clone());

    // containerd prepares a layer of the trickling registry's image...
    let labels = HashMap::from([
        (
            TARGET_REF.to_string(),
            "sha256:slow-layer-chain".to_string(),
        ),
        (CRI_IMAGE_REF.to_string(), format!("{registry}/app:v1")),
        (
            CRI_LAYER_DIGEST.to_string(),
            format!("sha256:{}", "ab".repeat(32)),
        ),
    ]);
    let mut slow_client = SnapshotsClient::new(channel);
    let slow = tokio::spawn(async move {
        slow_client
            .prepare(PrepareSnapshotRequest {
                snapshotter: "imgstream".into(),
                key: "extract-slow".into(),
                parent: String::new(),
                labels,
            })
            .await
    });
    while !asked.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // ...while another image's layer is prepared, committed, looked at and removed.
    let soon = std::time::Duration::from_secs(10);
    let held = "held up by the other image's registry";
    tokio::time::timeout(
        soon,
        client.prepare(PrepareSnapshotRequest {
            snapshotter: "imgstream".into(),
            key: "extract-other".into(),
            parent: String::new(),
            labels: HashMap::new(),
        }),
    )
    .await
    .expect(held)
    .expect("the call succeeds");
    tokio::time::timeout(
        soon,
        client.commit(CommitSnapshotRequest {
            snapshotter: "imgstream".into(),
            name: "other".into(),
            key: "extract-other".into(),
            labels: HashMap::new(),
        }),
    )
    .await
    .expect(held)
    .expect("the call succeeds");
    let stat = tokio::time::timeout(
        soon,
        client.stat(StatSnapshotRequest {
            snapshotter: "imgstream".into(),
            key: "other".into(),
        }),
    )
    .await
    .expect(held)
    .expect("the call succeeds");
    assert_eq!(
        stat.into_inner()
            .info
            .expect("Stat answers with the info")
            .kind,
        Kind::Committed as i32
    );
    tokio::time::timeout(
        soon,
        client.remove(RemoveSnapshotRequest {
            snapshotter: "imgstream".into(),
            key: "other".into(),
        }),
    )
    .await
    .expect(held)
    .expect("the call succeeds");
    assert!(
        !slow.is_finished(),
        "the trickling layer is still being opened"
    );
    slow.abort();
    stop.trigger();
    let _ = tokio::time::timeout(soon, server).await;
    let _ = std::fs::remove_dir_all(&dir);
}
