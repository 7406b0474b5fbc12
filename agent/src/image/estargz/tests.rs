use super::*;
use crate::image::estargz::{MAX_ENTRIES, MAX_PATH_DEPTH, MAX_PATH_LEN, index::MAX_REPLACED_DIRS};
use crate::image::tar::Header;

/// A layer exercising every kind of entry, a chunked file and metadata corners.
fn sample_entries() -> Vec<(Header, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |h: Header, data: Vec<u8>| out.push((h, data));
    let mut d = Header::new("etc/", Kind::Directory);
    d.mode = 0o755;
    d.mtime = 1_600_000_000;
    add(d, vec![]);
    let mut f = Header::new("etc/hosts", Kind::Regular);
    f.size = 13;
    f.uid = 1000;
    f.gid = 1000;
    f.uname = "u".into();
    f.mtime = 1_600_000_001;
    add(f, b"127.0.0.1 me\n".to_vec());
    let mut big = Header::new("usr/lib/big.bin", Kind::Regular);
    big.size = 10_000;
    big.mode = 0o4755;
    big.xattrs.insert(
        "security.capability".into(),
        vec![1, 0, 0, 2, 0x20, 0, 0, 0],
    );
    add(big, (0..10_000u32).map(|i| (i * 7 % 253) as u8).collect());
    add(Header::new("empty", Kind::Regular), vec![]);
    let mut s = Header::new("etc/link", Kind::Symlink);
    s.link_name = "hosts".into();
    add(s, vec![]);
    let mut hl = Header::new("etc/hard", Kind::HardLink);
    hl.link_name = "etc/hosts".into();
    add(hl, vec![]);
    let mut c = Header::new("dev/null", Kind::CharDevice);
    c.dev_major = 1;
    c.dev_minor = 3;
    add(c, vec![]);
    add(Header::new("run/fifo", Kind::Fifo), vec![]);
    let mut t = Header::new("tmp/", Kind::Directory);
    t.mode = 0o1777;
    add(t, vec![]);
    out
}

fn build(entries: &[(Header, Vec<u8>)], chunk_size: u64) -> (Vec<u8>, LayerSummary) {
    crate::testing::estargz_layer(entries, chunk_size, true)
}

fn open(blob: &[u8], expected: Option<&Digest>) -> Result<(LayerIndex, Digest), EstargzError> {
    crate::testing::layer_index(blob, expected)
}

fn file_bytes(blob: &[u8], index: &LayerIndex, path: &str) -> Vec<u8> {
    let node = index.data_node(index.get(path).unwrap());
    let mut out = Vec::new();
    for chunk in &node.chunks {
        let member = &blob[chunk.blob_offset as usize..chunk.blob_end as usize];
        out.extend(decode_chunk(member, chunk).unwrap());
    }
    out
}

#[test]
fn written_layers_read_back_file_for_file() {
    let entries = sample_entries();
    let (blob, summary) = build(&entries, 4096);
    assert_eq!(summary.size, blob.len() as u64);
    assert_eq!(summary.digest, Digest::of(&blob));
    let (index, toc_digest) = open(&blob, Some(&summary.toc_digest)).unwrap();
    assert_eq!(toc_digest, summary.toc_digest);
    for (h, data) in &entries {
        let node = index
            .get(&h.name)
            .unwrap_or_else(|| panic!("{} missing", h.name));
        assert_eq!(node.mode, h.mode, "{}", h.name);
        assert_eq!(
            (node.uid, node.gid),
            (h.uid as u32, h.gid as u32),
            "{}",
            h.name
        );
        assert_eq!(node.mtime.0, h.mtime, "{}", h.name);
        assert_eq!(node.xattrs, h.xattrs, "{}", h.name);
        if h.kind == Kind::Regular || h.kind == Kind::HardLink {
            let want = if h.kind == Kind::HardLink {
                &entries[1].1
            } else {
                data
            };
            assert_eq!(&file_bytes(&blob, &index, &h.name), want, "{}", h.name);
        }
    }
    let big = index.get("usr/lib/big.bin").unwrap();
    assert_eq!(big.chunks.len(), 3, "10000 bytes in 4096-byte chunks");
    assert_eq!(big.digest, Some(Digest::of(&entries[2].1)));
    assert!(
        matches!(index.get("etc/link").unwrap().kind, NodeKind::Symlink { ref target } if target == "hosts")
    );
    assert!(matches!(
        index.get("dev/null").unwrap().kind,
        NodeKind::CharDevice { major: 1, minor: 3 }
    ));
    assert!(matches!(
        index.get("etc/hard").unwrap().kind,
        NodeKind::HardLink { .. }
    ));
    assert!(index.get(NO_PREFETCH_LANDMARK).is_some());
    assert_eq!(
        index.get("usr").unwrap().kind,
        NodeKind::Directory,
        "implicit parent"
    );
}

