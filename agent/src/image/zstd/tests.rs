//! zstd:chunked layers written here read back file for file, decompress to the tar they
//! hold, and hostile TOCs, positions and frames get errors.

use std::io::Read;

use super::*;
use crate::{
    image::{
        estargz::{Chunk, decode_chunk},
        tar::TarReader,
    },
    oci::manifest::OCI_LAYER_ZSTD,
    testing::layer_tar,
};

/// The sample tar's entries written as a zstd:chunked layer with `chunk_size` chunks:
/// (blob, its descriptor with the annotations a converter writes, the tar).
fn chunked(chunk_size: u64) -> (Vec<u8>, Descriptor, Vec<u8>) {
    chunked_of(layer_tar().0, chunk_size)
}

/// `tar` written as a zstd:chunked layer: (blob, descriptor, tar).
fn chunked_of(tar: Vec<u8>, chunk_size: u64) -> (Vec<u8>, Descriptor, Vec<u8>) {
    let mut reader = TarReader::new(tar.as_slice());
    let mut writer = ChunkedWriter::new(
        Vec::new(),
        ChunkedOptions {
            chunk_size,
            ..Default::default()
        },
    )
    .expect("a writer");
    while let Some(header) = reader.next_header().expect("a valid tar") {
        let mut data = Vec::new();
        loop {
            let mut buf = [0u8; 8192];
            let n = reader.read_data(&mut buf).expect("a valid tar");
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        writer
            .append(&header, &mut data.as_slice())
            .expect("to memory");
    }
    let (blob, summary, position) = writer.finish().expect("to memory");
    assert_eq!(summary.size, blob.len() as u64);
    let mut desc = crate::testing::plain_descriptor(&blob);
    desc.media_type = OCI_LAYER_ZSTD.into();
    desc.annotations
        .insert(TOC_POSITION_ANNOTATIONS[1].into(), position.annotation());
    desc.annotations.insert(
        TOC_CHECKSUM_ANNOTATIONS[1].into(),
        summary.toc_digest.to_string(),
    );
    (blob, desc, tar)
}

fn index_of(blob: &[u8], desc: &Descriptor) -> Result<LayerIndex, EstargzError> {
    let (position, digest) = toc_of(desc).expect("zstd:chunked")?;
    let range = position.offset as usize..(position.offset + position.length) as usize;
    read_toc(&blob[range], &position, &digest, blob.len() as u64)
}

fn read_chunk(blob: &[u8], chunk: &Chunk) -> Result<Vec<u8>, EstargzError> {
    decode_chunk(
        &blob[chunk.blob_offset as usize..chunk.blob_end as usize],
        chunk,
    )
}

#[test]
fn a_chunked_layer_is_the_tar_when_decompressed_and_every_file_reads_back_from_its_frames() {
    let (blob, desc, tar) = chunked(64 * 1024);
    let mut whole = Vec::new();
    decoder(blob.as_slice())
        .expect("a decoder")
        .read_to_end(&mut whole)
        .expect("an ordinary zstd stream, skippable frames passed over");
    assert!(whole == tar, "the blob decompresses to the tar");

    let index = index_of(&blob, &desc).expect("the TOC validates");
    let (_, files) = layer_tar();
    let mut multi = 0;
    for (name, data) in &files {
        let node = index.get(name).expect("listed");
        let mut got = Vec::new();
        for chunk in &node.chunks {
            assert_eq!(chunk.unit, Unit::Frame);
            got.extend_from_slice(&read_chunk(&blob, chunk).expect("the chunk decodes"));
        }
        assert!(got == *data, "{name}");
        if node.chunks.len() > 1 {
            multi += 1;
        }
    }
    // The chunks tile the data, as eStargz members do: adjacent ones go in one request.
    let mut chunks: Vec<&Chunk> = index.nodes.iter().flat_map(|n| n.chunks.iter()).collect();
    chunks.sort_by_key(|c| c.blob_offset);
    for pair in chunks.windows(2) {
        assert!(
            pair[1].follows(pair[0]),
            "a gap after the chunk at {}",
            pair[0].blob_offset
        );
    }
    assert!(multi > 0, "some files span several chunks");
}

#[test]
fn positions_and_checksums_that_do_not_hold_are_refused() {
    let (blob, desc, _) = chunked(64 * 1024);
    let with = |key: &str, value: &str| {
        let mut d = desc.clone();
        for k in TOC_POSITION_ANNOTATIONS
            .iter()
            .chain(&TOC_CHECKSUM_ANNOTATIONS)
        {
            if *k == key
                || (TOC_POSITION_ANNOTATIONS.contains(&key) && TOC_POSITION_ANNOTATIONS.contains(k))
            {
                d.annotations.remove(*k);
            }
        }
        d.annotations.insert(key.into(), value.into());
        d
    };
    let position = TOC_POSITION_ANNOTATIONS[0];
    for bad in [
        "1:2:3",
        "a:b:c:1",
        "100:10:10:2",
        "4:10:10:1",
        &format!("{}:100:100:1", blob.len()),
    ] {
        let d = with(position, bad);
        assert!(
            toc_of(&d).expect("it claims zstd:chunked").is_err(),
            "{bad}"
        );
    }
    let (p, _) = toc_of(&desc).expect("zstd:chunked").expect("valid");
    let huge = format!("{}:{}:{}:1", p.offset, p.length, MAX_TOC_JSON + 1);
    assert!(toc_of(&with(position, &huge)).expect("claims").is_err());
    // No checksum: the TOC could not be verified.
    let mut unverified = desc.clone();
    for k in TOC_CHECKSUM_ANNOTATIONS {
        unverified.annotations.remove(k);
    }
    assert!(toc_of(&unverified).expect("claims").is_err());
    // Another checksum: refused before the TOC is decompressed.
    let other = with(
        TOC_CHECKSUM_ANNOTATIONS[1],
        &Digest::of(b"another TOC").to_string(),
    );
    assert!(matches!(
        index_of(&blob, &other),
        Err(EstargzError::TocDigest { .. })
    ));
    // A position whose uncompressed length is not the TOC's.
    let short = format!("{}:{}:{}:1", p.offset, p.length, p.uncompressed - 1);
    assert!(matches!(
        index_of(&blob, &with(position, &short)),
        Err(EstargzError::BadToc(_))
    ));
    // Not zstd:chunked at all.
    let mut plain = desc.clone();
    plain.annotations.clear();
    assert!(toc_of(&plain).is_none());
}

#[test]
fn a_changed_or_misfit_frame_is_an_error_and_a_wide_window_costs_nothing() {
    let (mut blob, desc, _) = chunked(64 * 1024);
    let index = index_of(&blob, &desc).expect("valid");
    let (name, _) = &layer_tar().1[4];
    let chunk = index.get(name).expect("listed").chunks[0].clone();
    let middle = ((chunk.blob_offset + chunk.blob_end) / 2) as usize;
    blob[middle] ^= 0x40;
    assert!(read_chunk(&blob, &chunk).is_err());

    // A frame that asks for a 128 MiB window (libzstd's streaming limit) costs no window:
    // it is decoded in one pass into the chunk's own buffer.
    let data = vec![7u8; 4096];
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("an encoder");
    encoder.window_log(27).expect("a window");
    encoder.long_distance_matching(true).expect("long mode");
    std::io::Write::write_all(&mut encoder, &data).expect("to memory");
    let frame = encoder.finish().expect("to memory");
    let chunk = |size: u64, digest: Digest| Chunk {
        file_offset: 0,
        size,
        blob_offset: 0,
        blob_end: frame.len() as u64,
        digest,
        unit: Unit::Frame,
    };
    let wide = chunk(data.len() as u64, Digest::of(&data));
    assert!(decode_chunk(&frame, &wide).expect("it decodes") == data);
    // A frame that holds more than the chunk, or less, is an error.
    let small = chunk(100, Digest::of(&data[..100]));
    assert!(decode_chunk(&frame, &small).is_err());
    let mut longer = data.clone();
    longer.push(7);
    assert!(decode_chunk(&frame, &chunk(4097, Digest::of(&longer))).is_err());
    assert!(decode_chunk(&frame[..frame.len() - 3], &wide).is_err());
}

/// `blob`'s frames up to its TOC, then `json` as its TOC and a footer that points at it.
fn with_toc(blob: &[u8], desc: &Descriptor, json: &[u8]) -> Vec<u8> {
    let (position, _) = toc_of(desc).expect("zstd:chunked").expect("valid");
    let mut out = blob[..position.frame_start() as usize].to_vec();
    let compressed = zstd::bulk::compress(json, 3).expect("to memory");
    let offset = out.len() as u64 + SKIPPABLE_HEADER;
    let frame = |out: &mut Vec<u8>, data: &[u8]| {
        out.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18]);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    };
    frame(&mut out, &compressed);
    let mut footer = Vec::new();
    for n in [offset, compressed.len() as u64, json.len() as u64, 1] {
        footer.extend_from_slice(&n.to_le_bytes());
    }
    footer.extend_from_slice(b"GNUlInUx");
    frame(&mut out, &footer);
    out
}

