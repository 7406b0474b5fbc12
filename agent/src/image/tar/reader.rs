//! The streaming reader for untrusted tarballs: headers checked and bounded, data handed
//! out as read, truncation an error.

use std::{
    collections::BTreeMap,
    io::{self, Read},
};

use super::{BLOCK, Header, Kind, MAX_HOLES, MAX_META, MAX_STRETCHES, TarError, padded};

/// Reads entries one after the other from a tar stream.
pub struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Bytes of the current entry's data (plus padding) not yet consumed.
    pending: u64,
    /// Bytes of the current entry's data in the stream not yet consumed.
    pending_data: u64,
    /// The current entry's holes, when it is a sparse file.
    sparse: Option<Sparse>,
    /// Bytes of holes the stream's sparse files claimed so far.
    holes: u64,
    done: bool,
}

/// A sparse file being read: the stream holds its stretches of data one after the other,
/// the rest of the file is holes, read as zeros.
#[derive(Debug)]
struct Sparse {
    /// (offset in the file, length), in order and apart.
    stretches: Vec<(u64, u64)>,
    /// The stretch the next read is in or before.
    next: usize,
    /// Where in the file the next read starts.
    at: u64,
    size: u64,
}

/// What the PAX records of a GNU sparse file say (formats 0.0, 0.1 and 1.0).
#[derive(Debug, Default)]
struct PaxSparse {
    /// The file's real name (the header's is `GNUSparseFile.<pid>/<name>`), as bytes: it
    /// is checked as the other names are.
    name: Option<Vec<u8>>,
    /// The file's real size.
    size: Option<u64>,
    /// The map, offsets and lengths alternating (0.0 and 0.1; 1.0's is in the data).
    map: Option<Vec<u64>>,
    /// Format 1.0: the map starts the entry's data.
    map_in_data: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            pending: 0,
            pending_data: 0,
            sparse: None,
            holes: 0,
            done: false,
        }
    }

    /// Whether the entry whose header [`Self::next_header`] returned last is a sparse file:
    /// its data in the stream is its stretches one after another, not the file.
    pub fn is_sparse(&self) -> bool {
        self.sparse.is_some()
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
        self.sparse = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
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
                        b'L' => long_name = Some(c_bytes(&data).to_vec()),
                        b'K' => long_link = Some(c_bytes(&data).to_vec()),
                        b'x' => parse_pax(&data, at, &mut pax)?,
                        _ => {} // global PAX headers carry nothing imgstream needs
                    }
                    continue;
                }
                _ => {}
            }
            let kind = match flag {
                b'0' | 0 | b'7' | b'S' => Kind::Regular,
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
                name: String::new(),
                kind,
                link_name: String::new(),
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
            // Names as bytes until the one that counts is known (a sparse file's real name,
            // else PAX, else GNU's long name, else ustar's): a ustar field cut short of a
            // long UTF-8 name, or a sparse file's placeholder, is not an error.
            let mut pax_sparse = PaxSparse::take(&mut pax, at)?;
            let name = (pax_sparse.name.take())
                .or(pax.remove("path"))
                .or(long_name.take())
                .unwrap_or_else(|| ustar_name(&block));
            let link = pax
                .remove("linkpath")
                .or(long_link.take())
                .unwrap_or_else(|| c_bytes(&block[157..257]).to_vec());
            apply_pax(&mut header, pax, at)?;
            header.name = utf8(name, at, "name")?;
            header.link_name = utf8(link, at, "link target")?;
            // Old GNU sparse entries list their first stretches in the header, the rest in
            // blocks of their own right after it, before the data.
            let gnu_sparse = match flag {
                b'S' => Some(self.gnu_sparse_map(&block, at)?),
                _ => None,
            };
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
            let sparse = match (gnu_sparse, pax_sparse) {
                (Some((map, size)), _) => Some((map, size)),
                (None, pax) if pax.map_in_data || pax.map.is_some() => {
                    if header.kind != Kind::Regular {
                        return Err(TarError::Sparse {
                            offset: at,
                            why: "only a regular file can be sparse",
                        });
                    }
                    let size = pax.size.ok_or(TarError::Sparse {
                        offset: at,
                        why: "no real size",
                    })?;
                    let map = match pax.map {
                        Some(map) => map,
                        None => self.map_in_data(at)?,
                    };
                    Some((map, size))
                }
                (None, pax) if pax.size.is_some() => {
                    return Err(TarError::Sparse {
                        offset: at,
                        why: "a real size but no map",
                    });
                }
                (None, _) => None,
            };
            if let Some((map, size)) = sparse {
                self.start_sparse(&mut header, map, size, at)?;
            }
            return Ok(Some(header));
        }
    }

    /// Reads from the current entry's data (a sparse file's holes as zeros); 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let Some(sparse) = &mut self.sparse else {
            return self.read_stored(buf);
        };
        loop {
            if sparse.at >= sparse.size || buf.is_empty() {
                return Ok(0);
            }
            let (start, len) = sparse
                .stretches
                .get(sparse.next)
                .copied()
                .unwrap_or((sparse.size, 0));
            let end = start + len;
            if sparse.at < start {
                let n = (start - sparse.at).min(buf.len() as u64) as usize;
                buf[..n].fill(0);
                sparse.at += n as u64;
                return Ok(n);
            }
            if sparse.at >= end {
                sparse.next += 1;
                continue;
            }
            let want = (end - sparse.at).min(buf.len() as u64) as usize;
            let n = self.read_stored(&mut buf[..want])?;
            if n == 0 {
                return Err(TarError::Truncated {
                    offset: self.offset,
                });
            }
            if let Some(sparse) = &mut self.sparse {
                sparse.at += n as u64;
            }
            return Ok(n);
        }
    }

    /// Reads from the current entry's data as the stream holds it; 0 at its end.
    fn read_stored(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
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

    /// The map of an old GNU sparse entry (`S`) whose header is `block`, at `at`: the
    /// stretches its header lists, then those of the extension blocks after it (read here),
    /// and the file's real size.
    fn gnu_sparse_map(
        &mut self,
        block: &[u8; BLOCK],
        at: u64,
    ) -> Result<(Vec<u64>, u64), TarError> {
        let mut map = Vec::new();
        let size = number(&block[483..495], at, "realsize")?;
        take_gnu_stretches(&block[386..482], at, &mut map)?;
        let mut extended = block[482] != 0;
        while extended {
            if map.len() / 2 >= MAX_STRETCHES {
                return Err(TarError::Sparse {
                    offset: at,
                    why: "more stretches than imgstream reads",
                });
            }
            let mut more = [0u8; BLOCK];
            if !self.read_block(&mut more)? {
                return Err(TarError::Truncated {
                    offset: self.offset,
                });
            }
            take_gnu_stretches(&more[..504], at, &mut map)?;
            extended = more[504] != 0;
        }
        Ok((map, size))
    }

    /// Reads the map that starts a PAX 1.0 sparse file's data (decimal numbers, each ended by
    /// a newline: how many stretches, then each one's offset and length; padded to a block).
    fn map_in_data(&mut self, at: u64) -> Result<Vec<u64>, TarError> {
        let bad = |why| TarError::Sparse { offset: at, why };
        let mut numbers = Vec::new();
        let mut wanted: Option<usize> = None;
        let mut digits = 0u32;
        let mut value = 0u64;
        loop {
            if wanted.is_some_and(|w| numbers.len() == w) {
                break;
            }
            if self.pending_data < BLOCK as u64 {
                return Err(bad("its map runs past its data"));
            }
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                return Err(TarError::Truncated {
                    offset: self.offset,
                });
            }
            self.pending_data -= BLOCK as u64;
            self.pending -= BLOCK as u64;
            for &b in &block {
                if wanted.is_some_and(|w| numbers.len() == w) {
                    break;
                }
                match b {
                    b'0'..=b'9' if digits < 20 => {
                        value = value
                            .checked_mul(10)
                            .and_then(|v| v.checked_add(u64::from(b - b'0')))
                            .ok_or(bad("a number in its map overflows"))?;
                        digits += 1;
                    }
                    b'\n' if digits > 0 => {
                        if wanted.is_none() {
                            let count = usize::try_from(value)
                                .ok()
                                .filter(|&c| c <= MAX_STRETCHES)
                                .ok_or(bad("more stretches than imgstream reads"))?;
                            wanted = Some(1 + 2 * count);
                        }
                        numbers.push(value);
                        (digits, value) = (0, 0);
                    }
                    _ => return Err(bad("its map is not decimal numbers, one a line")),
                }
            }
        }
        numbers.remove(0);
        Ok(numbers)
    }

    /// Makes the current entry, whose header is `header`, read as the sparse file `map`
    /// (offsets and lengths alternating) of `size` bytes describes, once the map is checked
    /// against its data in the stream.
    fn start_sparse(
        &mut self,
        header: &mut Header,
        map: Vec<u64>,
        size: u64,
        at: u64,
    ) -> Result<(), TarError> {
        let bad = |why| TarError::Sparse { offset: at, why };
        if !map.len().is_multiple_of(2) {
            return Err(bad("its map has an offset without a length"));
        }
        let mut stretches = Vec::with_capacity(map.len() / 2);
        let (mut end, mut stored) = (0u64, 0u64);
        for pair in map.chunks_exact(2) {
            let (offset, len) = (pair[0], pair[1]);
            let stretch_end = offset
                .checked_add(len)
                .filter(|&e| e <= size)
                .ok_or(bad("a stretch ends past the file's size"))?;
            if offset < end {
                return Err(bad("its stretches overlap or are out of order"));
            }
            end = stretch_end;
            stored += len;
            if len > 0 {
                stretches.push((offset, len));
            }
        }
        if stored != self.pending_data {
            return Err(bad("its stretches do not add up to its data"));
        }
        self.holes = self.holes.saturating_add(size - stored);
        if self.holes > MAX_HOLES {
            return Err(TarError::TooManyHoles {
                offset: at,
                holes: self.holes,
            });
        }
        header.size = size;
        self.sparse = Some(Sparse {
            stretches,
            next: 0,
            at: 0,
            size,
        });
        Ok(())
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

/// A NUL-terminated field's bytes.
fn c_bytes(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn c_str(bytes: &[u8]) -> String {
    String::from_utf8_lossy(c_bytes(bytes)).into_owned()
}

/// A name or link target, which must be UTF-8: imgstream's paths are strings, and a name
/// made into one by replacing its bytes would show the file under another name.
fn utf8(bytes: Vec<u8>, offset: u64, what: &'static str) -> Result<String, TarError> {
    String::from_utf8(bytes).map_err(|_| TarError::NotUtf8 { offset, what })
}

/// Appends the stretches of an old GNU sparse header's `entries` (offset and length, 12
/// octal bytes each) to `map`, up to the first empty one.
fn take_gnu_stretches(entries: &[u8], at: u64, map: &mut Vec<u64>) -> Result<(), TarError> {
    for entry in entries.chunks_exact(24) {
        if entry.iter().all(|&b| b == 0) {
            break;
        }
        map.push(number(&entry[..12], at, "sparse offset")?);
        map.push(number(&entry[12..], at, "sparse length")?);
    }
    Ok(())
}

fn ustar_name(block: &[u8; BLOCK]) -> Vec<u8> {
    let name = c_bytes(&block[0..100]);
    // GNU's magic is `ustar  \0`, and its headers keep times and sparse maps where POSIX
    // has the prefix.
    let is_ustar = &block[257..263] == b"ustar\0";
    let prefix = if is_ustar {
        c_bytes(&block[345..500])
    } else {
        &[]
    };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
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
        let value = &record[eq + 1..];
        if matches!(key.as_str(), "GNU.sparse.offset" | "GNU.sparse.numbytes") {
            // Sparse format 0.0 repeats these two, one pair a stretch: kept in order, as
            // format 0.1's map.
            let map = out.entry("GNU.sparse.map".into()).or_default();
            if !map.is_empty() {
                map.push(b',');
            }
            map.extend_from_slice(value);
        } else {
            out.insert(key, value.to_vec());
        }
        rest = &rest[len..];
    }
    Ok(())
}

impl PaxSparse {
    /// Takes the GNU sparse records out of `pax`: what they say, or nothing for an entry
    /// that is not a sparse file.
    fn take(pax: &mut BTreeMap<String, Vec<u8>>, offset: u64) -> Result<Self, TarError> {
        let bad = |why| TarError::Sparse { offset, why };
        let mut take = |key: &str| pax.remove(key);
        let text = |v: Vec<u8>| String::from_utf8(v).map_err(|_| bad("a record is not UTF-8"));
        let num = |v: Vec<u8>| decimal(&v).ok_or(bad("a record is not a number"));
        let version = (take("GNU.sparse.major"), take("GNU.sparse.minor"));
        let name = take("GNU.sparse.name");
        let size_0x = take("GNU.sparse.size").map(num).transpose()?;
        let size_10 = take("GNU.sparse.realsize").map(num).transpose()?;
        take("GNU.sparse.numblocks");
        let map = take("GNU.sparse.map")
            .map(|v| {
                let text = text(v)?;
                let map = text
                    .split(',')
                    .map(|n| n.parse::<u64>().map_err(|_| bad("its map is not numbers")))
                    .collect::<Result<Vec<u64>, _>>()?;
                if map.len() / 2 > MAX_STRETCHES {
                    return Err(bad("more stretches than imgstream reads"));
                }
                Ok(map)
            })
            .transpose()?;
        let map_in_data = match version {
            (None, None) => false,
            (Some(major), Some(minor)) if major == b"1" && minor == b"0" => true,
            (Some(major), Some(_)) if major == b"0" => false,
            _ => return Err(bad("a GNU sparse format other than 0.0, 0.1 and 1.0")),
        };
        if map_in_data && map.is_some() {
            return Err(bad("format 1.0 with a map in its records"));
        }
        Ok(Self {
            name,
            size: if map_in_data { size_10 } else { size_0x },
            map,
            map_in_data,
        })
    }
}

/// A PAX record's decimal number.
fn decimal(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn apply_pax(h: &mut Header, pax: BTreeMap<String, Vec<u8>>, offset: u64) -> Result<(), TarError> {
    let num = |v: &[u8], field| decimal(v).ok_or(TarError::Number { offset, field });
    for (key, value) in pax {
        let text = || String::from_utf8_lossy(&value).into_owned();
        match key.as_str() {
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
