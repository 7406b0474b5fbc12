//! Span indexes over gzip layers written by flate2 and by GNU gzip: every span inflated on
//! its own equals the same bytes of a plain decompression, every entry's data is where the
//! index says, and corrupted or hostile layers get errors, never wrong bytes.

use std::io::{Read, Write};

use super::*;
use crate::testing::{gzip, layer_tar};

/// GNU gzip's own output, the tool most layers' bytes come from.
fn gnu_gzip(data: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .args(["-c", "-n", "-6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip runs");
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("gzip finishes");
    writer.join().expect("the writer").expect("gzip reads");
    assert!(out.status.success());
    out.stdout
}

fn plain(layer: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(layer)
        .read_to_end(&mut out)
        .expect("a valid gzip stream");
    out
}

fn build(layer: &[u8], span: u64) -> SpanIndex {
    SpanIndex::build(layer, BuildOptions { span }).expect("the layer indexes")
}

/// Every span, inflated from its own compressed bytes, is that part of `whole`, the
/// layer's uncompressed stream.
fn check_every_span(layer: &[u8], index: &SpanIndex, whole: &[u8]) {
    assert_eq!(index.uncompressed_size, whole.len() as u64);
    assert_eq!(index.compressed_size, layer.len() as u64);
    assert_eq!(index.layer, crate::oci::digest::Digest::of(layer));
    let mut at = 0;
    for (i, span) in index.spans.iter().enumerate() {
        assert_eq!(span.start.uncompressed, at, "spans are contiguous");
        let range = index.span_range(i).expect("a span");
        let bytes = &layer[range.start as usize..range.end as usize];
        let got = index.inflate_span(i, bytes).expect("the span inflates");
        assert!(
            got == whole[at as usize..(at + span.len) as usize],
            "span {i} differs"
        );
        assert!(span.start.window.len() <= WINDOW);
        at += span.len;
    }
    assert_eq!(at, whole.len() as u64, "the spans cover the stream");
}

fn check_entries(index: &SpanIndex, whole: &[u8], files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let entry = index
            .entries
            .iter()
            .find(|e| &e.header.name == name)
            .expect("every file is listed");
        let at = entry.data_offset as usize;
        assert!(&whole[at..at + data.len()] == data.as_slice(), "{name}");
    }
}

#[test]
fn every_span_of_a_flate2_layer_inflates_on_its_own() {
    let (tar, files) = layer_tar();
    let layer = gzip(&tar, 6);
    let index = build(&layer, MIN_SPAN);
    assert!(index.spans.len() > 20, "{} spans", index.spans.len());
    assert!(
        index.spans.iter().any(|s| s.start.bits > 0),
        "checkpoints mid-byte are exercised"
    );
    assert_eq!(plain(&layer), tar);
    check_every_span(&layer, &index, &tar);
    check_entries(&index, &tar, &files);
    assert_eq!(index.entries.len(), files.len() + 1);
}

/// Runs of one byte or two compress to symbols of a few bits that repeat: a checkpoint
/// placed a symbol off would inflate the same bytes, so where one cannot be told apart the
/// span ends at the next block boundary instead. Every span still inflates to its bytes.
#[test]
fn checkpoints_in_runs_of_one_byte_are_where_they_say() {
    let mut data = vec![0u8; 1 << 20];
    data.extend(b"ab".repeat(300_000));
    data.extend(crate::testing::bytes(7, 200_000, true));
    data.extend(vec![0xffu8; 700_000]);
    for layer in [
        gnu_gzip(&data),
        gzip(&data, 1),
        gzip(&data, 6),
        gzip(&data, 9),
    ] {
        let index = build(&layer, MIN_SPAN);
        assert!(index.spans.iter().any(|s| s.start.head.is_some()));
        check_every_span(&layer, &index, &data);
    }
}