#[test]
fn the_blob_is_an_ordinary_tar_gz() {
    let (blob, summary) = build(&sample_entries(), 4096);
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(blob.as_slice())
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(Digest::of(&tar), summary.diff_id);
    assert_eq!(tar.len() as u64, summary.uncompressed_size);
    let dir = std::env::temp_dir().join(format!("imgstream-esgz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("layer.tar.gz"), &blob).unwrap();
    let out = std::process::Command::new("tar")
        .arg("-tzvf")
        .arg(dir.join("layer.tar.gz"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "etc/hosts",
        "usr/lib/big.bin",
        "etc/link -> hosts",
        "stargz.index.json",
        ".no.prefetch.landmark",
    ] {
        assert!(listing.contains(name), "{name} missing from\n{listing}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupt_chunks_and_wrong_toc_digests_are_caught() {
    let (blob, summary) = build(&sample_entries(), 4096);
    let (index, _) = open(&blob, None).unwrap();
    let chunk = index.get("usr/lib/big.bin").unwrap().chunks[1].clone();
    let mut member = blob[chunk.blob_offset as usize..chunk.blob_end as usize].to_vec();
    let mid = member.len() / 2;
    member[mid] ^= 0x55;
    let err = decode_chunk(&member, &chunk).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    // A TOC digest from another layer.
    let other = Digest::of(b"another toc");
    assert!(matches!(
        open(&blob, Some(&other)),
        Err(EstargzError::TocDigest { .. })
    ));
    // Truncated member.
    assert!(
        decode_chunk(
            &blob[chunk.blob_offset as usize..chunk.blob_offset as usize + 8],
            &chunk
        )
        .is_err()
    );
    let _ = summary;
}

#[test]
fn ordinary_gzip_layers_are_not_estargz() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&[0u8; 4096]).unwrap();
    let blob = gz.finish().unwrap();
    assert!(matches!(
        open(&blob, None),
        Err(EstargzError::NotEstargz(_))
    ));
    assert!(matches!(
        parse_footer(b"short"),
        Err(EstargzError::NotEstargz(_))
    ));
    assert_eq!(parse_footer(&footer_bytes(0x1234)).unwrap(), 0x1234);
}

use std::io::Write as _;

fn toc_of(entries: Vec<TocEntry<'_>>) -> Toc<'_> {
    Toc {
        version: 1,
        entries,
        prefetch: Vec::new(),
    }
}

fn entry<'a>(name: &'a str, kind: &'a str) -> TocEntry<'a> {
    TocEntry {
        name: name.into(),
        kind: kind.into(),
        mode: 0o644,
        ..TocEntry::default()
    }
}

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn reg(name: &str, size: u64, offset: i64) -> TocEntry<'_> {
    TocEntry {
        size,
        offset,
        chunk_digest: D.into(),
        ..entry(name, "reg")
    }
}

fn invalid(entries: Vec<TocEntry<'_>>) -> String {
    match LayerIndex::from_toc(toc_of(entries), 1000, 2000) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_tocs_are_refused_with_the_reason() {
    assert!(invalid(vec![entry("../../etc/passwd", "reg")]).contains("escapes"));
    assert!(invalid(vec![entry("a/../../b", "dir")]).contains("escapes"));
    assert!(invalid(vec![reg("x", 10, 5000)]).contains("outside"));
    assert!(invalid(vec![reg("x", 10, -1)]).contains("negative"));
    assert!(
        invalid(vec![TocEntry {
            chunk_digest: "".into(),
            ..reg("x", 10, 10)
        }])
        .contains("chunkDigest")
    );
    assert!(
        invalid(vec![TocEntry {
            chunk_digest: "sha256:zz".into(),
            ..reg("x", 10, 10)
        }])
        .contains("chunkDigest")
    );
    assert!(invalid(vec![reg("x", u64::MAX, 10)]).contains("limit"));
    assert!(
        invalid(vec![TocEntry {
            chunk_size: 4,
            ..reg("x", 10, 10)
        }])
        .contains("cover")
    );
    let hl = |name: &'static str, target: &'static str| TocEntry {
        link_name: target.into(),
        ..entry(name, "hardlink")
    };
    assert!(invalid(vec![hl("a", "nothing")]).contains("missing"));
    assert!(invalid(vec![entry("d", "dir"), hl("a", "d")]).contains("directory"));
    assert!(invalid(vec![hl("a", "b"), hl("b", "a")]).contains("cycle"));
    assert!(invalid(vec![hl("a", "a")]).contains("hardlink"));
    // Found by the estargz_toc fuzz target: a hard link whose parent directory is implicit
    // was left unresolved.
    let index = LayerIndex::from_toc(
        toc_of(vec![entry("a", "reg"), hl("d/e/h", "a")]),
        1000,
        2000,
    )
    .unwrap();
    let link = index.get("d/e/h").unwrap();
    assert!(matches!(link.kind, NodeKind::HardLink { target } if index.nodes[target].path == "a"));
    assert!(invalid(vec![entry("f", "reg"), entry("f/g", "reg")]).contains("parent"));
    assert!(invalid(vec![entry("x", "socket")]).contains("unknown type"));
    assert!(invalid(vec![entry("s", "symlink")]).contains("target"));
    assert!(
        invalid(vec![TocEntry {
            uid: 1 << 40,
            ..entry("x", "reg")
        }])
        .contains("uid")
    );
    assert!(
        invalid(vec![TocEntry {
            modtime: "yesterday".into(),
            ..entry("x", "reg")
        }])
        .contains("RFC 3339")
    );
    assert!(
        invalid(vec![TocEntry {
            chunk_offset: 3,
            ..entry("x", "chunk")
        }])
        .contains("unknown file")
    );
    let bad_version = LayerIndex::from_toc(
        Toc {
            version: 2,
            entries: vec![],
            prefetch: Vec::new(),
        },
        1000,
        2000,
    )
    .unwrap_err();
    assert!(bad_version.to_string().contains("version"));
    let beyond = LayerIndex::from_toc(toc_of(vec![]), 1990, 2000).unwrap_err();
    assert!(beyond.to_string().contains("beyond"));
}

#[test]
fn recorded_reads_become_the_prefetch_list() {
    let mut w = EstargzWriter::new(
        Vec::new(),
        WriterOptions {
            chunk_size: 1000,
            level: 6,
        },
    );
    w.append_landmark(false).unwrap();
    for (h, data) in &sample_entries() {
        let mut h = h.clone();
        h.size = data.len() as u64;
        w.append(&h, &mut data.as_slice()).unwrap();
    }
    w.prefetch_reads([
        // First touch order: the end of big.bin, a read across two of its chunks, its
        // start again (already listed), a file that is not regular, a path not in the layer.
        ("usr/lib/big.bin".to_string(), 9_500, 100),
        ("./usr/lib/big.bin".to_string(), 1_990, 20),
        ("usr/lib/big.bin".to_string(), 9_999, 1),
        ("etc/link".to_string(), 0, 5),
        ("nowhere".to_string(), 0, 5),
        ("etc/hosts".to_string(), 0, 4096),
    ]);
    let (blob, summary) = w.finish().unwrap();
    let (index, _) = open(&blob, Some(&summary.toc_digest)).unwrap();
    let listed: Vec<(String, u64)> = index
        .prefetch_chunks()
        .into_iter()
        .map(|(n, c)| {
            let node = &index.nodes[n];
            (node.path.clone(), node.chunks[c].file_offset)
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("usr/lib/big.bin".to_string(), 9_000),
            ("usr/lib/big.bin".to_string(), 1_000),
            ("usr/lib/big.bin".to_string(), 2_000),
            ("etc/hosts".to_string(), 0),
        ]
    );
}

#[test]
fn a_prefetch_entry_must_name_a_chunk() {
    let (blob, summary) = build(&sample_entries(), 1000);
    let (index, _) = open(&blob, Some(&summary.toc_digest)).unwrap();
    // No list and no prioritised files (the no-prefetch landmark): nothing to prefetch.
    assert!(index.prefetch_chunks().is_empty());
    let toc_offset = index.toc_offset;
    let toc = |name: &str, offset: u64| {
        let mut toc = toc_of(vec![
            TocEntry {
                size: 2000,
                offset: 100,
                chunk_size: 1000,
                chunk_digest: Digest::of(b"a").to_string().into(),
                ..entry("big", "reg")
            },
            TocEntry {
                offset: 200,
                chunk_offset: 1000,
                chunk_size: 1000,
                chunk_digest: Digest::of(b"b").to_string().into(),
                ..entry("big", "chunk")
            },
        ]);
        toc.prefetch = vec![PrefetchChunk {
            name: name.into(),
            chunk_offset: offset,
        }];
        LayerIndex::from_toc(toc, toc_offset, toc_offset + 100)
    };
    let ok = toc("./big", 1000).unwrap();
    let big = ok.nodes.iter().position(|n| n.path == "big").unwrap();
    assert_eq!(ok.prefetch_chunks(), [(big, 1)]);
    for (name, offset) in [("big", 500), ("big", 2000), ("small", 0), ("", 0)] {
        let err = toc(name, offset).unwrap_err().to_string();
        assert!(err.contains("prefetch entry 0"), "{name}@{offset}: {err}");
    }
}

#[test]
fn prioritised_files_are_prefetched_without_a_list() {
    let entries = sample_entries();
    let mut w = EstargzWriter::new(
        Vec::new(),
        WriterOptions {
            chunk_size: 4000,
            level: 6,
        },
    );
    // big.bin first, then the landmark, then the rest: eStargz's own prefetch convention.
    let (big, data) = entries
        .iter()
        .find(|(h, _)| h.name == "usr/lib/big.bin")
        .unwrap();
    let mut h = big.clone();
    h.size = data.len() as u64;
    w.append(&h, &mut data.as_slice()).unwrap();
    w.append_landmark(true).unwrap();
    for (h, data) in entries.iter().filter(|(h, _)| h.name != big.name) {
        let mut h = h.clone();
        h.size = data.len() as u64;
        w.append(&h, &mut data.as_slice()).unwrap();
    }
    let (blob, summary) = w.finish().unwrap();
    let (index, _) = open(&blob, Some(&summary.toc_digest)).unwrap();
    let big = index
        .nodes
        .iter()
        .position(|n| n.path == "usr/lib/big.bin")
        .unwrap();
    assert_eq!(index.prefetch_chunks(), [(big, 0), (big, 1), (big, 2)]);
}

/// `LayerIndex::from_toc` on a thread with a tokio worker's 2 MiB stack.
fn index_on_small_stack(toc: Toc<'_>) -> Result<LayerIndex, String> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn_scoped(scope, move || {
                LayerIndex::from_toc(toc, 1000, 2000).map_err(|e| e.to_string())
            })
            .unwrap()
            .join()
            .expect("no stack overflow")
    })
}

