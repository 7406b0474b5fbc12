//! The span index as bytes: what `imgstream index` publishes beside an image and what the
//! agent reads back from a registry it does not control, so decoding bounds everything.
//!
//! All integers little-endian, the whole of it gzip-compressed. Version 1 holds the
//! windows; version 2 keeps them apart, in a blob of their own (each window deflated, one
//! after the other, [`WINDOWS_TYPE`]) that a mount does not download: a miss fetches the
//! window of its span with the span, a few KiB. With small spans (many windows) that is
//! most of the index's size left on the registry. Versions 3 and 4 are 1 and 2 with
//! checkpoints inside deflate blocks, each carrying its block's header (written only when
//! an index has such a checkpoint, so agents that read 1 and 2 still read the others).
//!
//! ```text
//! magic "imgstream-gzip-index\0" · u32 version (1 to 4)
//! [32] layer digest (SHA-256) · u64 compressed size · u64 uncompressed size
//! versions 2, 4: [32] windows blob digest · u64 windows blob size
//! u32 spans, each: u64 compressed · u8 bits (0x80: a member header starts here;
//!                                          0x40: inside a block, versions 3 and 4)
//!                  u64 uncompressed · u64 len · [32] digest
//!                  versions 1, 3: u32 window length · window
//!                  versions 2, 4: u64 window offset · u32 deflated length · u32 window length
//!                  0x40: u16 header bits · the header, in (bits + 7) / 8 bytes
//! u32 entries, each: str name · u8 type flag · str link · u32 mode · u64 uid · u64 gid
//!                    u64 size · i64 mtime · str uname · str gname · u32 major · u32 minor
//!                    u32 xattrs, each: str key · bytes value
//!                    u64 data offset
//! (str and bytes: u32 length, then that many bytes)
//! ```

use std::io::{Read, Write};

use super::{
    BlockHead, Checkpoint, Entry, GzipError, MAX_ENTRIES, MAX_HEAD_BITS, MAX_SPAN, Span, SpanIndex,
    WINDOW, Window, WindowsBlob,
};
use crate::{
    image::tar::{Header, Kind},
    oci::digest::Digest,
};

const MAGIC: &[u8; 21] = b"imgstream-gzip-index\0";
/// Windows held in the index.
const HELD: u32 = 1;
/// Windows kept apart.
const APART: u32 = 2;
/// Windows held, checkpoints inside blocks.
const HELD_INSIDE: u32 = 3;
/// Windows kept apart, checkpoints inside blocks.
const APART_INSIDE: u32 = 4;
/// Media type of the blob that holds an index's windows kept apart, published in the same
/// artifact as the index.
pub const WINDOWS_TYPE: &str = "application/vnd.imgstream.gzip-span-windows.v1";
/// Most deflated bytes of one window: a fast deflate of incompressible bytes in fixed
/// Huffman codes takes 9 bits a byte, 4.5 KiB more than the window; twice it is room enough.
const MAX_DEFLATED_WINDOW: usize = 2 * WINDOW;
/// Most bytes a decoded index may take uncompressed, whatever its compressed size.
pub const MAX_DECODED: u64 = 256 << 20;
/// Longest name, link target, user or group name, xattr key or value.
const MAX_STRING: usize = 64 * 1024;
/// Most xattrs of one entry.
const MAX_XATTRS: usize = 1024;
/// Most spans: a 64 GiB layer in 64 KiB spans, more than any real layer.
const MAX_SPANS: usize = 1 << 20;
const MEMBER: u8 = 0x80;
const INSIDE: u8 = 0x40;

/// Why an encoded index was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a gzip-compressed span index")]
    Compression(#[source] std::io::Error),
    #[error("the index is larger than {MAX_DECODED} bytes uncompressed")]
    TooLarge,
    #[error("not a span index (no magic)")]
    Magic,
    #[error(
        "span index version {0} is not supported (this agent reads versions {HELD} to {APART_INSIDE})"
    )]
    Version(u32),
    #[error("the index ends early (reading {0})")]
    Truncated(&'static str),
    #[error("invalid span index: {0}")]
    Invalid(String),
}