/// Spans end where they reach their length, inside a deflate block (whose header the
/// checkpoint carries), not at the block boundary after it: deflate blocks of GNU gzip
/// are often longer than a span.
#[test]
fn spans_end_inside_blocks_at_their_length() {
    let (tar, _) = layer_tar();
    for layer in [gnu_gzip(&tar), gzip(&tar, 1), gzip(&tar, 9)] {
        let index = build(&layer, MIN_SPAN);
        let inside = index
            .spans
            .iter()
            .filter(|s| s.start.head.is_some())
            .count();
        assert!(
            inside * 2 > index.spans.len(),
            "{inside} of {} spans start inside a block",
            index.spans.len()
        );
        // Every span but the last is as long as asked, give or take the symbol it ends in
        // (a match is at most 258 bytes), unless it ends at a member or block boundary.
        let exact = index.spans[..index.spans.len() - 1]
            .iter()
            .filter(|s| s.len.abs_diff(MIN_SPAN) <= 258)
            .count();
        assert!(
            exact >= inside.saturating_sub(1),
            "{exact} spans of their length"
        );
        assert!(
            index
                .spans
                .iter()
                .any(|s| s.start.head.is_some() && s.start.bits > 0)
        );
        check_every_span(&layer, &index, &tar);
        // They read back, headers and all.
        let encoded = index.encode().expect("an index encodes");
        assert_eq!(SpanIndex::decode(&encoded).expect("it decodes"), index);
        let (apart, blob) = index.encode_apart().expect("an index encodes");
        let decoded = SpanIndex::decode(&apart).expect("it decodes");
        assert_eq!(decoded.spans.len(), index.spans.len());
        assert!(
            decoded
                .spans
                .iter()
                .zip(&index.spans)
                .all(|(d, s)| d.start.head == s.start.head)
        );
        assert!(!blob.is_empty());
    }
}

#[test]
fn a_checkpoint_inside_a_block_that_does_not_resume_joins_its_span_to_the_one_before() {
    let (tar, _) = layer_tar();
    let layer = gnu_gzip(&tar);
    let honest = build(&layer, MIN_SPAN);
    // The first span whose checkpoint is inside a block (and not the last span: it needs
    // 32 KiB after it to be checked).
    let k = (1..honest.spans.len() - 1)
        .find(|&i| honest.spans[i].start.head.is_some())
        .expect("a checkpoint inside a block");
    // It is placed while the spans before the one it ends are finished.
    build::tests::MISPLACE.with(|m| m.set(Some(k - 1)));
    let built = SpanIndex::build(layer.as_slice(), BuildOptions { span: MIN_SPAN });
    build::tests::MISPLACE.with(|m| m.set(None));
    let joined = built.expect("a checkpoint given up is no error");
    // The span before it goes on through it, to the next block boundary; the ones before
    // are as they were.
    assert_eq!(joined.spans[..k - 1], honest.spans[..k - 1]);
    let through = &joined.spans[k - 1];
    assert_eq!(through.start, honest.spans[k - 1].start);
    // Past where the checkpoint was (its start was inflated for a window's length before
    // it was given up), to where the next span starts at a block boundary.
    assert!(
        through.len > honest.spans[k - 1].len + WINDOW as u64,
        "{} bytes, against {}",
        through.len,
        honest.spans[k - 1].len
    );
    assert_eq!(joined.spans[k].start.head, None);
    assert_ne!(joined.spans[k].start, honest.spans[k].start);
    assert_eq!(
        joined.spans.iter().map(|s| s.len).sum::<u64>(),
        honest.spans.iter().map(|s| s.len).sum::<u64>()
    );
    // Every span, the joined one included, inflates to its bytes and matches its digest.
    check_every_span(&layer, &joined, &tar);
}

#[test]
fn every_span_of_a_gnu_gzip_layer_inflates_on_its_own() {
    let (tar, files) = layer_tar();
    let layer = gnu_gzip(&tar);
    let index = build(&layer, MIN_SPAN);
    assert!(index.spans.len() > 20, "{} spans", index.spans.len());
    check_every_span(&layer, &index, &tar);
    check_entries(&index, &tar, &files);
}