#[test]
fn deep_paths_cost_no_stack_and_the_path_caps_hold() {
    // Just under both caps: parents made by a loop, not one frame per component.
    let deep = vec!["d"; MAX_PATH_DEPTH - 1].join("/") + "/f";
    assert!(deep.len() < MAX_PATH_LEN);
    let index = index_on_small_stack(toc_of(vec![entry(&deep, "dir")])).unwrap();
    assert_eq!(
        index.nodes.len(),
        MAX_PATH_DEPTH + 1,
        "the root and every parent"
    );
    // One component more, a path one byte too long: refused, naming the entry.
    let deeper = vec!["d"; MAX_PATH_DEPTH].join("/") + "/f";
    let err = index_on_small_stack(toc_of(vec![entry(&deeper, "dir")])).unwrap_err();
    assert!(err.contains("deeper than"), "{err}");
    let long = "x".repeat(MAX_PATH_LEN + 1);
    let err = index_on_small_stack(toc_of(vec![entry(&long, "dir")])).unwrap_err();
    assert!(err.contains("longer than"), "{err}");
    // Twenty thousand components (one frame pair each in the old recursion): an error.
    let hostile = vec!["a"; 20_000].join("/");
    let err = index_on_small_stack(toc_of(vec![entry(&hostile, "reg")])).unwrap_err();
    assert!(err.contains("TOC entry 0"), "the entry is named: {err}");
}

