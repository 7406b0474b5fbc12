//! The streaming reader for untrusted tarballs: headers checked and bounded, data handed
//! out as read, truncation an error.

use std::{
    collections::BTreeMap,
    io::{self, Read},
};

use super::{BLOCK, Header, Kind, MAX_META, TarError, padded};

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

    /// The underlying stream, wherever the reader left it.
    pub fn into_inner(self) -> R {
        self.inner
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
        // Metadata records read for this entry so far: bounded together, not only each.
        let mut meta_bytes = 0u64;
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
                    meta_bytes = meta_bytes.saturating_add(size);
                    if meta_bytes > MAX_META {
                        return Err(TarError::MetaTooLarge {
                            offset: at,
                            size: meta_bytes,
                        });
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
            self.pending = padded(data).ok_or(TarError::SizeOverflow {
                offset: self.offset,
                size: data,
            })?;
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
        let pad = padded(size).ok_or(TarError::SizeOverflow {
            offset: self.offset,
            size,
        })? - size;
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
pub(super) fn number(field: &[u8], offset: u64, name: &'static str) -> Result<u64, TarError> {
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
pub(super) fn parse_pax(
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
