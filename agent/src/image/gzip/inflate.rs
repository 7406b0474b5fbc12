//! What a span index needs of zlib and nothing more: raw inflate that can stop at every
//! deflate block boundary and say where the symbol it stopped in began, resume mid-stream
//! from a bit position with a 32 KiB dictionary,
//! and gzip member headers parsed by hand (RFC 1952), so one raw inflater walks members one
//! after the other. zlib-rs's C-compatible API: pure Rust, the same inflate flate2 uses here.

use libz_rs_sys as z;

use super::GzipError;

/// Longest gzip header accepted: 10 fixed bytes, an extra field of at most 64 KiB, and a
/// file name and comment of at most 64 KiB each (real ones are a few bytes).
pub(super) const MAX_HEADER: usize = 10 + 2 + 0xffff + 2 * 65_536 + 2;
/// A gzip member's trailer: the CRC-32 and the size, mod 2^32, of its uncompressed bytes.
pub(super) const TRAILER: usize = 8;

/// Where one call to [`RawInflate::inflate`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// Out of input or output space.
    Room,
    /// Right after the end of a block that is not the stream's last: the next block starts
    /// `bits` bits before the end of the last byte consumed (0: at the next byte).
    Block { bits: u8 },
    /// After the last block: the member's trailer starts at the next byte.
    End,
}

/// One inflate call's outcome.
#[derive(Clone, Copy, Debug)]
pub(super) struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub stop: Stop,
    /// Where the symbol being decoded began, when the call stopped inside a compressed
    /// block: [`Mark`]. `None` between blocks or inside a stored one.
    pub mark: Option<Mark>,
    /// Bits of the consumed input inflate holds and has not used.
    pub held: u8,
}

/// Inside a compressed block, where the literal or length/distance pair being decoded when
/// inflate stopped began (zlib's `inflateMark`): a symbol boundary, where inflation can
/// resume given the block's header and the 32 KiB before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mark {
    /// Bits of the symbol inflate has taken, as zlib-rs counts them: for a length/distance
    /// pair whose distance code was read, that code's bits are left out (zlib counts them;
    /// zlib-rs 0.6 does not). The symbol ends [`Step::held`] bits before the end of the
    /// input consumed.
    pub counted: u64,
    /// Bytes of the symbol already written out (part of a match; 0 for a literal).
    pub written: usize,
}

/// A raw (headerless) deflate decoder with a 32 KiB window.
pub(super) struct RawInflate {
    /// Boxed: zlib's state points back at its stream, so the stream must not move.
    stream: Box<z::z_stream>,
}