#[test]
fn a_toc_with_too_many_entries_is_refused_before_it_is_indexed() {
    let entries = vec![TocEntry::default(); MAX_ENTRIES + 1];
    let err = LayerIndex::from_toc(toc_of(entries), 1000, 2000).unwrap_err();
    assert!(err.to_string().contains("entries"), "{err}");
}

#[test]
fn a_chunk_claiming_more_than_the_cap_is_refused() {
    let huge = TocEntry {
        chunk_size: (MAX_CHUNK + 1) as i64,
        ..reg("big", MAX_CHUNK + 1, 10)
    };
    let err = LayerIndex::from_toc(toc_of(vec![huge]), 1000, 2000).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

/// The parsed TOC borrows its strings from the JSON where they have no escapes; a name,
/// link target or owner that JSON must escape (quotes, backslashes, control characters,
/// `\u` forms other writers use for non-ASCII) is decoded as written.
#[test]
fn names_the_json_escapes_read_back_as_written() {
    let odd = "etc/a \"quoted\" name\\with\tescapes";
    let mut f = Header::new(odd, Kind::Regular);
    f.size = 3;
    f.uname = "us\"er".into();
    let mut s = Header::new("etc/link\"", Kind::Symlink);
    s.link_name = "a \"quoted\" name\\with\tescapes".into();
    let (blob, _) = build(&[(f, b"abc".to_vec()), (s, vec![])], 1 << 20);
    let (index, _) = open(&blob, None).unwrap();
    assert_eq!(file_bytes(&blob, &index, odd), b"abc");
    let link = index.get("etc/link\"").unwrap();
    assert_eq!(
        link.kind,
        NodeKind::Symlink {
            target: "a \"quoted\" name\\with\tescapes".into()
        }
    );

    // Non-ASCII as `\u` escapes (Go's encoder writes `<`, `>`, `&` so; others write more).
    let json = format!(
        r#"{{"version":1,"entries":[{{"name":"caf\u00e9/\u003cx\u003e","type":"reg","size":1,"offset":10,"chunkDigest":"{D}","modtime":"2020-01-01T00:00:00Z"}}]}}"#
    );
    let toc: Toc = serde_json::from_str(&json).unwrap();
    let index = LayerIndex::from_toc(toc, 1000, 2000).unwrap();
    assert_eq!(index.get("café/<x>").unwrap().size, 1);
    assert!(
        index
            .get("café")
            .is_some_and(|d| d.kind == NodeKind::Directory)
    );
}

fn link<'a>(name: &'a str, kind: &'a str, target: &'a str) -> TocEntry<'a> {
    TocEntry {
        link_name: target.into(),
        ..entry(name, kind)
    }
}