impl SpanIndex {
    /// The index with its windows held (version 1), gzip-compressed: what `--local` keeps in
    /// a cache. Fails if a window is kept apart (or held in memory and does not inflate).
    pub fn encode(&self) -> Result<Vec<u8>, GzipError> {
        self.write(None)
    }

    /// The index with its windows kept apart (version 2): the index, gzip-compressed, and
    /// the blob of its windows it names, published beside it.
    pub fn encode_apart(&self) -> Result<(Vec<u8>, Vec<u8>), GzipError> {
        let mut blob = Vec::new();
        let mut places = Vec::with_capacity(self.spans.len());
        for span in &self.spans {
            // Deflated again, hard: every miss fetches its window, and the blob is written once.
            let deflated = span.start.window.deflated_best()?;
            places.push((blob.len() as u64, deflated.len() as u32));
            blob.extend_from_slice(&deflated);
        }
        let windows = WindowsBlob {
            digest: Digest::of(&blob),
            size: blob.len() as u64,
        };
        Ok((self.write(Some((windows, &places)))?, blob))
    }

    /// The format above: windows held, or apart at `places` in `windows`.
    fn write(&self, apart: Option<(WindowsBlob, &[(u64, u32)])>) -> Result<Vec<u8>, GzipError> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        let inside = self.spans.iter().any(|s| s.start.head.is_some());
        put_u32(
            &mut out,
            match (apart.is_some(), inside) {
                (false, false) => HELD,
                (true, false) => APART,
                (false, true) => HELD_INSIDE,
                (true, true) => APART_INSIDE,
            },
        );
        out.extend_from_slice(&self.layer.raw());
        put_u64(&mut out, self.compressed_size);
        put_u64(&mut out, self.uncompressed_size);
        if let Some((windows, _)) = &apart {
            out.extend_from_slice(&windows.digest.raw());
            put_u64(&mut out, windows.size);
        }
        put_u32(&mut out, self.spans.len() as u32);
        for (i, span) in self.spans.iter().enumerate() {
            let c = &span.start;
            put_u64(&mut out, c.compressed);
            let flags =
                if c.member { MEMBER } else { 0 } | if c.head.is_some() { INSIDE } else { 0 };
            out.push(c.bits | flags);
            put_u64(&mut out, c.uncompressed);
            put_u64(&mut out, span.len);
            out.extend_from_slice(&span.digest.raw());
            match &apart {
                None => put_bytes(&mut out, &c.window.bytes()?),
                Some((_, places)) => {
                    let (at, deflated) = places[i];
                    put_u64(&mut out, at);
                    put_u32(&mut out, deflated);
                    put_u32(&mut out, c.window.len() as u32);
                }
            }
            if let Some(head) = &c.head {
                out.extend_from_slice(&head.bits().to_le_bytes());
                out.extend_from_slice(head.bytes());
            }
        }
        put_u32(&mut out, self.entries.len() as u32);
        for entry in &self.entries {
            let h = &entry.header;
            put_bytes(&mut out, h.name.as_bytes());
            out.push(h.kind.flag());
            put_bytes(&mut out, h.link_name.as_bytes());
            put_u32(&mut out, h.mode);
            put_u64(&mut out, h.uid);
            put_u64(&mut out, h.gid);
            put_u64(&mut out, h.size);
            put_u64(&mut out, h.mtime as u64);
            put_bytes(&mut out, h.uname.as_bytes());
            put_bytes(&mut out, h.gname.as_bytes());
            put_u32(&mut out, h.dev_major);
            put_u32(&mut out, h.dev_minor);
            put_u32(&mut out, h.xattrs.len() as u32);
            for (key, value) in &h.xattrs {
                put_bytes(&mut out, key.as_bytes());
                put_bytes(&mut out, value);
            }
            put_u64(&mut out, entry.data_offset);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&out).map_err(GzipError::Io)?;
        gz.finish().map_err(GzipError::Io)
    }

    /// An index read back from `bytes`, checked for being well-formed and consistent: spans
    /// contiguous and within the layer, entries' data within the stream. (Whether it is the
    /// index of the layer it claims is checked against the layer: its digest, then each
    /// span's.)
    pub fn decode(bytes: &[u8]) -> Result<SpanIndex, FormatError> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .take(MAX_DECODED + 1)
            .read_to_end(&mut raw)
            .map_err(FormatError::Compression)?;
        if raw.len() as u64 > MAX_DECODED {
            return Err(FormatError::TooLarge);
        }
        let Some(rest) = raw.strip_prefix(MAGIC.as_slice()) else {
            return Err(FormatError::Magic);
        };
        let mut r = Cursor { rest };
        let version = r.u32("version")?;
        if !(HELD..=APART_INSIDE).contains(&version) {
            return Err(FormatError::Version(version));
        }
        let apart = version == APART || version == APART_INSIDE;
        let inside_allowed = version >= HELD_INSIDE;
        let layer = Digest::from_raw(r.array("layer digest")?);
        let compressed_size = r.u64("compressed size")?;
        let uncompressed_size = r.u64("uncompressed size")?;
        let windows = apart
            .then(|| -> Result<_, FormatError> {
                Ok(WindowsBlob {
                    digest: Digest::from_raw(r.array("windows blob digest")?),
                    size: r.u64("windows blob size")?,
                })
            })
            .transpose()?;
        // The fewest bytes a span takes: an empty window.
        const SPAN_MIN: usize = 8 + 1 + 8 + 8 + 32 + 4;
        let count = r.count("spans", MAX_SPANS, SPAN_MIN)?;
        let mut spans = Vec::with_capacity(count);
        let mut next_uncompressed = 0u64;
        let mut last_compressed = 0u64;
        for i in 0..count {
            let compressed = r.u64("span")?;
            let flags = r.u8("span")?;
            let uncompressed = r.u64("span")?;
            let len = r.u64("span")?;
            let digest = Digest::from_raw(r.array("span digest")?);
            let invalid = |what: &str| FormatError::Invalid(format!("span {i}: {what}"));
            let window = match &windows {
                None => Window::new(r.bytes("window", WINDOW)?),
                Some(blob) => {
                    let at = r.u64("window offset")?;
                    let deflated = r.u32("window")?;
                    let len = r.u32("window")? as usize;
                    if len > WINDOW
                        || deflated as usize > MAX_DEFLATED_WINDOW
                        || (len == 0) != (deflated == 0)
                        || at.saturating_add(deflated.into()) > blob.size
                    {
                        return Err(invalid("window out of bounds"));
                    }
                    if len == 0 {
                        Window::default()
                    } else {
                        Window::apart(blob.digest, at, deflated, len)
                    }
                }
            };
            let member = flags & MEMBER != 0;
            let inside = flags & INSIDE != 0;
            let bits = flags & !(MEMBER | INSIDE);
            if bits > 7
                || (bits > 0 && compressed == 0)
                || (member && (bits != 0 || !window.is_empty()))
                || (inside && (member || !inside_allowed))
            {
                return Err(invalid("bad flags"));
            }
            let head = inside
                .then(|| -> Result<_, FormatError> {
                    let head_bits = u16::from_le_bytes(r.array("block header")?);
                    if !(3..=MAX_HEAD_BITS).contains(&head_bits) {
                        return Err(invalid("block header length out of range"));
                    }
                    let bytes = r.take(usize::from(head_bits).div_ceil(8), "block header")?;
                    BlockHead::new(bytes.to_vec(), head_bits).ok_or_else(|| invalid("block header"))
                })
                .transpose()?;
            if uncompressed != next_uncompressed {
                return Err(invalid("not where the previous span ends"));
            }
            // An empty last span is what indexes of streams ending in empty blocks held
            // before the builder left it out: it holds nothing, and is dropped below.
            let empty_last = len == 0 && i + 1 == count;
            if (len == 0 && !empty_last) || len > MAX_SPAN {
                return Err(invalid("length out of range"));
            }
            // The first bits may share a byte with the previous span's last ones.
            let first_byte = compressed - u64::from(bits > 0);
            if (i == 0 && (compressed != 0 || bits != 0 || !member))
                || (i > 0 && first_byte < last_compressed)
                || compressed > compressed_size
            {
                return Err(invalid(
                    "compressed offset out of order or out of the layer",
                ));
            }
            next_uncompressed = uncompressed
                .checked_add(len)
                .ok_or_else(|| invalid("length overflows"))?;
            last_compressed = compressed;
            if empty_last {
                continue;
            }
            spans.push(Span {
                start: Checkpoint {
                    compressed,
                    bits,
                    uncompressed,
                    member,
                    window,
                    head,
                },
                len,
                digest,
            });
        }
        if next_uncompressed != uncompressed_size {
            return Err(FormatError::Invalid(
                "the spans do not cover the uncompressed stream".into(),
            ));
        }
        // The fewest bytes an entry takes: empty strings, no xattrs.
        const ENTRY_MIN: usize = 4 + 1 + 4 + 4 + 8 + 8 + 8 + 8 + 4 + 4 + 4 + 4 + 4 + 8;
        let count = r.count("entries", MAX_ENTRIES, ENTRY_MIN)?;
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let name = r.string("name")?;
            let flag = r.u8("type")?;
            let kind = Kind::from_flag(flag)
                .ok_or_else(|| FormatError::Invalid(format!("entry {i}: type {flag}")))?;
            let mut header = Header::new(&name, kind);
            header.link_name = r.string("link")?;
            header.mode = r.u32("mode")?;
            header.uid = r.u64("uid")?;
            header.gid = r.u64("gid")?;
            header.size = r.u64("size")?;
            header.mtime = r.u64("mtime")? as i64;
            header.uname = r.string("uname")?;
            header.gname = r.string("gname")?;
            header.dev_major = r.u32("major")?;
            header.dev_minor = r.u32("minor")?;
            let xattrs = r.count("xattrs", MAX_XATTRS, 8)?;
            for _ in 0..xattrs {
                let key = r.string("xattr")?;
                let value = r.bytes("xattr", MAX_STRING)?.to_vec();
                header.xattrs.insert(key, value);
            }
            let data_offset = r.u64("data offset")?;
            if data_offset
                .checked_add(header.size)
                .is_none_or(|end| end > uncompressed_size)
            {
                return Err(FormatError::Invalid(format!(
                    "entry {i} ({name}): its data is past the end of the stream"
                )));
            }
            entries.push(Entry {
                header,
                data_offset,
            });
        }
        if !r.rest.is_empty() {
            return Err(FormatError::Invalid("bytes after the entries".into()));
        }
        Ok(SpanIndex {
            layer,
            compressed_size,
            uncompressed_size,
            spans,
            entries,
            windows,
        })
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

/// Reads fields off the front of the decoded bytes, never past their end.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        if self.rest.len() < n {
            return Err(FormatError::Truncated(what));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `each` bytes: at most `max`, and no more than the bytes
    /// left could hold (so nothing is allocated for what is not there).
    fn count(&mut self, what: &'static str, max: usize, each: usize) -> Result<usize, FormatError> {
        let n = self.u32(what)? as usize;
        if n > max || n.saturating_mul(each) > self.rest.len() {
            return Err(FormatError::Invalid(format!("{n} {what}")));
        }
        Ok(n)
    }

    fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], FormatError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(FormatError::Invalid(format!("{what} of {n} bytes")));
        }
        self.take(n, what)
    }

    fn string(&mut self, what: &'static str) -> Result<String, FormatError> {
        let bytes = self.bytes(what, MAX_STRING)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| FormatError::Invalid(format!("{what} is not UTF-8")))
    }
}
