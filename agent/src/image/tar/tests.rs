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
        let out = std::process::Command::new("tar")
            .args([&format!("--format={format}"), "-cf"])
            .arg(&tarball)
            .args(["-C", src.to_str().unwrap(), "."])
            .output()
            .unwrap();
        if format == "ustar" {
            // ustar cannot hold the 200-byte link target: tar refuses, that is fine.
            continue;
        }
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entries = read_all(&std::fs::read(&tarball).unwrap()).unwrap();
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
