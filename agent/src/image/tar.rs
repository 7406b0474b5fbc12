//! Tar headers: a streaming reader for untrusted layer tarballs and a writer for the layers
//! imgstream builds.
//!
//! The reader understands ustar (with the `prefix` field), GNU long names and link names
//! (`L`, `K`), PAX extended headers (`x`; global `g` ones are skipped) including
//! `SCHILY.xattr.*`, and base-256 numbers. Everything a header claims is bounded: metadata
//! records (long names, PAX) may not exceed [`MAX_META`], checksums are verified, and a
//! truncated archive is an error, never a hang or an allocation of the claimed size.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
};

/// Largest GNU long-name or PAX record the reader accepts.
pub const MAX_META: u64 = 1 << 20;
const BLOCK: usize = 512;

/// Errors reading a tar stream.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the tar stream")]
    Io(#[from] io::Error),
    #[error("tar header at byte {offset} has a bad checksum")]
    Checksum { offset: u64 },
    #[error("tar header at byte {offset}: field `{field}` is not a number")]
    Number { offset: u64, field: &'static str },
    #[error("tar stream ends inside an entry (at byte {offset})")]
    Truncated { offset: u64 },
    #[error(
        "tar metadata record of {size} bytes at byte {offset} exceeds the {MAX_META}-byte limit"
    )]
    MetaTooLarge { offset: u64, size: u64 },
    #[error("malformed PAX record at byte {offset}")]
    Pax { offset: u64 },
    #[error("tar entry type {kind:?} at byte {offset} is not supported")]
    UnsupportedType { offset: u64, kind: char },
    #[error("tar entry at byte {offset} has no name")]
    EmptyName { offset: u64 },
}

/// What a tar entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::Regular => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::CharDevice => b'3',
            Kind::BlockDevice => b'4',
            Kind::Directory => b'5',
            Kind::Fifo => b'6',
        }
    }
}

/// One entry's metadata, with long names and PAX overrides applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub kind: Kind,
    pub link_name: String,
    /// Permission bits including setuid, setgid and sticky (no file type bits).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub uname: String,
    pub gname: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Header {
    /// An empty header of `kind` named `name`.
    pub fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.to_string(),
            kind,
            link_name: String::new(),
            mode: if kind == Kind::Directory {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            uname: String::new(),
            gname: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
        }
    }
}

/// Reads entries one after the other from a tar stream.
pub struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Bytes of the current entry's data (plus padding) not yet consumed.
    pending: u64,
    pending_data: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            pending: 0,
            pending_data: 0,
            done: false,
        }
    }

    /// Bytes consumed from the underlying stream so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// The next entry's header, or `None` at the end of the archive. The entry's data is then
    /// read with [`Self::read_data`]; whatever is left of it is skipped by the next call.
    pub fn next_header(&mut self) -> Result<Option<Header>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_pending()?;
        let mut long_name: Option<String> = None;
        let mut long_link: Option<String> = None;
        let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        loop {
            let at = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                // EOF without end-of-archive blocks: accept only at an entry boundary.
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block, at)?;
            let size = number(&block[124..136], at, "size")?;
            let flag = block[156];
            match flag {
                b'L' | b'K' | b'x' | b'g' => {
                    if size > MAX_META {
                        return Err(TarError::MetaTooLarge { offset: at, size });
                    }
                    let data = self.read_exact_padded(size)?;
                    match flag {
                        b'L' => long_name = Some(c_str(&data)),
                        b'K' => long_link = Some(c_str(&data)),
                        b'x' => parse_pax(&data, at, &mut pax)?,
                        _ => {} // global PAX headers carry nothing imgstream needs
                    }
                    continue;
                }
                _ => {}
            }
            let kind = match flag {
                b'0' | 0 | b'7' => Kind::Regular,
                b'1' => Kind::HardLink,
                b'2' => Kind::Symlink,
                b'3' => Kind::CharDevice,
                b'4' => Kind::BlockDevice,
                b'5' => Kind::Directory,
                b'6' => Kind::Fifo,
                other => {
                    return Err(TarError::UnsupportedType {
                        offset: at,
                        kind: other as char,
                    });
                }
            };
            let mut header = Header {
                name: ustar_name(&block),
                kind,
                link_name: c_str(&block[157..257]),
                mode: (number(&block[100..108], at, "mode")? & 0o7777) as u32,
                uid: number(&block[108..116], at, "uid")?,
                gid: number(&block[116..124], at, "gid")?,
                size,
                mtime: number(&block[136..148], at, "mtime")? as i64,
                uname: c_str(&block[265..297]),
                gname: c_str(&block[297..329]),
                dev_major: number(&block[329..337], at, "devmajor").unwrap_or(0) as u32,
                dev_minor: number(&block[337..345], at, "devminor").unwrap_or(0) as u32,
                xattrs: BTreeMap::new(),
            };
            if let Some(name) = long_name.take() {
                header.name = name;
            }
            if let Some(link) = long_link.take() {
                header.link_name = link;
            }
            apply_pax(&mut header, pax, at)?;
            if header.name.is_empty() {
                return Err(TarError::EmptyName { offset: at });
            }
            // Only regular files carry data (a hard link's size field must be ignored).
            let data = if header.kind == Kind::Regular {
                header.size
            } else {
                0
            };
            header.size = data;
            self.pending_data = data;
            self.pending = padded(data);
            return Ok(Some(header));
        }
    }

    /// Reads from the current entry's data; 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if self.pending_data == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.pending_data as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(TarError::Truncated {
                offset: self.offset,
            });
        }
        self.offset += n as u64;
        self.pending -= n as u64;
        self.pending_data -= n as u64;
        Ok(n)
    }

    fn skip_pending(&mut self) -> Result<(), TarError> {
        let n = io::copy(&mut (&mut self.inner).take(self.pending), &mut io::sink())?;
        self.offset += n;
        if n < self.pending {
            return Err(TarError::Truncated {
                offset: self.offset,
            });
        }
        self.pending = 0;
        self.pending_data = 0;
        Ok(())
    }

    /// Reads one block; `false` on a clean EOF before its first byte.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < BLOCK {
            let n = self.inner.read(&mut block[filled..])?;
            if n == 0 {
                if filled == 0 {
                    return Ok(false);
                }
                return Err(TarError::Truncated {
                    offset: self.offset + filled as u64,
                });
            }
            filled += n;
        }
        self.offset += BLOCK as u64;
        Ok(true)
    }

    fn read_exact_padded(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        let mut data = vec![0u8; size as usize];
        self.inner
            .read_exact(&mut data)
            .map_err(|_| TarError::Truncated {
                offset: self.offset,
            })?;
        self.offset += size;
        let pad = padded(size) - size;
        let skipped = io::copy(&mut (&mut self.inner).take(pad), &mut io::sink())?;
        self.offset += skipped;
        if skipped < pad {
            return Err(TarError::Truncated {
                offset: self.offset,
            });
        }
        Ok(data)
    }
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
    let stored = number(&block[148..156], offset, "chksum")?;
    let unsigned: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as u64
            } else {
                b as u64
            }
        })
        .sum();
    // Some old writers summed signed chars.
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as i64
            } else {
                b as i8 as i64
            }
        })
        .sum();
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err(TarError::Checksum { offset })
    }
}

