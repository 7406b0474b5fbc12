//! An image converted by `imgstream convert` stays an ordinary image: a stock containerd
//! (Debian's, default overlayfs snapshotter, runc) pulls it from the registry and runs it.

mod support;

use std::process::Command;

use support::{Containerd, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_containerd_pulls_and_runs_a_converted_image() {
    support::require_root();
    let scratch = support::scratch("ctr-run");
    let registry = Registry::start("ctr-run", None);
    let reg = registry.host();
    let base = scratch.join("base");
    support::busybox_rootfs(&base);
    let upper = scratch.join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/.wh.hostname"), b"").unwrap();
    std::fs::write(upper.join("etc/motd"), b"streamed\n").unwrap();
    let layout = scratch.join("layout");
    support::build_image(
        &layout,
        "v1",
        &[base, upper],
        &["/bin/sh", "-c", "cat /etc/motd"],
    )
    .await;
    support::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reg}/src/app:v1"),
    );
    support::imgstream(&[
        "convert",
        &format!("{reg}/src/app:v1"),
        &format!("{reg}/esgz/app:v1"),
        "--insecure-registry",
        &reg,
        "--scratch",
        scratch.to_str().unwrap(),
    ]);

    // Docker v2.2 manifests too: skopeo rewrites the image as one, imgstream converts it.
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            "--quiet",
            "--format",
            "v2s2",
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{reg}/src/docker:v1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::imgstream(&[
        "convert",
        &format!("{reg}/src/docker:v1"),
        &format!("{reg}/esgz/docker:v1"),
        "--insecure-registry",
        &reg,
        "--scratch",
        scratch.to_str().unwrap(),
    ]);

    let containerd = Containerd::start("ctr-run");
    let image = format!("{reg}/esgz/app:v1");
    let (ok, _, err) = containerd.ctr(&["images", "pull", "--plain-http", &image]);
    assert!(ok, "pull: {err}");
    let (ok, stdout, err) = containerd.ctr(&[
        "run",
        "--rm",
        &image,
        "esgz-run",
        "/bin/sh",
        "-c",
        "cat /etc/motd; ls /etc",
    ]);
    assert!(ok, "run: {err}");
    assert!(stdout.contains("streamed"), "{stdout}");
    assert!(
        !stdout.contains("hostname"),
        "the whiteout in the upper layer hides /etc/hostname: {stdout}"
    );
    // The image's own command (from the converted config).
    let (ok, stdout, err) = containerd.ctr(&["run", "--rm", &image, "esgz-cmd"]);
    assert!(ok, "run: {err}");
    assert_eq!(stdout.trim(), "streamed");
    // The Docker v2.2 image, converted, keeps Docker media types and runs too.
    let docker_image = format!("{reg}/esgz/docker:v1");
    let inspect = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{docker_image}"),
        ])
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(
        raw.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{raw}"
    );
    assert!(
        raw.contains("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        "{raw}"
    );
    let (ok, _, err) = containerd.ctr(&["images", "pull", "--plain-http", &docker_image]);
    assert!(ok, "pull: {err}");
    let (ok, stdout, err) = containerd.ctr(&["run", "--rm", &docker_image, "docker-cmd"]);
    assert!(ok, "run: {err}");
    assert_eq!(stdout.trim(), "streamed");
    drop(containerd);
    std::fs::remove_dir_all(&scratch).unwrap();
}
