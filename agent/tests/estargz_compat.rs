//! eStargz compatibility with stargz-snapshotter's own implementation (its Go `estargz`
//! package, from Debian), both ways: layers imgstream writes must open, verify and read there,
//! and layers it writes must open, verify and read here, file for file. The same Go helper
//! compresses a layer with Go's own compress/gzip, as docker and buildkit do, for the span
//! index to be built over.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
};

use imgstream::{
    image::{
        estargz::{self, EstargzWriter, FOOTER_SIZE, NodeKind, WriterOptions},
        gzip::{BuildOptions, MIN_SPAN, SpanIndex},
        tar::{Kind, TarReader},
    },
    oci::digest::Digest,
};

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imgstream-compat-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Builds the Go helper in GOPATH mode against Debian's packaged sources (no network).
fn go_helper(dir: &Path) -> PathBuf {
    let out = dir.join("estargz-compat");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/estargz-compat");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(src)
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", dir.join("gopath").display()),
        )
        .env("GOCACHE", dir.join("gocache"))
        .env("GOFLAGS", "")
        .status()
        .expect("go is needed: `cargo xtask setup` installs golang-go and the estargz sources");
    assert!(status.success(), "building the Go estargz helper failed");
    out
}

/// A source tree with the cases that matter, tarred by GNU tar.
fn source_tar(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc/deep/er")).unwrap();
    std::fs::write(root.join("etc/hostname"), "imgstream\n").unwrap();
    std::fs::write(root.join("empty"), "").unwrap();
    let big: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("usr/bin/big"), &big).unwrap();
    std::fs::hard_link(root.join("usr/bin/big"), root.join("usr/bin/big-again")).unwrap();
    std::os::unix::fs::symlink("../etc/hostname", root.join("usr/hostname")).unwrap();
    std::fs::write(root.join("etc/deep/er/x"), "x".repeat(5000)).unwrap();
    let status = Command::new("chmod")
        .arg("4755")
        .arg(root.join("usr/bin/big"))
        .status()
        .unwrap();
    assert!(status.success());
    let tar = dir.join("layer.tar");
    let status = Command::new("tar")
        .args([
            "--format=pax",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "-cf",
        ])
        .arg(&tar)
        .args(["-C", root.to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(status.success());
    tar
}

/// What a tar holds, in the Go helper's listing format.
fn listing_of_tar(tar: &Path, extra: &[&str]) -> Vec<String> {
    let mut r = TarReader::new(std::fs::File::open(tar).unwrap());
    let mut lines = Vec::new();
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    while let Some(h) = r.next_header().unwrap() {
        let mut data = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = r.read_data(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        let name = estargz::normalize(&h.name).unwrap();
        if name.is_empty() {
            continue;
        }
        let hex = |b: &[u8]| Digest::of(b).hex();
        let (kind, size, content) = match h.kind {
            Kind::Directory => ("dir", 0, String::new()),
            Kind::Regular => ("reg", data.len(), hex(&data)),
            Kind::Symlink => ("symlink", 0, hex(h.link_name.as_bytes())),
            Kind::HardLink => (
                "hardlink",
                0,
                hex(estargz::normalize(&h.link_name).unwrap().as_bytes()),
            ),
            _ => ("other", 0, String::new()),
        };
        hashes.insert(name.clone(), content.clone());
        lines.push(format!(
            "{kind} {name} {:o} {} {} {size} {content}",
            h.mode & 0o777,
            h.uid,
            h.gid
        ));
    }
    lines.extend(extra.iter().map(|s| s.to_string()));
    lines.sort();
    lines
}

fn convert_with_imgstream(tar: &Path, blob: &Path) -> Digest {
    let mut r = TarReader::new(std::fs::File::open(tar).unwrap());
    let out = std::fs::File::create(blob).unwrap();
    let mut w = EstargzWriter::new(
        out,
        WriterOptions {
            chunk_size: 64 * 1024,
            level: 6,
        },
    );
    let mut reads = Vec::new();
    while let Some(h) = r.next_header().unwrap() {
        let mut data = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = r.read_data(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        reads.push((h.name.clone(), 0, data.len() as u64));
        w.append(&h, &mut data.as_slice()).unwrap();
    }
    w.append_landmark(false).unwrap();
    // The TOC carries imgstream's prefetch list (every file, as if all were read at start):
    // stargz-snapshotter must still read and verify the layer.
    w.prefetch_reads(reads);
    w.finish().unwrap().1.toc_digest
}

/// The landmark entry each writer adds (imgstream gives it mode 644, the Go writer 0).
const OUR_LANDMARK: &str = "reg .no.prefetch.landmark 644 0 0 1 dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8";
const GO_LANDMARK: &str = "reg .no.prefetch.landmark 0 0 0 1 dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8";

#[test]
fn stargz_snapshotter_reads_and_verifies_imgstream_layers() {
    let dir = scratch("forward");
    let helper = go_helper(&dir);
    let tar = source_tar(&dir);
    let blob = dir.join("ours.esgz");
    let toc = convert_with_imgstream(&tar, &blob);
    let out = Command::new(&helper)
        .arg("verify")
        .arg(&blob)
        .arg(toc.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(theirs, listing_of_tar(&tar, &[OUR_LANDMARK]));
    // A wrong TOC digest must be refused there too.
    let out = Command::new(&helper)
        .arg("verify")
        .arg(&blob)
        .arg(Digest::of(b"x").to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn imgstream_reads_and_verifies_stargz_snapshotter_layers() {
    let dir = scratch("reverse");
    let helper = go_helper(&dir);
    let tar = source_tar(&dir);
    let blob_path = dir.join("theirs.esgz");
    let out = Command::new(&helper)
        .arg("build")
        .arg(&tar)
        .arg(&blob_path)
        .arg("65536")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut lines = printed.lines();
    let toc_digest: Digest = lines.next().unwrap().parse().unwrap();
    let diff_id: Digest = lines.next().unwrap().parse().unwrap();

    let blob = std::fs::read(&blob_path).unwrap();
    let size = blob.len() as u64;
    let toc_offset = estargz::parse_footer(&blob[blob.len() - FOOTER_SIZE as usize..]).unwrap();
    let member = &blob[toc_offset as usize..(size - FOOTER_SIZE) as usize];
    let (index, _) = estargz::read_toc(member, toc_offset, size, Some(&toc_digest)).unwrap();
    let mut mine = Vec::new();
    for node in &index.nodes {
        if node.path.is_empty() {
            continue;
        }
        let hex = |b: &[u8]| Digest::of(b).hex();
        let (kind, size, content) = match &node.kind {
            NodeKind::Directory => ("dir", 0, String::new()),
            NodeKind::Regular => {
                let mut data = Vec::new();
                for chunk in &node.chunks {
                    let member = &blob[chunk.blob_offset as usize..chunk.blob_end as usize];
                    data.extend(estargz::decode_chunk(member, chunk).unwrap());
                }
                ("reg", data.len(), hex(&data))
            }
            NodeKind::Symlink { target } => ("symlink", 0, hex(target.as_bytes())),
            NodeKind::HardLink { target } => {
                ("hardlink", 0, hex(index.nodes[*target].path.as_bytes()))
            }
            _ => ("other", 0, String::new()),
        };
        mine.push(format!(
            "{kind} {} {:o} {} {} {size} {content}",
            node.path,
            node.mode & 0o777,
            node.uid,
            node.gid
        ));
    }
    mine.sort();
    assert_eq!(mine, listing_of_tar(&tar, &[GO_LANDMARK]));
    let mut decompressed = Vec::new();
    flate2::read::MultiGzDecoder::new(blob.as_slice())
        .read_to_end(&mut decompressed)
        .unwrap();
    assert_eq!(
        Digest::of(&decompressed),
        diff_id,
        "diff ID as the Go writer computed it"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Docker's and buildkit's layers are compressed by Go's compress/gzip, which closes the
/// stream with an empty final block after the last data block. A span index of such a
/// layer (its last block longer than a span, so a checkpoint falls right before the
/// closing block) holds no empty span, reads back as an agent reads it, and every span
/// inflated on its own is the tar's bytes.
#[test]
fn span_indexes_of_layers_gzipped_by_go_read_back_and_inflate() {
    let dir = scratch("go-gzip");
    let helper = go_helper(&dir);
    source_tar(&dir);
    // Bytes that do not compress, for blocks (and spans) of their own, then the zeros.
    let mut noise = vec![0u8; 300_000];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut noise)
        .unwrap();
    std::fs::write(dir.join("rootfs/noise"), noise).unwrap();
    std::fs::write(dir.join("rootfs/zzz-zeros"), vec![0u8; 512 << 10]).unwrap();
    let tar = dir.join("layer-zeros.tar");
    let status = Command::new("tar")
        .args(["--format=pax", "--sort=name", "-cf"])
        .arg(&tar)
        .args(["-C", dir.join("rootfs").to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(status.success());
    let blob = dir.join("layer.tar.gz");
    let status = Command::new(&helper)
        .arg("gzip")
        .arg(&tar)
        .arg(&blob)
        .status()
        .unwrap();
    assert!(status.success());
    let (whole, layer) = (std::fs::read(&tar).unwrap(), std::fs::read(&blob).unwrap());

    let index = SpanIndex::build(&layer[..], BuildOptions { span: MIN_SPAN }).unwrap();
    assert!(index.spans.len() > 2, "{} spans", index.spans.len());
    assert!(index.spans.iter().all(|s| s.len > 0), "an empty span");
    let (encoded, _windows) = index.encode_apart().unwrap();
    SpanIndex::decode(&encoded).expect("the index reads back");
    let mut at = 0usize;
    for (i, span) in index.spans.iter().enumerate() {
        let range = index.span_range(i).unwrap();
        let got = index
            .inflate_span(i, &layer[range.start as usize..range.end as usize])
            .unwrap();
        assert!(got == whole[at..at + span.len as usize], "span {i}");
        at += span.len as usize;
    }
    assert_eq!(at, whole.len());
    std::fs::remove_dir_all(&dir).unwrap();
}