/// Writes the seeds of the `zstd_chunked` fuzz target (`agent/fuzz/seeds/zstd_chunked`):
/// `cargo test -p imgstream-agent --lib write_zstd_chunked_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes the fuzz seeds; run by hand"]
fn write_zstd_chunked_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/zstd_chunked");
    std::fs::create_dir_all(&dir).expect("the seeds directory");
    // A few small files and one of three 4 KiB chunks: seeds stay a few KB.
    let mut tar = Vec::new();
    for (name, len) in [("etc/a", 10usize), ("etc/b", 0), ("usr/bin/c", 12_000)] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut header = crate::image::tar::Header::new(name, crate::image::tar::Kind::Regular);
        header.size = len as u64;
        crate::image::tar::write_entry(&mut tar, &header, &data).expect("to memory");
    }
    tar.extend_from_slice(&crate::image::tar::TarWriter::end_of_archive());
    let (blob, desc, _) = chunked_of(tar, 4096);
    let (position, _) = toc_of(&desc).expect("zstd:chunked").expect("valid");
    let range = position.offset as usize..(position.offset + position.length) as usize;
    let json = decode_frames(&blob[range], position.uncompressed).expect("the TOC");
    let toc: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut toc = toc.clone();
        edit(&mut toc);
        with_toc(&blob, &desc, &serde_json::to_vec(&toc).expect("JSON"))
    };
    let first_reg = |toc: &mut serde_json::Value| -> usize {
        toc["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .position(|e| e["type"] == "reg" && e["size"].as_u64().unwrap_or(0) > 0)
            .expect("a regular file")
    };
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("sample-4k-chunks.zst", blob.clone()),
        ("hostile-truncated.zst", blob[..blob.len() - 20].to_vec()),
        (
            "hostile-chunk-past-toc.zst",
            edited(&|t| {
                let i = first_reg(t);
                t["entries"][i]["offset"] = (position.offset + 100).into();
            }),
        ),
        (
            "hostile-huge-chunk.zst",
            edited(&|t| {
                let i = first_reg(t);
                t["entries"][i]["size"] = (1u64 << 40).into();
                t["entries"][i]["chunkSize"] = (1u64 << 40).into();
            }),
        ),
        (
            "hostile-end-before-offset.zst",
            edited(&|t| {
                let i = first_reg(t);
                t["entries"][i]["endOffset"] = 1.into();
            }),
        ),
        (
            "hostile-dotdot-path.zst",
            edited(&|t| {
                let i = first_reg(t);
                t["entries"][i]["name"] = "../../etc/passwd".into();
            }),
        ),
        (
            "hostile-wrong-digest.zst",
            edited(&|t| {
                let i = first_reg(t);
                t["entries"][i]["digest"] = Digest::of(b"other").to_string().into();
            }),
        ),
    ];
    // A TOC that is not zstd at all, and one whose footer claims more JSON than there is.
    let mut raw = with_toc(&blob, &desc, b"{}");
    let toc_at = raw.len() - 48 - 8 - 9;
    raw[toc_at..toc_at + 4].copy_from_slice(b"JSON");
    seeds.push(("hostile-toc-not-zstd.zst", raw));
    let mut longer = with_toc(&blob, &desc, &json);
    let at = longer.len() - 40 + 16;
    let claimed = (json.len() as u64 + 1000).to_le_bytes();
    longer[at..at + 8].copy_from_slice(&claimed);
    seeds.push(("hostile-json-shorter-than-claimed.zst", longer));
    // A chunk whose frame declares a 2 GiB window.
    let mut wide = blob.clone();
    let index = index_of(&blob, &desc).expect("valid");
    let chunk = &index.get("usr/bin/c").expect("listed").chunks[1];
    let frame = chunk.blob_offset as usize;
    wide[frame + 4] &= !0x20; // not a single segment: a window descriptor follows
    wide[frame + 5] = 0xa8; // window log 31
    seeds.push(("hostile-huge-window.zst", wide));
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("a seed");
    }
}