impl RawInflate {
    pub(super) fn new() -> Result<Self, GzipError> {
        let mut stream = Box::new(z::z_stream::default());
        // SAFETY: `stream` is a default (null allocator, null state) stream that outlives
        // the call; the version string is zlib-rs's own.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *stream,
                -15,
                z::zlibVersion(),
                size_of::<z::z_stream>() as i32,
            )
        };
        if ret != z::Z_OK {
            return Err(GzipError::Inflate(format!("inflateInit2 returned {ret}")));
        }
        Ok(Self { stream })
    }

    /// An inflater resumed at a checkpoint inside a member: `bytes` starts with the byte
    /// holding the first bits after it (`bits` of them, its high ones; 0: the checkpoint is
    /// at a byte boundary) and `window` is the history back-references may reach. Returns
    /// it with the input that follows the primed byte, or `None` if `bytes` is empty where
    /// a byte is needed.
    pub(super) fn resume<'a>(
        bits: u8,
        window: &[u8],
        bytes: &'a [u8],
    ) -> Result<Option<(Self, &'a [u8])>, GzipError> {
        let mut inflate = Self::new()?;
        let mut input = bytes;
        if bits > 0 {
            let Some((&byte, rest)) = input.split_first() else {
                return Ok(None);
            };
            inflate.prime(bits, byte)?;
            input = rest;
        }
        inflate.set_dictionary(window)?;
        Ok(Some((inflate, input)))
    }

    /// Starts a new deflate stream (the next gzip member).
    pub(super) fn reset(&mut self) -> Result<(), GzipError> {
        // SAFETY: the stream was initialised in `new` and is not borrowed.
        let ret = unsafe { z::inflateReset(&mut *self.stream) };
        self.check(ret, "inflateReset")
    }

    /// Feeds the `bits` (1..=7) high bits of `byte`, the part of the byte before a
    /// checkpoint that belongs to the block starting there. Before the first inflate only.
    pub(super) fn prime(&mut self, bits: u8, byte: u8) -> Result<(), GzipError> {
        if !(1..=7).contains(&bits) {
            return Err(GzipError::Inflate(format!("cannot prime {bits} bits")));
        }
        let value = i32::from(byte >> (8 - bits));
        // SAFETY: as in `reset`.
        let ret = unsafe { z::inflatePrime(&mut *self.stream, i32::from(bits), value) };
        self.check(ret, "inflatePrime")
    }

    /// The uncompressed bytes before the resume point, which back-references may reach.
    pub(super) fn set_dictionary(&mut self, window: &[u8]) -> Result<(), GzipError> {
        if window.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(window.len())
            .map_err(|_| GzipError::Inflate("dictionary too long".into()))?;
        // SAFETY: `window` is valid for `len` bytes during the call; zlib copies it.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.stream, window.as_ptr(), len) };
        self.check(ret, "inflateSetDictionary")
    }

    /// Inflates from `input` into `output`. With `blocks`, returns at the end of every block
    /// so the caller can place a checkpoint there.
    pub(super) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        blocks: bool,
    ) -> Result<Step, GzipError> {
        let avail_in = input.len().min(u32::MAX as usize);
        let avail_out = output.len().min(u32::MAX as usize);
        let s = &mut *self.stream;
        s.next_in = input.as_ptr();
        s.avail_in = avail_in as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = avail_out as u32;
        let flush = if blocks { z::Z_BLOCK } else { z::Z_NO_FLUSH };
        // SAFETY: next_in/next_out point into `input`/`output`, valid for the lengths given,
        // for the duration of the call; they are cleared before the borrows end.
        let ret = unsafe { z::inflate(s, flush) };
        let consumed = avail_in - s.avail_in as usize;
        let produced = avail_out - s.avail_out as usize;
        // SAFETY: the stream is initialised and its pointers still valid (inflateMark wants
        // them set); it only reads the state.
        let mark = unsafe { z::inflateMark(s) };
        // zlib's bit buffer: bits it took from the consumed input and has not used yet.
        let held = (s.data_type & 63) as u8;
        s.next_in = std::ptr::null();
        s.avail_in = 0;
        s.next_out = std::ptr::null_mut();
        s.avail_out = 0;
        let data_type = s.data_type;
        let stop = match ret {
            z::Z_STREAM_END => Stop::End,
            // After an end-of-block code (128) of a block that is not the last (64): zlib
            // says how many bits of the last byte it took are still unused.
            z::Z_OK | z::Z_BUF_ERROR if blocks && data_type & 128 != 0 && data_type & 64 == 0 => {
                Stop::Block {
                    bits: (data_type & 7) as u8,
                }
            }
            z::Z_OK | z::Z_BUF_ERROR => Stop::Room,
            other => {
                let message = self.message().unwrap_or_else(|| format!("error {other}"));
                return Err(GzipError::Inflate(message));
            }
        };
        // The upper half is how many bits back the current symbol began (-1: not in a
        // compressed block), the lower how many of its bytes were written (for a match).
        let mark = match (mark >> 16, (mark & 0xffff) as usize) {
            (back, written) if back >= 0 && stop == Stop::Room => Some(Mark {
                counted: back as u64,
                written,
            }),
            _ => None,
        };
        Ok(Step {
            consumed,
            produced,
            stop,
            mark,
            held,
        })
    }

    fn message(&self) -> Option<String> {
        if self.stream.msg.is_null() {
            return None;
        }
        // SAFETY: zlib's messages are static NUL-terminated strings.
        let text = unsafe { std::ffi::CStr::from_ptr(self.stream.msg) };
        Some(text.to_string_lossy().into_owned())
    }

    fn check(&self, ret: i32, what: &str) -> Result<(), GzipError> {
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(GzipError::Inflate(format!("{what} returned {ret}")))
        }
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, ended once.
        unsafe { z::inflateEnd(&mut *self.stream) };
    }
}

/// The length of the gzip member header at the start of `buf`: `Ok(None)` if `buf` holds
/// only part of it (and less than [`MAX_HEADER`]), an error if it is not a gzip header.
pub(super) fn header_len(buf: &[u8]) -> Result<Option<usize>, GzipError> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let partial = |buf: &[u8]| {
        if buf.len() >= MAX_HEADER {
            Err(GzipError::Header("longer than 192 KiB".into()))
        } else {
            Ok(None)
        }
    };
    if buf.len() < 10 {
        // Check what is there already, so garbage is refused without waiting for more.
        if buf.first().is_some_and(|&b| b != 0x1f) || buf.get(1).is_some_and(|&b| b != 0x8b) {
            return Err(GzipError::Header("no gzip magic".into()));
        }
        return Ok(None);
    }
    if buf[..2] != [0x1f, 0x8b] {
        return Err(GzipError::Header("no gzip magic".into()));
    }
    if buf[2] != 8 {
        return Err(GzipError::Header(format!("compression method {}", buf[2])));
    }
    let flags = buf[3];
    if flags & 0xe0 != 0 {
        return Err(GzipError::Header(format!("reserved flags {flags:#04x}")));
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let Some(len) = buf.get(at..at + 2) else {
            return partial(buf);
        };
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let Some(rest) = buf.get(at..) else {
                return partial(buf);
            };
            let Some(nul) = rest.iter().take(65_536).position(|&b| b == 0) else {
                if rest.len() >= 65_536 {
                    return Err(GzipError::Header("name or comment over 64 KiB".into()));
                }
                return partial(buf);
            };
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    if buf.len() < at {
        return partial(buf);
    }
    Ok(Some(at))
}
