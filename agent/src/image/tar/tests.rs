//! The tar reader and writer against each other, against GNU tar, and against hostile
//! headers.

use super::{
    reader::{number, parse_pax},
    writer::ustar_block,
    *,
};

fn read_all(bytes: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, TarError> {
    let mut r = TarReader::new(bytes);
    let mut out = Vec::new();
    while let Some(h) = r.next_header()? {
        let mut data = Vec::new();
        let mut buf = [0u8; 300];
        loop {
            let n = r.read_data(&mut buf)?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        out.push((h, data));
    }
    Ok(out)
}

fn sample() -> Vec<(Header, Vec<u8>)> {
    let mut dir = Header::new("usr/", Kind::Directory);
    dir.mode = 0o1777;
    let mut file = Header::new("usr/bin/tool", Kind::Regular);
    file.mode = 0o4755;
    file.uid = 1000;
    file.gid = 100;
    file.mtime = 1_700_000_000;
    file.size = 700;
    file.xattrs.insert(
        "security.capability".into(),
        vec![1, 0, 0, 2, 0x20, 0, 0, 0],
    );
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
    let mut long_file = Header::new(&long, Kind::Regular);
    long_file.size = 3;
    let mut link = Header::new("usr/bin/link", Kind::Symlink);
    link.link_name = "x".repeat(150);
    let mut hard = Header::new("usr/bin/hard", Kind::HardLink);
    hard.link_name = "usr/bin/tool".into();
    let mut dev = Header::new("dev/null", Kind::CharDevice);
    dev.dev_major = 1;
    dev.dev_minor = 3;
    let data = |h: &Header| (0..h.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
    [
        dir,
        file,
        long_file,
        link,
        hard,
        dev,
        Header::new("fifo", Kind::Fifo),
    ]
    .into_iter()
    .map(|h| {
        let d = data(&h);
        (h, d)
    })
    .collect()
}

fn archive(entries: &[(Header, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, d) in entries {
        write_entry(&mut out, h, d).unwrap();
    }
    out.extend_from_slice(&TarWriter::end_of_archive());
    out
}

#[test]
fn writer_and_reader_round_trip_every_kind() {
    let entries = sample();
    assert_eq!(read_all(&archive(&entries)).unwrap(), entries);
}

#[test]
fn gnu_tar_agrees_with_the_writer() {
    let entries = sample();
    let dir = std::env::temp_dir().join(format!("imgstream-tar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.tar");
    std::fs::write(&path, archive(&entries)).unwrap();
    let out = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&path)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listing.contains("-rwsr-xr-x 1000/100"), "{listing}");
    assert!(listing.contains(&"f".repeat(120)), "{listing}");
    assert!(
        listing.contains(&format!("-> {}", "x".repeat(150))),
        "{listing}"
    );
    assert!(
        listing.contains("usr/bin/hard link to usr/bin/tool"),
        "{listing}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// GNU tar's archive of `names` in `src`, written to `tarball` with `--format=format` and
/// `flags`, or what tar said when it refused.
fn gnu_tar(
    tarball: &std::path::Path,
    src: &std::path::Path,
    (format, flags): (&str, &[&str]),
    names: &[&str],
) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new("tar")
        .arg(format!("--format={format}"))
        .args(flags)
        .arg("-cf")
        .arg(tarball)
        .arg("-C")
        .arg(src)
        .args(names)
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(std::fs::read(tarball).unwrap()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

#[test]
fn reads_what_gnu_tar_writes() {
    let dir = std::env::temp_dir().join(format!("imgstream-gnutar-{}", std::process::id()));
    let src = dir.join("src");
    let deep = src.join("a".repeat(90)).join("b".repeat(90));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("c".repeat(90)), b"deep").unwrap();
    std::os::unix::fs::symlink("c".repeat(200), src.join("s")).unwrap();
    for format in ["gnu", "pax", "ustar"] {
        let tarball = dir.join(format!("{format}.tar"));
        let written = gnu_tar(&tarball, &src, (format, &[]), &["."]);
        if format == "ustar" {
            // ustar cannot hold the 200-byte link target: tar refuses, that is fine.
            assert!(written.is_err());
            continue;
        }
        let entries = read_all(&written.unwrap()).unwrap();
        let file = entries
            .iter()
            .find(|(h, _)| h.name.ends_with(&"c".repeat(90)))
            .unwrap();
        assert_eq!(file.1, b"deep", "{format}");
        let link = entries
            .iter()
            .find(|(h, _)| h.name.ends_with("/s"))
            .unwrap();
        assert_eq!(link.0.link_name, "c".repeat(200), "{format}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn hostile_headers_are_errors() {
    let good = archive(&sample());
    // Flip a byte in the first header: checksum error.
    let mut bad = good.clone();
    bad[10] ^= 1;
    assert!(matches!(
        read_all(&bad),
        Err(TarError::Checksum { offset: 0 })
    ));
    // Truncated in the middle of data.
    assert!(matches!(
        read_all(&good[..1200]),
        Err(TarError::Truncated { .. })
    ));
    // A GNU long name claiming a huge size.
    let mut h = Header::new("././@LongLink", Kind::Regular);
    h.size = MAX_META + 1;
    let mut block = ustar_block(&h, b'L', ("", "././@LongLink"));
    block[148..156].copy_from_slice(b"        ");
    let sum: u64 = block.iter().map(|&x| x as u64).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    assert!(matches!(
        read_all(&block),
        Err(TarError::MetaTooLarge { .. })
    ));
    // Garbage in a numeric field.
    let mut h = Header::new("x", Kind::Regular);
    h.size = 1;
    let mut block = ustar_block(&h, b'0', ("", "x"));
    block[124..136].copy_from_slice(b"99999999999\0");
    block[148..156].copy_from_slice(b"        ");
    let sum: u64 = block.iter().map(|&x| x as u64).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    assert!(matches!(
        read_all(&block),
        Err(TarError::Number { field: "size", .. })
    ));
}

#[test]
fn malformed_pax_records_are_errors() {
    let mut out = BTreeMap::new();
    for bad in [
        &b"5 a=b"[..],
        b"x path=y\n",
        b"100 path=y\n",
        b"3 a\n",
        b"6 path\n",
    ] {
        assert!(
            parse_pax(bad, 0, &mut out).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    parse_pax(b"11 path=ab\n", 0, &mut out).unwrap();
    assert_eq!(out["path"], b"ab");
}

#[test]
fn base256_numbers() {
    let mut field = [0u8; 12];
    field[0] = 0x80;
    field[11] = 5;
    field[10] = 1;
    assert_eq!(number(&field, 0, "size").unwrap(), 261);
    field[0] = 0xff; // negative
    assert!(number(&field, 0, "size").is_err());
}

#[test]
fn a_size_field_near_the_limit_of_u64_is_an_error_not_an_overflow() {
    let mut h = Header::new("huge", Kind::Regular);
    h.size = u64::MAX - 1;
    let mut bytes = TarWriter::header_bytes(&h);
    bytes.extend_from_slice(&[0u8; 2048]);
    let err = TarReader::new(bytes.as_slice())
        .next_header()
        .expect_err("no stream holds that many bytes");
    assert!(matches!(err, TarError::SizeOverflow { .. }), "{err}");
    assert_eq!(TarWriter::padding(u64::MAX), 1);
    assert_eq!(TarWriter::padding(1024), 0);
}

#[test]
fn pax_records_are_bounded_together_not_only_each() {
    // Three PAX headers for one entry, each under the limit, together over it.
    let record = |n: usize| {
        let value = "v".repeat(n);
        let body = format!("{} comment={value}\n", 0);
        // The length prefix counts itself: fix it up.
        let len = body.len() - 1 + format!("{}", body.len()).len();
        format!("{len} comment={value}\n").into_bytes()
    };
    let mut bytes = Vec::new();
    for _ in 0..3 {
        let data = record((MAX_META / 2) as usize);
        let mut h = Header::new("pax", Kind::Regular);
        h.size = data.len() as u64;
        bytes.extend_from_slice(&ustar_block(&h, b'x', ("", "pax")));
        bytes.extend_from_slice(&data);
        bytes.resize(bytes.len() + TarWriter::padding(data.len() as u64), 0);
    }
    let err = TarReader::new(bytes.as_slice()).next_header().unwrap_err();
    assert!(matches!(err, TarError::MetaTooLarge { .. }), "{err}");
}

/// A sparse file as GNU tar sees one: holes at its start, in its middle and at its end.
fn write_sparse_file(path: &std::path::Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let size = 3 << 20;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut want = vec![0u8; size as usize];
    for (at, text) in [(100_000u64, &b"first"[..]), (1 << 20, &[7u8; 10_000][..])] {
        file.write_all_at(text, at).unwrap();
        want[at as usize..at as usize + text.len()].copy_from_slice(text);
    }
    want
}

#[test]
fn sparse_files_read_whole_in_every_format_gnu_tar_writes() {
    let dir = std::env::temp_dir().join(format!("imgstream-sparse-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let sparse = write_sparse_file(&src.join("disk.img"));
    std::fs::write(src.join("after"), b"the entry after").unwrap();
    for (format, version) in [
        ("gnu", None),
        ("posix", Some("0.0")),
        ("posix", Some("0.1")),
        ("posix", Some("1.0")),
        ("posix", None),
    ] {
        let tarball = dir.join(format!("{format}-{version:?}.tar"));
        let version = version.map(|v| format!("--sparse-version={v}"));
        let flags: Vec<&str> = ["--sparse"].into_iter().chain(version.as_deref()).collect();
        let bytes = gnu_tar(&tarball, &src, (format, &flags), &["disk.img", "after"]).unwrap();
        // GNU tar found the holes: the tarball holds the data only.
        assert!(
            bytes.len() < 64 << 10,
            "{format} {version:?}: {} bytes",
            bytes.len()
        );
        let entries = read_all(&bytes).unwrap();
        let names: Vec<_> = entries.iter().map(|(h, _)| h.name.as_str()).collect();
        assert_eq!(names, ["disk.img", "after"], "{format} {version:?}");
        assert_eq!(entries[0].0.size, sparse.len() as u64);
        assert!(
            entries[0].1 == sparse,
            "{format} {version:?}: the file differs"
        );
        assert_eq!(entries[1].1, b"the entry after");
        let mut reader = TarReader::new(bytes.as_slice());
        assert!(reader.next_header().unwrap().is_some());
        assert!(reader.is_sparse(), "{format} {version:?}");
        assert!(reader.next_header().unwrap().is_some());
        assert!(!reader.is_sparse());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A PAX header with `records`, then a regular file `name` of `data`.
fn pax_entry(records: &[(&str, &str)], name: &str, data: &[u8]) -> Vec<u8> {
    let mut pax = Vec::new();
    for (key, value) in records {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        if format!("{len}").len() + body.len() != len {
            len += 1;
        }
        pax.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    let mut bytes = Vec::new();
    let mut h = Header::new("pax", Kind::Regular);
    h.size = pax.len() as u64;
    bytes.extend_from_slice(&ustar_block(&h, b'x', ("", "pax")));
    bytes.extend_from_slice(&pax);
    bytes.resize(bytes.len() + TarWriter::padding(pax.len() as u64), 0);
    let mut h = Header::new(name, Kind::Regular);
    h.size = data.len() as u64;
    bytes.extend_from_slice(&ustar_block(&h, b'0', ("", name)));
    bytes.extend_from_slice(data);
    bytes.resize(bytes.len() + TarWriter::padding(data.len() as u64), 0);
    bytes.extend_from_slice(&TarWriter::end_of_archive());
    bytes
}

#[test]
fn hostile_sparse_maps_are_errors() {
    let v01 = |map: &str, size: &str| {
        pax_entry(
            &[
                ("GNU.sparse.major", "0"),
                ("GNU.sparse.minor", "1"),
                ("GNU.sparse.name", "f"),
                ("GNU.sparse.size", size),
                ("GNU.sparse.map", map),
            ],
            "GNUSparseFile.1/f",
            b"abcdef",
        )
    };
    // A good one first: 6 bytes of data at 10 and 100 of a 200-byte file.
    let good = read_all(&v01("10,3,100,3", "200")).unwrap();
    let mut want = vec![0u8; 200];
    want[10..13].copy_from_slice(b"abc");
    want[100..103].copy_from_slice(b"def");
    assert_eq!((good[0].0.name.as_str(), &good[0].1), ("f", &want));
    for (map, size, why) in [
        ("100,3,10,3", "200", "overlap or are out of order"),
        ("10,5,12,1", "200", "overlap or are out of order"),
        ("10,3,199,3", "200", "past the file's size"),
        ("10,3,18446744073709551615,3", "200", "past the file's size"),
        ("10,3,100,2", "200", "do not add up"),
        ("10,3,100", "200", "offset without a length"),
        ("10,x", "200", "not numbers"),
    ] {
        let err = read_all(&v01(map, size)).unwrap_err();
        assert!(
            matches!(&err, TarError::Sparse { .. }) && err.to_string().contains(why),
            "{map}: {err}"
        );
    }
    // Holes cost the stream nothing: their total is bounded.
    let huge = (MAX_HOLES + 7).to_string();
    let err = read_all(&v01("0,6", &huge)).unwrap_err();
    assert!(matches!(err, TarError::TooManyHoles { .. }), "{err}");
    // Versions GNU tar never wrote, and a 1.0 map longer than the data holding it.
    let v = |major, minor| {
        pax_entry(
            &[
                ("GNU.sparse.major", major),
                ("GNU.sparse.minor", minor),
                ("GNU.sparse.realsize", "100"),
            ],
            "f",
            b"2\n0\n",
        )
    };
    let err = read_all(&v("2", "0")).unwrap_err();
    assert!(err.to_string().contains("other than"), "{err}");
    let err = read_all(&v("1", "0")).unwrap_err();
    assert!(err.to_string().contains("runs past its data"), "{err}");
    // A map claiming more stretches than are read.
    let count = format!("{}\n", MAX_STRETCHES + 1);
    let data = [count.as_bytes(), &[0u8; 1024][..]].concat();
    let bytes = pax_entry(
        &[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.realsize", "100"),
        ],
        "f",
        &data,
    );
    let err = read_all(&bytes).unwrap_err();
    assert!(err.to_string().contains("more stretches"), "{err}");
}

/// A name that is not UTF-8 (a file made on a Latin-1 system) is an error naming it, not a
/// name with its bytes replaced, which would show the file under another name; a long
/// UTF-8 name whose ustar field GNU tar cut inside a character is fine.
#[test]
fn names_that_are_not_utf8_are_errors_and_cut_ustar_fields_are_not() {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::env::temp_dir().join(format!("imgstream-names-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let long = "é".repeat(80);
    std::fs::write(src.join(&long), b"long").unwrap();
    for (format, latin1) in [
        ("gnu", false),
        ("posix", false),
        ("gnu", true),
        ("posix", true),
    ] {
        if latin1 {
            std::fs::write(src.join(std::ffi::OsStr::from_bytes(b"caf\xe9")), b"x").unwrap();
        }
        let tarball = dir.join(format!("{format}-{latin1}.tar"));
        let read = read_all(&gnu_tar(&tarball, &src, (format, &[]), &["."]).unwrap());
        match (latin1, read) {
            (false, Ok(entries)) => {
                let file = entries.iter().find(|(h, _)| h.name.ends_with(&long));
                assert_eq!(file.map(|f| &f.1[..]), Some(&b"long"[..]), "{format}");
            }
            (true, Err(TarError::NotUtf8 { what: "name", .. })) => {}
            (_, other) => panic!("{format} {latin1}: {:?}", other.map(|e| e.len())),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A sparse file's real name (its `GNU.sparse.name` record; the header holds a placeholder)
/// is held to the same rule as every other name: not UTF-8, the entry is refused for its
/// name, as a plain file's would be.
#[test]
fn a_sparse_files_real_name_that_is_not_utf8_is_refused_as_a_name() {
    let dir = std::env::temp_dir().join(format!("imgstream-sparse-name-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_sparse_file(&src.join("cafe.img"));
    for version in ["0.1", "1.0"] {
        let tarball = dir.join(format!("{version}.tar"));
        let flags = ["--sparse", &format!("--sparse-version={version}")];
        let mut bytes = gnu_tar(&tarball, &src, ("posix", &flags), &["cafe.img"]).unwrap();
        assert_eq!(read_all(&bytes).unwrap()[0].0.name, "cafe.img", "{version}");
        // The record's value made Latin-1 (same length: PAX records carry no checksum).
        let record = b"GNU.sparse.name=cafe.img";
        let at = bytes
            .windows(record.len())
            .position(|w| w == record)
            .unwrap_or_else(|| panic!("{version}: no GNU.sparse.name record"));
        bytes[at + record.len() - 5] = 0xe9;
        match read_all(&bytes) {
            Err(TarError::NotUtf8 { what: "name", .. }) => {}
            other => panic!("{version}: {:?}", other.map(|e| e.len())),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