/// The share of the real windows' non-zero bytes that `index` keeps; each kept byte is the
/// real one (a window is the end of the real one with some bytes zeroed, never other bytes).
fn kept_window_share(index: &SpanIndex, whole: &[u8]) -> f64 {
    let (mut kept, mut real) = (0usize, 0usize);
    for span in &index.spans {
        let at = span.start.uncompressed as usize;
        if span.start.member {
            continue;
        }
        let window = span.start.window.bytes().expect("a window");
        let truth = &whole[at.saturating_sub(WINDOW)..at];
        real += truth.iter().filter(|&&b| b != 0).count();
        let tail = &truth[truth.len() - window.len()..];
        for (&got, &want) in window.iter().zip(tail) {
            assert!(
                got == want || got == 0,
                "a window byte is neither the real one nor 0"
            );
            kept += usize::from(want != 0 && got == want);
        }
    }
    kept as f64 / real.max(1) as f64
}

#[test]
fn windows_keep_only_the_bytes_their_spans_refer_to() {
    let (tar, _) = layer_tar();
    for (layer, name) in [(gzip(&tar, 6), "flate2"), (gnu_gzip(&tar), "GNU gzip")] {
        let index = build(&layer, MIN_SPAN);
        let share = kept_window_share(&index, &tar);
        assert!(
            share < 0.8,
            "{name}: {:.0} % of the window bytes kept",
            share * 100.0
        );
        // In memory, deflated: a fraction of 32 KiB a span.
        let held: usize = index.spans.iter().map(|s| s.start.window.held()).sum();
        let whole = index.spans.iter().filter(|s| !s.start.member).count() * WINDOW;
        eprintln!(
            "{name}: {:.1} % kept, {held} of {whole} held",
            share * 100.0
        );
        assert!(
            held * 10 < whole * 7,
            "{name}: windows hold {held} bytes of {whole}"
        );
        // And with what is left, every span still inflates to its own bytes.
        check_every_span(&layer, &index, &tar);
    }
}

#[test]
fn spans_cross_member_boundaries_and_zero_padding_ends_the_layer() {
    let (tar, files) = layer_tar();
    // Three members cut at arbitrary points, then zeros as some tools pad.
    let cuts = [0, 1_000_003, 1_500_001, tar.len()];
    let mut layer = Vec::new();
    for w in cuts.windows(2) {
        layer.extend(gzip(&tar[w[0]..w[1]], 1));
    }
    layer.extend([0u8; 1000]);
    let index = build(&layer, 3 * MIN_SPAN);
    let crossing = index
        .spans
        .iter()
        .filter(|s| {
            cuts[1..3].iter().any(|&cut| {
                s.start.uncompressed < cut as u64 && (cut as u64) < s.start.uncompressed + s.len
            })
        })
        .count();
    assert!(crossing >= 1, "no span goes on into the next member");
    check_every_span(&layer, &index, &tar);
    check_entries(&index, &tar, &files);
}

#[test]
fn stored_and_level_9_blocks_index_alike() {
    let (tar, _) = layer_tar();
    for level in [0, 9] {
        let layer = gzip(&tar, level);
        let index = build(&layer, MIN_SPAN);
        check_every_span(&layer, &index, &tar);
    }
}

#[test]
fn a_changed_byte_is_an_error_never_other_bytes() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let index = build(&layer, MIN_SPAN);
    let mut refused = 0;
    for i in (0..index.spans.len()).step_by(3) {
        let range = index.span_range(i).expect("a span");
        let mut bytes = layer[range.start as usize..range.end as usize].to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        assert!(
            index.inflate_span(i, &bytes).is_err(),
            "span {i} with a changed byte was served"
        );
        refused += 1;
        let short = &layer[range.start as usize..range.end as usize - 1];
        assert!(matches!(
            index.inflate_span(i, short),
            Err(GzipError::SpanBytes { .. })
        ));
    }
    assert!(refused > 5);
    assert!(matches!(
        index.inflate_span(index.spans.len(), &[]),
        Err(GzipError::NoSpan { .. })
    ));
}

