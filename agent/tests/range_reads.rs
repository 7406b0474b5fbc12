//! How little a streamed read costs: one 4 KiB file out of a ~300 MB eStargz image in the
//! registry, with every byte the client receives counted by a TCP proxy in front of the
//! registry. The numbers are printed; the assertion is on bytes, not time.

mod support;

use std::{io::Write, sync::atomic::Ordering, time::Duration};

use imgstream::{
    fetch::layer,
    oci::manifest::{self, Document},
    registry::{
        BlobSource,
        http::{HttpConfig, RegistryClient},
    },
};
use support::{Fault, Proxy, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4k_file_from_a_300mb_image_costs_a_few_range_requests() {
    let scratch = support::scratch("range300");
    let root = scratch.join("root");
    support::busybox_rootfs(&root);
    // 150 x 2 MiB of incompressible data, 2000 small files, and the 4 KiB file we read.
    for i in 0..150u64 {
        let dir = root.join(format!("data/{:02}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("blob-{i}.bin")),
            support::noise(i + 1, 2 << 20),
        )
        .unwrap();
    }
    for i in 0..2000u64 {
        let dir = root.join(format!("usr/share/doc/pkg{}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("f{i}.txt")),
            format!("file {i}\n").repeat(20),
        )
        .unwrap();
    }
    let target = support::noise(424242, 4096);
    std::fs::write(root.join("etc/target.conf"), &target).unwrap();

    let registry = Registry::start("range300", None);
    let reg = registry.host();
    let layout = scratch.join("layout");
    support::build_image(&layout, "v1", std::slice::from_ref(&root), &["/bin/true"]).await;
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/big/app:v1"),
    );
    support::imgstream(&[
        "convert",
        &format!("{reg}/big/app:v1"),
        &format!("{reg}/big/esgz:v1"),
        "--insecure-registry",
        &reg,
        "--scratch",
        scratch.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&root).unwrap();

    // Read the manifest directly, then count what reading the file costs through the proxy.
    let config = HttpConfig {
        insecure: vec![reg.clone()],
        auth_file: None,
        timeout: Duration::from_secs(10),
        ..HttpConfig::default()
    };
    let direct = RegistryClient::new(&reg, "big/esgz", config.clone()).unwrap();
    let fetched = direct.manifest("v1").await.unwrap();
    let Document::Manifest(m) = manifest::parse(&fetched.bytes, &fetched.media_type).unwrap()
    else {
        panic!()
    };
    let desc = &m.layers[0];

    let proxy = Proxy::start(registry.addr, Fault::None);
    let config = HttpConfig {
        insecure: vec![proxy.host()],
        ..config
    };
    let client = RegistryClient::new(&proxy.host(), "big/esgz", config).unwrap();
    let opened = layer::open(&client, desc).await.unwrap();
    let after_open = proxy.bytes();
    let data = opened.read_file(&client, "etc/target.conf").await.unwrap();
    assert!(data == target, "the file read back is the file written");
    let total = proxy.bytes();
    let connections = proxy.connections.load(Ordering::SeqCst);
    let line = format!(
        "read 4096 B from a {:.1} MB eStargz layer: {} B transferred ({} B footer+TOC, {} B file), {connections} connection(s), {:.4}% of the layer",
        desc.size as f64 / 1e6,
        total,
        after_open,
        total - after_open,
        100.0 * total as f64 / desc.size as f64
    );
    println!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
    assert!(desc.size > 300_000_000, "the layer is {} bytes", desc.size);
    assert!(total < 1_000_000, "{line}");
    assert!(
        total - after_open < 16_384,
        "the file itself costs about one chunk: {line}"
    );
    drop(registry);
    std::fs::remove_dir_all(&scratch).unwrap();
}
