//! The checks behind the fuzz targets (`agent/fuzz`), here so that the committed seeds and
//! every input a fuzzer once found run as regression tests on stable Rust too
//! (`tests/fuzz_seeds.rs`). Each check parses untrusted bytes the way the agent does and
//! asserts what must hold of whatever it accepts; a panic is a finding.
//!
//! Every check runs on a thread with a 2 MiB stack, the size of a tokio worker's, where the
//! agent parses these inputs (containerd's Prepare calls): an input that recurses deeper than
//! that is a finding too, where libFuzzer's own larger main-thread stack would hide it.

use crate::{
    image::{
        elf,
        estargz::{self, FOOTER_SIZE, LayerIndex, NodeKind, Toc},
        gzip::{self, BuildOptions, MIN_SPAN, SpanIndex},
        tar::TarReader,
    },
    oci::manifest::{self, Document, Platform},
};

/// A tokio worker thread's stack.
pub const WORKER_STACK: usize = 2 << 20;

/// A check: parses its input, panics on a finding.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name: the check each runs.
pub const TARGETS: [(&str, Check); 8] = [
    ("estargz_toc", estargz_toc),
    ("estargz_blob", estargz_blob),
    ("tar_reader", tar_reader),
    ("manifest", manifest),
    ("gzip_layer", gzip_layer),
    ("gzip_index", gzip_index),
    ("zstd_chunked", zstd_chunked),
    ("elf", elf_object),
];