#[test]
fn the_spans_for_a_range_are_those_that_hold_its_bytes() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let index = build(&layer, MIN_SPAN);
    let s = &index.spans;
    let end = index.uncompressed_size;
    assert_eq!(index.spans_for(0..1), 0..1);
    assert_eq!(index.spans_for(0..end), 0..s.len());
    assert_eq!(index.spans_for(end..end + 10), 0..0);
    assert_eq!(index.spans_for(5..5), 0..0);
    let second = s[1].start.uncompressed;
    assert_eq!(index.spans_for(second - 1..second + 1), 0..2);
    assert_eq!(index.spans_for(second..second + 1), 1..2);
    assert_eq!(index.spans_for(end - 1..end + 100), s.len() - 1..s.len());
}

#[test]
fn broken_layers_get_errors_that_say_where() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let err = |bytes: &[u8]| SpanIndex::build(bytes, BuildOptions::default()).expect_err("refused");
    assert!(matches!(
        err(&layer[..layer.len() / 2]),
        GzipError::Truncated { .. }
    ));
    assert!(matches!(err(&layer[..5]), GzipError::Truncated { .. }));
    assert!(matches!(
        err(b"not gzip at all"),
        GzipError::BadHeader { .. }
    ));
    let mut bad_crc = layer.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 1;
    assert!(matches!(
        err(&bad_crc),
        GzipError::Trailer { what: "CRC-32", .. }
    ));
    let mut garbage = layer.clone();
    garbage.extend([0, 0, 7]);
    assert!(matches!(err(&garbage), GzipError::TrailingGarbage { .. }));
    let mut reserved = layer.clone();
    reserved[3] = 0x80;
    assert!(matches!(err(&reserved), GzipError::BadHeader { .. }));
    // A file name that never ends is refused, not buffered without bound.
    let mut endless = vec![0x1f, 0x8b, 8, 8, 0, 0, 0, 0, 0, 3];
    endless.resize(1 << 20, b'a');
    assert!(matches!(err(&endless), GzipError::BadHeader { .. }));
    // Not a tar inside.
    assert!(matches!(err(&gzip(&[7u8; 4096], 6)), GzipError::Tar(_)));
    for span in [0, MIN_SPAN - 1, MAX_SPAN + 1] {
        assert!(matches!(
            SpanIndex::build(layer.as_slice(), BuildOptions { span }),
            Err(GzipError::SpanSize(_))
        ));
    }
}

/// The uncompressed form of an encoded index, and back.
fn unpack(encoded: &[u8]) -> Vec<u8> {
    plain(encoded)
}

fn pack(raw: &[u8]) -> Vec<u8> {
    gzip(raw, 1)
}

#[test]
fn an_index_reads_back_as_it_was_written_and_costs_little() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let mut index = build(&layer, MIN_SPAN);
    index.entries[1]
        .header
        .xattrs
        .insert("user.note".into(), b"\x00\xff".to_vec());
    let encoded = index.encode().expect("an index encodes");
    let back = SpanIndex::decode(&encoded).expect("it decodes");
    assert_eq!(back, index);
    // 64 KiB spans are the smallest allowed; at the default span the index is a sliver.
    let default = build(&layer, BuildOptions::default().span)
        .encode()
        .expect("an index encodes");
    assert!(
        default.len() * 100 < layer.len() * 3,
        "{} bytes of index for a {}-byte layer",
        default.len(),
        layer.len()
    );
}