/// A name given twice in a layer (tar's `--append`, some build tools): the later entry is
/// the file, as GNU tar, containerd's unpacking and estargz's own builder have it; a
/// directory replaced by a file goes with everything under it, as containerd removes it.
#[test]
fn a_later_entry_of_the_same_name_replaces_the_earlier_one() {
    let index = LayerIndex::from_toc(
        toc_of(vec![
            reg("x", 10, 10),
            entry("d", "dir"),
            reg("d/inner", 10, 20),
            entry("d/sub", "dir"),
            entry("d/sub/deep", "reg"),
            link("x", "symlink", "elsewhere"),
            reg("d", 10, 30),
            entry("e", "reg"),
            entry("e", "dir"),
            entry("e/now", "reg"),
            TocEntry {
                mode: 0o700,
                ..entry("e", "dir")
            },
            reg("y", 10, 40),
            link("y-link", "hardlink", "y"),
        ]),
        1000,
        2000,
    )
    .unwrap();
    let mut paths: Vec<&str> = index.nodes.iter().map(|n| n.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["", "d", "e", "e/now", "x", "y", "y-link"]);
    assert!(
        matches!(&index.get("x").unwrap().kind, NodeKind::Symlink { target } if target == "elsewhere")
    );
    let d = index.get("d").unwrap();
    assert_eq!((&d.kind, d.chunks[0].blob_offset), (&NodeKind::Regular, 30));
    assert_eq!(index.get("e").unwrap().mode, 0o700);
    let y_link = index.get("y-link").unwrap();
    assert_eq!(index.data_node(y_link).path, "y");
    // Every node is reachable by its path, at its own place.
    for (i, node) in index.nodes.iter().enumerate() {
        assert_eq!(index.position(&node.path), Some(i), "{}", node.path);
    }
    // A file an earlier hard link names keeps that link's data: not replaced.
    let err = invalid(vec![
        reg("y", 10, 40),
        link("l", "hardlink", "y"),
        reg("y", 10, 50),
    ]);
    assert!(err.contains("hard link"), "{err}");
    // Each directory replaced walks the layer: bounded.
    let mut many = Vec::new();
    let names: Vec<String> = (0..=MAX_REPLACED_DIRS).map(|i| format!("d{i}")).collect();
    for name in &names {
        many.push(entry(name, "dir"));
        many.push(entry(name, "reg"));
    }
    assert!(invalid(many).contains("more directories replaced"));
}