/// An octal ASCII number (NUL/space padded) or a base-256 one (high bit of the first byte).
fn number(field: &[u8], offset: u64, name: &'static str) -> Result<u64, TarError> {
    let bad = || TarError::Number {
        offset,
        field: name,
    };
    if field[0] & 0x80 != 0 {
        // Base-256, big-endian; reject negative and more than 64 bits of magnitude.
        if field[0] & 0x40 != 0 {
            return Err(bad());
        }
        let mut value: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            value = value.checked_mul(256).ok_or_else(bad)? | b as u64;
        }
        return Ok(value);
    }
    let text = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ');
    let mut value: u64 = 0;
    let mut digits = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad());
        }
        value = value.checked_mul(8).ok_or_else(bad)? + (b - b'0') as u64;
        digits += 1;
    }
    if digits == 0 && field.iter().any(|&b| b != 0 && b != b' ') {
        return Err(bad());
    }
    Ok(value)
}

fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn ustar_name(block: &[u8; BLOCK]) -> String {
    let name = c_str(&block[0..100]);
    let is_ustar = &block[257..262] == b"ustar";
    let prefix = if is_ustar {
        c_str(&block[345..500])
    } else {
        String::new()
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// PAX records: "<len> <key>=<value>\n", where len counts the whole record.
fn parse_pax(
    data: &[u8],
    offset: u64,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), TarError> {
    let bad = || TarError::Pax { offset };
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let key = String::from_utf8_lossy(&record[..eq]).into_owned();
        out.insert(key, record[eq + 1..].to_vec());
        rest = &rest[len..];
    }
    Ok(())
}

fn apply_pax(h: &mut Header, pax: BTreeMap<String, Vec<u8>>, offset: u64) -> Result<(), TarError> {
    let num = |v: &[u8], field| -> Result<u64, TarError> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(TarError::Number { offset, field })
    };
    for (key, value) in pax {
        let text = || String::from_utf8_lossy(&value).into_owned();
        match key.as_str() {
            "path" => h.name = text(),
            "linkpath" => h.link_name = text(),
            "size" => h.size = num(&value, "size")?,
            "uid" => h.uid = num(&value, "uid")?,
            "gid" => h.gid = num(&value, "gid")?,
            "uname" => h.uname = text(),
            "gname" => h.gname = text(),
            "mtime" => {
                // Seconds with an optional fraction.
                let t = text();
                let secs = t.split('.').next().unwrap_or("");
                h.mtime = secs.parse().map_err(|_| TarError::Number {
                    offset,
                    field: "mtime",
                })?;
            }
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    h.xattrs.insert(name.to_string(), value);
                }
            }
        }
    }
    Ok(())
}

/// Writes tar headers, adding a PAX header whenever a value does not fit ustar.
pub struct TarWriter;