/// Runs `check(data)` on a thread with a worker's stack; a panic there (an overflow aborts
/// the process, as it would the agent) is resumed here.
pub fn on_worker_stack(check: Check, data: &[u8]) {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("fuzz-check".into())
            .stack_size(WORKER_STACK)
            .spawn_scoped(scope, || check(data))
            .expect("a thread for the check");
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// A TOC as JSON, validated into a layer index: every accepted index must be consistent.
pub fn estargz_toc(data: &[u8]) {
    let Ok(toc) = serde_json::from_slice::<Toc>(data) else {
        return;
    };
    let Ok(index) = LayerIndex::from_toc(toc, 1 << 20, (1 << 20) + FOOTER_SIZE) else {
        return;
    };
    for (i, node) in index.nodes.iter().enumerate() {
        // One node a path, found where it is, under a directory (later entries of a name
        // replace earlier ones, and what they take out is gone).
        assert_eq!(index.position(&node.path), Some(i), "{}", node.path);
        if !node.path.is_empty() {
            let parent = node.path.rsplit_once('/').map_or("", |(p, _)| p);
            assert_eq!(
                index.get(parent).map(|p| &p.kind),
                Some(&NodeKind::Directory)
            );
        }
        assert!(
            !node.path.split('/').any(|p| p == ".." || p == "."),
            "{}",
            node.path
        );
        assert!(
            node.path.len() <= estargz::MAX_PATH_LEN,
            "{}",
            node.path.len()
        );
        let mut expected = 0;
        for chunk in &node.chunks {
            assert_eq!(chunk.file_offset, expected);
            assert!(chunk.blob_offset < chunk.blob_end && chunk.blob_end <= index.toc_offset);
            assert!(chunk.size <= estargz::MAX_CHUNK, "chunk of {}", chunk.size);
            expected += chunk.size;
        }
        if node.kind == NodeKind::Regular {
            assert_eq!(expected, node.size);
        }
        if let NodeKind::HardLink { target } = node.kind {
            assert!(!matches!(
                index.nodes[target].kind,
                NodeKind::HardLink { .. } | NodeKind::Directory
            ));
        }
    }
}

/// A whole blob: footer, TOC member (gzip, tar, JSON) and every chunk it points at.
pub fn estargz_blob(data: &[u8]) {
    let footer = FOOTER_SIZE as usize;
    if data.len() < footer {
        return;
    }
    let size = data.len() as u64;
    let Ok(toc_offset) = estargz::parse_footer(&data[data.len() - footer..]) else {
        return;
    };
    if toc_offset >= size - FOOTER_SIZE {
        return;
    }
    let member = &data[toc_offset as usize..data.len() - footer];
    let Ok((index, _)) = estargz::read_toc(member, toc_offset, size, None) else {
        return;
    };
    for node in &index.nodes {
        for chunk in &node.chunks {
            let compressed = &data[chunk.blob_offset as usize..chunk.blob_end as usize];
            if let Ok(bytes) = estargz::decode_chunk(compressed, chunk) {
                assert_eq!(bytes.len() as u64, chunk.size);
            }
        }
    }
}

/// Tar streams: every header and every byte of data, each entry as long as its header says,
/// never more than the stream holds but for sparse files' holes, which are bounded.
pub fn tar_reader(data: &[u8]) {
    let mut reader = TarReader::new(data);
    let mut buf = vec![0u8; 64 << 10];
    let (mut stored, mut expanded) = (0u64, 0u64);
    while let Ok(Some(header)) = reader.next_header() {
        let sparse = reader.is_sparse();
        let mut read = 0u64;
        loop {
            match reader.read_data(&mut buf) {
                Ok(0) => {
                    assert_eq!(read, header.size, "an entry read short of its size");
                    break;
                }
                Err(_) => break,
                Ok(n) => read += n as u64,
            }
        }
        if sparse {
            expanded += read;
        } else {
            stored += read;
        }
    }
    assert!(stored <= data.len() as u64);
    assert!(expanded <= data.len() as u64 + crate::image::tar::MAX_HOLES);
}

/// A file of an image read as ELF the way the loader prefetch reads it (`fs::loader`):
/// whatever headers are accepted, their segments and dynamic section lie within the file, every
/// address maps into it, and the names come from within the string table.
pub fn elf_object(data: &[u8]) {
    let size = data.len() as u64;
    let Some(object) = elf::Object::parse(data, size) else {
        return;
    };
    for s in &object.loads {
        assert!(s.offset + s.file_size <= size);
    }
    let Some(dynamic) = object.dynamic.clone() else {
        return;
    };
    assert!(dynamic.end <= size);
    let dynamic = elf::Dynamic::parse(&data[dynamic.start as usize..dynamic.end as usize]);
    let Some((addr, _)) = dynamic.strtab else {
        return;
    };
    let Some(table) = object.file_offset(addr) else {
        return;
    };
    assert!(table < size);
    if let Some(span) = dynamic.names_span() {
        assert!(span.start < span.end);
        for &name in dynamic.needed.iter().chain(&dynamic.search) {
            if let Some(name) = elf::string_at(&data[table as usize..], name) {
                assert!(!name.is_empty() && name.len() < elf::MAX_NAME as usize);
            }
        }
    }
}

/// Manifests and indexes as a registry might send them.
pub fn manifest(data: &[u8]) {
    for media_type in [
        "",
        manifest::OCI_MANIFEST,
        manifest::OCI_INDEX,
        manifest::DOCKER_LIST,
    ] {
        if let Ok(Document::Index(index)) = manifest::parse(data, media_type) {
            let _ = index.select(&Platform::host());
        }
    }
}

/// A plain gzip layer, indexed: whatever an index is built from, every span inflates from
/// its own bytes to what it was indexed as, and the index reads back as it was written.
pub fn gzip_layer(data: &[u8]) {
    let Ok(index) = SpanIndex::build(data, BuildOptions { span: MIN_SPAN }) else {
        return;
    };
    assert_eq!(index.compressed_size, data.len() as u64);
    for i in 0..index.spans.len() {
        let range = index.span_range(i).expect("a span of the index");
        let bytes = &data[range.start as usize..range.end as usize];
        if let Err(err) = index.inflate_span(i, bytes) {
            panic!("span {i} of an index just built does not inflate: {err}");
        }
    }
    let back =
        SpanIndex::decode(&index.encode().expect("an index encodes")).expect("an index reads back");
    assert!(
        back == index,
        "the index changed on its way through the format"
    );
    gzip_index_holds(&index);
    // With its windows apart: the same spans, each inflating with its window from the blob.
    let (core, windows) = index.encode_apart().expect("an index encodes apart");
    let apart = SpanIndex::decode(&core).expect("an index apart reads back");
    assert!(apart.entries == index.entries && apart.spans.len() == index.spans.len());
    for (i, span) in apart.spans.iter().enumerate() {
        let range = apart.span_range(i).expect("a span of the index");
        let bytes = &data[range.start as usize..range.end as usize];
        let window = span
            .start
            .window
            .place()
            .map_or(gzip::SpanWindow::Own, |p| {
                gzip::SpanWindow::Fetched(&windows[p.range.0 as usize..p.range.1 as usize])
            });
        if let Err(err) = gzip::inflate_span(&span.start, window, span.len, &span.digest, bytes) {
            panic!("span {i} of an index apart does not inflate: {err}");
        }
    }
    // Read through in order, as the background download checks a layer: every span is
    // handed out, each what its own inflation gave, and the layer is the one indexed.
    let cuts: Vec<gzip::Cut> = index
        .spans
        .iter()
        .map(|s| gzip::Cut {
            at: s.start.uncompressed,
            len: s.len,
            digest: s.digest,
        })
        .collect();
    let mut handed = 0;
    let read = gzip::read_through(
        data,
        &cuts,
        &index.layer,
        index.compressed_size,
        |cut, bytes| {
            assert!(cut.digest.matches(&bytes));
            handed += 1;
        },
    );
    if let Err(err) = read {
        panic!("a layer just indexed does not read through: {err}");
    }
    assert_eq!(handed, cuts.len());
}

/// A span index as a registry or a cache might hand it over: refused, or consistent enough
/// that serving from it can only fail with an error.
pub fn gzip_index(data: &[u8]) {
    if let Ok(index) = SpanIndex::decode(data) {
        gzip_index_holds(&index);
        // Spans inflated from bytes that are not theirs (and windows kept apart from bytes
        // that are not theirs either): errors, never a panic.
        for (i, span) in index.spans.iter().enumerate().take(4) {
            let range = index.span_range(i).expect("a span of the index");
            let want = (range.end - range.start).min(1 << 20) as usize;
            let bytes: Vec<u8> = data.iter().copied().cycle().take(want).collect();
            let _ = index.inflate_span(i, &bytes);
            if let Some(place) = span.start.window.place() {
                let len = (place.range.1 - place.range.0) as usize;
                let window: Vec<u8> = data.iter().rev().copied().cycle().take(len).collect();
                let _ = gzip::inflate_span(
                    &span.start,
                    gzip::SpanWindow::Fetched(&window),
                    span.len,
                    &span.digest,
                    &bytes,
                );
            }
        }
    }
}

fn gzip_index_holds(index: &SpanIndex) {
    for i in 0..index.spans.len() {
        let range = index.span_range(i).expect("a span of the index");
        assert!(range.start <= range.end && range.end <= index.compressed_size);
    }
    let Ok(files) = index.layer_index() else {
        return;
    };
    for node in &files.nodes {
        let mut expected = 0;
        for chunk in &node.chunks {
            assert_eq!(chunk.file_offset, expected);
            assert!(chunk.unit_offset() + chunk.size <= chunk.unit_len());
            assert!(chunk.blob_offset < chunk.blob_end && chunk.blob_end <= index.compressed_size);
            expected += chunk.size;
        }
        if node.kind == NodeKind::Regular {
            assert_eq!(expected, node.size);
        }
    }
}

/// A zstd:chunked blob as a registry might serve it. Its TOC position is taken from the
/// footer, if the blob ends with one, and its checksum from the TOC bytes there, as if the
/// manifest vouched for them: what is checked is everything after the checksum. An accepted
/// TOC's chunks lie before it, and every chunk decodes to its size or is an error.
pub fn zstd_chunked(data: &[u8]) {
    use crate::image::zstd::{self, TocPosition};
    let size = data.len() as u64;
    // Chunks are decoded from whatever bytes there are, with sizes the input claims.
    let _ = zstd::decode_frames(data, size.min(1 << 16));
    let Some(footer) = data.len().checked_sub(40).map(|at| &data[at..]) else {
        return;
    };
    let number = |i: usize| {
        let mut le = [0u8; 8];
        le.copy_from_slice(&footer[i * 8..i * 8 + 8]);
        u64::from_le_bytes(le)
    };
    let position = TocPosition {
        offset: number(0),
        length: number(1),
        uncompressed: number(2).min(estargz::MAX_TOC_JSON),
    };
    let Some(end) = position
        .offset
        .checked_add(position.length)
        .filter(|&e| e <= size)
    else {
        return;
    };
    if position.offset < zstd::SKIPPABLE_HEADER {
        return;
    }
    let toc = &data[position.offset as usize..end as usize];
    let checksum = crate::oci::digest::Digest::of(toc);
    let Ok(index) = zstd::read_toc(toc, &position, &checksum, size) else {
        return;
    };
    for node in &index.nodes {
        let mut expected = 0;
        for chunk in &node.chunks {
            assert_eq!(chunk.file_offset, expected);
            assert!(chunk.blob_offset < chunk.blob_end && chunk.blob_end <= position.frame_start());
            expected += chunk.size;
            if chunk.size <= 1 << 20 {
                let bytes = &data[chunk.blob_offset as usize..chunk.blob_end as usize];
                if let Ok(got) = estargz::decode_chunk(bytes, chunk) {
                    assert_eq!(got.len() as u64, chunk.size);
                }
            }
        }
        if node.kind == NodeKind::Regular {
            assert_eq!(expected, node.size);
        }
    }
}
