//! The writer for the layers imgstream builds: ustar headers, with a PAX header whenever a
//! value does not fit.

use std::io::{self, Write};

use super::{BLOCK, Header, Kind};

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
        // The remainder form cannot overflow, whatever the size.
        ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
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

pub(super) fn ustar_block(h: &Header, flag: u8, (prefix, name): (&str, &str)) -> [u8; BLOCK] {
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