impl TarWriter {
    /// The bytes of `header` (PAX extension included when needed), to be followed by
    /// `header.size` bytes of data and [`Self::padding`].
    pub fn header_bytes(header: &Header) -> Vec<u8> {
        let mut pax = Vec::new();
        let mut add = |key: &str, value: &[u8]| {
            // The length prefix counts itself: iterate until it is stable.
            let body = key.len() + value.len() + 3;
            let mut len = body + body.to_string().len();
            if len.to_string().len() + body != len {
                len = body + len.to_string().len();
            }
            pax.extend_from_slice(format!("{len} {key}=").as_bytes());
            pax.extend_from_slice(value);
            pax.push(b'\n');
        };
        let (prefix, name) = split_ustar_name(&header.name);
        if name.is_none() {
            add("path", header.name.as_bytes());
        }
        if header.link_name.len() > 100 {
            add("linkpath", header.link_name.as_bytes());
        }
        const OCTAL_MAX: u64 = 0o7777_7777;
        if header.uid > OCTAL_MAX {
            add("uid", header.uid.to_string().as_bytes());
        }
        if header.gid > OCTAL_MAX {
            add("gid", header.gid.to_string().as_bytes());
        }
        if header.size > 0o7777_7777_7777 {
            add("size", header.size.to_string().as_bytes());
        }
        if header.uname.len() > 31 {
            add("uname", header.uname.as_bytes());
        }
        if header.gname.len() > 31 {
            add("gname", header.gname.as_bytes());
        }
        for (key, value) in &header.xattrs {
            add(&format!("SCHILY.xattr.{key}"), value);
        }
        let mut out = Vec::new();
        if !pax.is_empty() {
            let mut x = Header::new("PaxHeaders/entry", Kind::Regular);
            x.size = pax.len() as u64;
            out.extend_from_slice(&ustar_block(&x, b'x', ("", "PaxHeaders/entry")));
            out.extend_from_slice(&pax);
            out.resize(out.len() + Self::padding(pax.len() as u64), 0);
        }
        let short = match name {
            Some(name) => (prefix, name),
            None => ("", truncate(&header.name, 100)),
        };
        out.extend_from_slice(&ustar_block(header, header.kind.flag(), short));
        out
    }

    /// Zero bytes after `size` bytes of data to reach a block boundary.
    pub fn padding(size: u64) -> usize {
        (padded(size) - size) as usize
    }

    /// The end-of-archive marker: two zero blocks.
    pub fn end_of_archive() -> [u8; 2 * BLOCK] {
        [0; 2 * BLOCK]
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Splits a name into ustar (prefix, name) if it fits: name ≤ 100 bytes, prefix ≤ 155.
fn split_ustar_name(full: &str) -> (&str, Option<&str>) {
    if full.len() <= 100 {
        return ("", Some(full));
    }
    for (i, _) in full.match_indices('/') {
        let (prefix, name) = (&full[..i], &full[i + 1..]);
        if prefix.len() <= 155 && name.len() <= 100 && !name.is_empty() {
            return (prefix, Some(name));
        }
    }
    ("", None)
}

fn ustar_block(h: &Header, flag: u8, (prefix, name): (&str, &str)) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let put = |b: &mut [u8; BLOCK], at: usize, len: usize, s: &[u8]| {
        let n = s.len().min(len);
        b[at..at + n].copy_from_slice(&s[..n]);
    };
    let octal = |b: &mut [u8; BLOCK], at: usize, len: usize, v: u64| {
        let digits = len - 1;
        let max = if digits >= 22 {
            u64::MAX
        } else {
            (1u64 << (3 * digits)) - 1
        };
        let s = format!("{:0width$o}", v.min(max), width = digits);
        put(b, at, len, s.as_bytes());
    };
    put(&mut b, 0, 100, name.as_bytes());
    octal(&mut b, 100, 8, h.mode as u64);
    octal(&mut b, 108, 8, h.uid);
    octal(&mut b, 116, 8, h.gid);
    octal(&mut b, 124, 12, h.size);
    octal(&mut b, 136, 12, h.mtime.max(0) as u64);
    b[156] = flag;
    put(&mut b, 157, 100, truncate(&h.link_name, 100).as_bytes());
    put(&mut b, 257, 8, b"ustar\x0000");
    put(&mut b, 265, 32, truncate(&h.uname, 31).as_bytes());
    put(&mut b, 297, 32, truncate(&h.gname, 31).as_bytes());
    octal(&mut b, 329, 8, h.dev_major as u64);
    octal(&mut b, 337, 8, h.dev_minor as u64);
    put(&mut b, 345, 155, prefix.as_bytes());
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|&x| x as u64).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

/// Writes one whole entry (header, data, padding) to `out`.
pub fn write_entry(out: &mut impl Write, header: &Header, data: &[u8]) -> io::Result<()> {
    out.write_all(&TarWriter::header_bytes(header))?;
    out.write_all(data)?;
    out.write_all(&vec![0; TarWriter::padding(data.len() as u64)])
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