#[test]
fn an_index_with_its_windows_apart_reads_back_without_them_and_inflates_with_them() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let whole = plain(&layer);
    let index = build(&layer, MIN_SPAN);
    let (core, windows) = index.encode_apart().expect("an index encodes");
    let held = index.encode().expect("an index encodes");
    assert!(
        core.len() < held.len(),
        "{} bytes apart, {} held",
        core.len(),
        held.len()
    );
    let back = SpanIndex::decode(&core).expect("it decodes");
    let blob = back.windows.expect("windows apart");
    assert_eq!(
        (blob.digest, blob.size),
        (
            crate::oci::digest::Digest::of(&windows),
            windows.len() as u64
        )
    );
    assert_eq!(back.entries, index.entries);
    let mut apart = 0;
    for (i, span) in back.spans.iter().enumerate() {
        assert_eq!(span.start.window.len(), index.spans[i].start.window.len());
        let range = back.span_range(i).expect("a span");
        let bytes = &layer[range.start as usize..range.end as usize];
        let want = &whole[span.start.uncompressed as usize..][..span.len as usize];
        let Some(place) = span.start.window.place() else {
            // A member's start, or a span that refers to nothing before it.
            assert!(span.start.window.is_empty());
            continue;
        };
        apart += 1;
        assert!(
            back.inflate_span(i, bytes).is_err(),
            "span {i} inflates without its window"
        );
        let deflated = &windows[place.range.0 as usize..place.range.1 as usize];
        let got = inflate_span(
            &span.start,
            SpanWindow::Fetched(deflated),
            span.len,
            &span.digest,
            bytes,
        )
        .expect("the span inflates with its window");
        assert!(got == want, "span {i} differs");
    }
    assert!(apart > 0, "some windows are kept apart");
    // The fuzz seed of this form is one.
    let seed = include_bytes!("../../../fuzz/seeds/gzip_index/seed-two-spans-apart.idx");
    let seed = SpanIndex::decode(seed).expect("the seed decodes");
    assert!(seed.windows.is_some() && seed.spans.iter().any(|s| s.start.window.place().is_some()));
    // A window of bytes that do not compress (deflate's fast codes make them longer) reads
    // back all the same.
    let mut noisy = index.clone();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..WINDOW)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    noisy.spans[1].start.window = Window::new(&noise);
    let (core_noisy, windows_noisy) = noisy.encode_apart().expect("an index encodes");
    let back = SpanIndex::decode(&core_noisy).expect("a window of noise reads back");
    let place = back.spans[1].start.window.place().expect("apart");
    let deflated = &windows_noisy[place.range.0 as usize..place.range.1 as usize];
    assert!(
        back.spans[1]
            .start
            .window
            .bytes_from(deflated)
            .expect("it inflates")
            == noise
    );
    // A window said to lie past the end of its blob is refused.
    let mut raw = unpack(&core);
    let size_at = 21 + 4 + 32 + 16 + 32;
    raw[size_at..size_at + 8].copy_from_slice(&1u64.to_le_bytes());
    assert!(matches!(
        SpanIndex::decode(&pack(&raw)),
        Err(FormatError::Invalid(_))
    ));
}

#[test]
fn hostile_encoded_indexes_are_refused_without_panic() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let raw = unpack(&build(&layer, MIN_SPAN).encode().expect("an index encodes"));
    // Truncations: every one in the header and the first span, then some 150 more.
    let step = raw.len() / 150;
    for cut in (0..300).chain((300..raw.len()).step_by(step)) {
        assert!(
            SpanIndex::decode(&pack(&raw[..cut])).is_err(),
            "cut at {cut}"
        );
    }
    // Single bytes changed anywhere: an error, or an index that still holds together.
    for at in (0..300).chain((300..raw.len()).step_by(step)) {
        let mut bad = raw.clone();
        bad[at] ^= 0x5a;
        if let Ok(index) = SpanIndex::decode(&pack(&bad)) {
            for i in 0..index.spans.len() {
                let r = index.span_range(i).expect("a span");
                assert!(r.start <= r.end && r.end <= index.compressed_size);
            }
        }
    }
    // Counts far beyond what the bytes hold allocate nothing.
    let spans_at = 21 + 4 + 32 + 16;
    let mut huge = raw.clone();
    huge[spans_at..spans_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        SpanIndex::decode(&pack(&huge)),
        Err(FormatError::Invalid(_))
    ));
    let mut version = raw.clone();
    version[21] = 9;
    assert!(matches!(
        SpanIndex::decode(&pack(&version)),
        Err(FormatError::Version(9))
    ));
    assert!(matches!(
        SpanIndex::decode(b"plain bytes"),
        Err(FormatError::Compression(_))
    ));
    assert!(matches!(
        SpanIndex::decode(&pack(b"x")),
        Err(FormatError::Magic)
    ));
    // A bomb: more than MAX_DECODED once inflated.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..=(MAX_DECODED >> 20) {
        gz.write_all(&zeros).expect("to memory");
    }
    let bomb = gz.finish().expect("to memory");
    assert!(matches!(
        SpanIndex::decode(&bomb),
        Err(FormatError::TooLarge)
    ));
}

fn cuts(index: &SpanIndex) -> Vec<Cut> {
    index
        .spans
        .iter()
        .map(|s| Cut {
            at: s.start.uncompressed,
            len: s.len,
            digest: s.digest,
        })
        .collect()
}

#[test]
fn a_layer_read_through_hands_out_each_span_once_it_matches_and_checks_the_whole() {
    let (tar, _) = layer_tar();
    let layer = gnu_gzip(&tar);
    let whole = plain(&layer);
    let index = build(&layer, MIN_SPAN);
    let digest = crate::oci::digest::Digest::of(&layer);
    // Every other span: the ones between are read past, not handed out.
    let wanted: Vec<Cut> = cuts(&index).into_iter().step_by(2).collect();
    assert!(wanted.len() > 2);
    let mut got = Vec::new();
    read_through(
        &layer[..],
        &wanted,
        &digest,
        layer.len() as u64,
        |cut, bytes| {
            assert!(bytes == whole[cut.at as usize..(cut.at + cut.len) as usize]);
            got.push(cut.at);
        },
    )
    .expect("the layer is what was indexed");
    assert_eq!(got, wanted.iter().map(|c| c.at).collect::<Vec<_>>());
}

#[test]
fn a_layer_that_is_not_what_was_indexed_is_an_error_and_its_bad_spans_are_never_handed_out() {
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let whole = plain(&layer);
    let index = build(&layer, MIN_SPAN);
    let all = cuts(&index);
    let digest = crate::oci::digest::Digest::of(&layer);
    let size = layer.len() as u64;
    let check = |layer: &[u8], cuts: &[Cut], digest, size| {
        let mut handed = 0;
        let result = read_through(layer, cuts, digest, size, |cut, bytes| {
            assert!(
                bytes == whole[cut.at as usize..(cut.at + cut.len) as usize],
                "a span that differs was handed out"
            );
            handed += 1;
        });
        (result, handed)
    };

    // A byte changed in the middle of the layer: caught by a span digest, by inflation or
    // by the gzip trailer, whichever sees it first.
    let mut changed = layer.clone();
    let middle = changed.len() / 2;
    changed[middle] ^= 0x20;
    let (result, handed) = check(&changed, &all, &digest, size);
    assert!(result.is_err());
    assert!(handed < all.len());

    // The same layer with only its first span asked for: the change lies in a span no
    // reader wanted, and the layer digest still catches it.
    let (result, handed) = check(&changed, &all[..1], &digest, size);
    assert!(
        result.is_err(),
        "a changed byte past the cuts went unnoticed"
    );
    assert!(handed <= 1);

    // A valid layer whose digest is not the descriptor's (another layer, or an index built
    // for other bytes): nothing inflates wrong, and the digest says so.
    let other = crate::oci::digest::Digest::of(b"another layer");
    let (result, _) = check(&layer, &all, &other, size);
    assert!(matches!(result, Err(GzipError::LayerDigest { .. })));
    let (result, _) = check(&layer, &all, &digest, size + 1);
    assert!(matches!(result, Err(GzipError::LayerDigest { .. })));

    // Cut short.
    let (result, _) = check(&layer[..layer.len() - 100], &all, &digest, size);
    assert!(matches!(
        result,
        Err(GzipError::Truncated { .. } | GzipError::SpanShort { .. })
    ));

    // Cuts out of order, or longer than a span may be, are refused before anything is read.
    let mut backwards = all.clone();
    backwards.swap(0, 1);
    assert!(check(&layer, &backwards, &digest, size).0.is_err());
    let huge = [Cut {
        at: 0,
        len: MAX_SPAN + 1,
        digest,
    }];
    assert!(matches!(
        check(&layer, &huge, &digest, size).0,
        Err(GzipError::SpanTooLong { .. })
    ));
}

#[test]
fn a_reader_that_fails_is_an_io_error_not_a_bad_layer() {
    struct Failing<'a>(&'a [u8]);
    impl Read for Failing<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::other("the registry went away"));
            }
            let n = out.len().min(self.0.len()).min(4096);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let (tar, _) = layer_tar();
    let layer = gzip(&tar, 6);
    let index = build(&layer, MIN_SPAN);
    let digest = crate::oci::digest::Digest::of(&layer);
    let half = Failing(&layer[..layer.len() / 2]);
    let result = read_through(half, &cuts(&index), &digest, layer.len() as u64, |_, _| {});
    assert!(matches!(result, Err(GzipError::Io(_))), "{result:?}");
}

/// Go's gzip writers (containers/image's, which podman and buildah push layers with; the
/// standard library's) flush what they compressed and end the stream with an empty final
/// block. A checkpoint at the end of the last data block then has nothing after it: it must
/// open no span (an empty span is not a valid index: a mount refused such a podman-pushed
/// layer's index and downloaded the layer whole), and an index that has one last, as this
/// builder wrote them before, reads back without it.
#[test]
fn a_stream_ending_in_empty_blocks_gets_no_empty_span() {
    let (tar, _) = layer_tar();
    for variant in 0..8u64 {
        let pad = variant as usize * 9000;
        let mut data = tar.clone();
        data.extend(crate::testing::bytes(variant, pad, true));
        let mut writer = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        for piece in data.chunks(100_000) {
            writer.write_all(piece).expect("to memory");
            writer.flush().expect("to memory");
        }
        let layer = writer.finish().expect("to memory");
        let index = build(&layer, MIN_SPAN);
        assert!(
            index.spans.iter().all(|s| s.len > 0),
            "variant {variant}: an empty span"
        );
        check_every_span(&layer, &index, &data);
        let encoded = index.encode().expect("an index encodes");
        assert_eq!(SpanIndex::decode(&encoded).expect("it decodes"), index);
        // An empty member after it (two gzip files, the second empty, one after the other).
        let mut two = layer.clone();
        two.extend(gzip(&[], 6));
        let of_two = build(&two, MIN_SPAN);
        assert!(of_two.spans.iter().all(|s| s.len > 0), "variant {variant}");
        check_every_span(&two, &of_two, &data);

        let mut with_empty = index.clone();
        let last = with_empty.spans.last().expect("spans").clone();
        with_empty.spans.push(Span {
            start: Checkpoint {
                compressed: last.start.compressed + 1,
                bits: 0,
                uncompressed: index.uncompressed_size,
                member: false,
                window: Window::default(),
                head: None,
            },
            len: 0,
            digest: last.digest,
        });
        let encoded = with_empty.encode().expect("an index encodes");
        assert_eq!(SpanIndex::decode(&encoded).expect("it decodes"), index);
        // Anywhere else an empty span is refused.
        let mut early = with_empty.clone();
        let empty = early.spans.pop().expect("the empty span");
        early.spans.insert(
            early.spans.len() - 1,
            Span {
                start: Checkpoint {
                    uncompressed: last.start.uncompressed,
                    compressed: last.start.compressed,
                    bits: last.start.bits,
                    ..empty.start
                },
                ..empty
            },
        );
        let encoded = early.encode().expect("an index encodes");
        assert!(SpanIndex::decode(&encoded).is_err());
    }
}
