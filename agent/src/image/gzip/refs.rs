//! Which bytes of a checkpoint's window the span after it really refers back to.
//!
//! A checkpoint keeps the 32 KiB of uncompressed bytes before it, because a back-reference
//! in the blocks after it may reach that far. Most of those bytes are never reached: only
//! the span's first 32 KiB can refer back past the checkpoint at all, and they refer to a
//! fraction of the window. [`sparse_window`] decodes that first stretch symbol by symbol,
//! marks the window bytes its back-references copy, and returns the window with every other
//! byte zeroed. zlib, given the sparse window as its dictionary, inflates the span exactly
//! as with the whole one (it only ever copies referenced bytes), and the zero runs cost
//! almost nothing once the index is compressed: the windows were most of an index's size.
//!
//! The decoder here is used only to find references, never to produce a span's bytes: what
//! it decodes is compared with what zlib produced, and any disagreement, malformed input or
//! missing bytes gives `None`, where the caller keeps the whole window.

use super::{BlockHead, WINDOW};

/// Lengths of matches by length code 257..=285.
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Distances by distance code 0..=29.
const DISTANCE_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DISTANCE_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order code-length code lengths are sent in (RFC 1951, 3.2.7).
const CODE_LENGTH_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];
const MAX_BITS: usize = 15;

/// The end of `window` that the stream after the checkpoint refers to, from the first byte
/// it reaches back to, with the bytes it never refers to set to zero; or `None` if that
/// cannot be shown. `compressed` starts with the byte holding the first bit
/// after the checkpoint; `bits` is how many high bits of that byte belong to what follows
/// (0: all of it, the checkpoint is at a byte boundary). `inflated` is what zlib made of
/// the stream after the checkpoint: at least [`WINDOW`] bytes, or everything up to the end
/// of the gzip member when that comes sooner.
pub(super) fn sparse_window(
    window: &[u8],
    compressed: &[u8],
    bits: u8,
    inflated: &[u8],
) -> Option<Vec<u8>> {
    if bits > 7 {
        return None;
    }
    let start = if bits == 0 { 0 } else { 8 - usize::from(bits) };
    let mut decoder = Decoder {
        input: BitReader {
            data: compressed,
            position: start,
        },
        window,
        used: vec![false; window.len()],
        out: Vec::with_capacity(WINDOW + 258),
    };
    let ended = decoder.run()?;
    let out = &decoder.out;
    // What was decoded must be what zlib produced: every byte of it, and (unless the member
    // ended first) at least the stretch in which a reference can reach the window.
    if out.len() > inflated.len() || out[..] != inflated[..out.len()] {
        return None;
    }
    if !ended && out.len() < WINDOW {
        return None;
    }
    // Bytes before the first one referred to are dropped: no reference reaches that far
    // back, so the shorter dictionary serves as well (and weighs less, in the index and in
    // memory).
    let first = decoder
        .used
        .iter()
        .position(|&used| used)
        .unwrap_or(window.len());
    Some(
        window[first..]
            .iter()
            .zip(&decoder.used[first..])
            .map(|(&byte, &used)| if used { byte } else { 0 })
            .collect(),
    )
}

/// The header of the compressed block whose first bit is bit `skip` of `data`: its bits
/// from the block's first (BFINAL) to the last before its first symbol, packed from bit 0.
/// `None` for a stored block (it has no codes to resume with), or a header that is
/// malformed or not all in `data`.
pub(super) fn block_head(data: &[u8], skip: usize) -> Option<BlockHead> {
    let (_, end) = read_head(data, skip)?;
    let mut reader = BitReader {
        data,
        position: skip,
    };
    let mut head = BitWriter::default();
    for _ in skip..end {
        head.push(u64::from(reader.bit()?), 1);
    }
    BlockHead::new(head.finish(), u16::try_from(end - skip).ok()?)
}

/// The codes of the compressed block whose header starts at bit `position` of `data`, and
/// the bit after that header; `None` for a stored block or a header that is malformed or
/// not all in `data`.
fn read_head(data: &[u8], position: usize) -> Option<((Huffman, Huffman), usize)> {
    let mut decoder = Decoder {
        input: BitReader { data, position },
        window: &[],
        used: Vec::new(),
        out: Vec::new(),
    };
    decoder.input.bit()?;
    let codes = match decoder.input.bits(2)? {
        1 => fixed_codes()?,
        2 => decoder.dynamic_codes()?,
        _ => return None,
    };
    Some((codes, decoder.input.position))
}

/// The codes of a compressed block, from its header: to tell what symbol starts where.
pub(super) struct BlockCodes {
    literals: Huffman,
    distances: Huffman,
}

impl BlockCodes {
    pub(super) fn of(head: &BlockHead) -> Option<Self> {
        let ((literals, distances), _) = read_head(head.bytes(), 0)?;
        Some(Self {
            literals,
            distances,
        })
    }

    /// The symbol (a literal, a length/distance pair or the end of the block) whose first
    /// bit is bit `position` of `data`. `None` if the bits there are no symbol.
    pub(super) fn symbol_at(&self, data: &[u8], position: usize) -> Option<Symbol> {
        let mut input = BitReader { data, position };
        let symbol = self.literals.decode(&mut input)?;
        if symbol <= 256 {
            return Some(Symbol {
                bits: (input.position - position) as u64,
                distance_bits: 0,
                copy: None,
            });
        }
        let code = usize::from(symbol - 257);
        let length = LENGTH_BASE.get(code)? + input.bits(*LENGTH_EXTRA.get(code)?)?;
        let before = input.position;
        let code = usize::from(self.distances.decode(&mut input)?);
        let distance_bits = (input.position - before) as u64;
        let distance = DISTANCE_BASE.get(code)? + input.bits(*DISTANCE_EXTRA.get(code)?)?;
        Some(Symbol {
            bits: (input.position - position) as u64,
            distance_bits,
            copy: Some((length, distance)),
        })
    }
}

/// One symbol of a compressed block, as [`BlockCodes::symbol_at`] decodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Symbol {
    /// Bits it takes.
    pub bits: u64,
    /// Of those, its distance code's (0 but for a length/distance pair).
    pub distance_bits: u64,
    /// For a length/distance pair: the length and the distance.
    pub copy: Option<(u16, u16)>,
}

/// Appends empty deflate blocks (none of them the last) that take a number of bits that is
/// `residue` more than a multiple of 8: an empty block in fixed codes takes 10 bits, one in
/// dynamic codes (a one-bit code for a literal and for end of block) 91 bits with 18
/// code length codes and 94 with 19. They produce nothing.
pub(super) fn empty_blocks(out: &mut BitWriter, residue: u32) {
    // (blocks in fixed codes, dynamic with 18 code length codes, with 19).
    let (fixed, short, long) = match residue % 8 {
        0 => (0, 0, 0),
        1 => (0, 1, 1),
        2 => (1, 0, 0),
        3 => (0, 1, 0),
        4 => (2, 0, 0),
        5 => (1, 1, 0),
        6 => (0, 0, 1),
        _ => (2, 1, 0),
    };
    for _ in 0..fixed {
        // BFINAL 0, BTYPE 01, then end of block: code 0000000.
        out.push(0b010, 3);
        out.push(0, 7);
    }
    for (count, lengths) in [(short, 18u32), (long, 19)] {
        for _ in 0..count {
            // BFINAL 0, BTYPE 10; 257 literal/length codes, 1 distance code.
            out.push(0b100, 3);
            out.push(0, 5);
            out.push(0, 5);
            out.push(u64::from(lengths - 4), 4);
            // Code length codes, in their order: 16 17 18 0 8 7 9 6 10 5 11 4 12 3 13 2 14
            // 1 (15): 18 and 1 get one bit each (1 is code 0, 18 is code 1).
            for slot in 0..lengths {
                out.push(u64::from(slot == 2 || slot == 17), 3);
            }
            // Lengths: 1 (literal 0), 138 and 117 zeros (18, 7 extra bits each),
            // 1 (end of block), 1 (the distance code).
            out.push(0, 1);
            out.push(1, 1);
            out.push(138 - 11, 7);
            out.push(1, 1);
            out.push(117 - 11, 7);
            out.push(0, 1);
            out.push(0, 1);
            // End of block: literal 0 is code 0, 256 code 1.
            out.push(1, 1);
        }
    }
}

/// Bits packed least significant first, as deflate packs them.
#[derive(Default)]
pub(super) struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    held: u32,
}

impl BitWriter {
    pub(super) fn with_capacity(bytes: usize) -> Self {
        Self {
            out: Vec::with_capacity(bytes),
            ..Self::default()
        }
    }

    /// Appends the `count` (at most 32) low bits of `value`.
    pub(super) fn push(&mut self, value: u64, count: u32) {
        debug_assert!(count <= 32);
        self.acc |= (value & ((1u64 << count) - 1)) << self.held;
        self.held += count;
        while self.held >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.held -= 8;
        }
    }

    /// The bytes, the last one padded with zero bits.
    pub(super) fn finish(mut self) -> Vec<u8> {
        if self.held > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Bits of a deflate stream, least significant first.
struct BitReader<'a> {
    data: &'a [u8],
    position: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<u16> {
        let byte = *self.data.get(self.position / 8)?;
        let bit = (byte >> (self.position % 8)) & 1;
        self.position += 1;
        Some(u16::from(bit))
    }

    /// `n` (at most 16) bits as a number, the first read the least significant.
    fn bits(&mut self, n: u8) -> Option<u16> {
        let mut value = 0u16;
        for i in 0..n {
            value |= self.bit()? << i;
        }
        Some(value)
    }

    fn align(&mut self) {
        self.position = self.position.div_ceil(8) * 8;
    }

    fn byte(&mut self) -> Option<u8> {
        let byte = *self.data.get(self.position / 8)?;
        self.position += 8;
        Some(byte)
    }
}

/// A canonical Huffman code: how many codes each length has, and the symbols in code order.
struct Huffman {
    counts: [u16; MAX_BITS + 1],
    symbols: Vec<u16>,
}

impl Huffman {
    /// The code with these code lengths (0: the symbol is unused); `None` if it is
    /// over-subscribed. An incomplete code is allowed (a stream may use a single distance).
    fn new(lengths: &[u8]) -> Option<Self> {
        let mut counts = [0u16; MAX_BITS + 1];
        for &len in lengths {
            *counts.get_mut(usize::from(len))? += 1;
        }
        counts[0] = 0;
        let mut left: i32 = 1;
        for &count in &counts[1..] {
            left = (left << 1) - i32::from(count);
            if left < 0 {
                return None;
            }
        }
        let mut offsets = [0u16; MAX_BITS + 2];
        for len in 1..=MAX_BITS {
            offsets[len + 1] = offsets[len] + counts[len];
        }
        let mut symbols = vec![0u16; usize::from(offsets[MAX_BITS + 1])];
        for (symbol, &len) in lengths.iter().enumerate() {
            if len > 0 {
                let slot = &mut offsets[usize::from(len)];
                symbols[usize::from(*slot)] = u16::try_from(symbol).ok()?;
                *slot += 1;
            }
        }
        Some(Self { counts, symbols })
    }

    /// The next symbol: codes are read one bit at a time, most significant first, and
    /// compared with the first code of each length.
    fn decode(&self, input: &mut BitReader<'_>) -> Option<u16> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for &count in &self.counts[1..] {
            code |= i32::from(input.bit()?);
            let count = i32::from(count);
            if code - first < count {
                return self
                    .symbols
                    .get(usize::try_from(index + code - first).ok()?)
                    .copied();
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        None
    }
}

struct Decoder<'a> {
    input: BitReader<'a>,
    window: &'a [u8],
    /// Which bytes of `window` a back-reference copied.
    used: Vec<bool>,
    out: Vec<u8>,
}

impl Decoder<'_> {
    /// Decodes until no later back-reference can reach the window (true if that is because
    /// the member's last block ended).
    fn run(&mut self) -> Option<bool> {
        loop {
            let last = self.input.bit()? == 1;
            match self.input.bits(2)? {
                0 => self.stored()?,
                1 => {
                    let (literals, distances) = fixed_codes()?;
                    self.codes(&literals, &distances)?;
                }
                2 => {
                    let (literals, distances) = self.dynamic_codes()?;
                    self.codes(&literals, &distances)?;
                }
                _ => return None,
            }
            if self.out.len() >= WINDOW {
                return Some(false);
            }
            if last {
                return Some(true);
            }
        }
    }

    fn stored(&mut self) -> Option<()> {
        self.input.align();
        let len = u16::from_le_bytes([self.input.byte()?, self.input.byte()?]);
        let nlen = u16::from_le_bytes([self.input.byte()?, self.input.byte()?]);
        if len != !nlen {
            return None;
        }
        for _ in 0..len {
            if self.out.len() >= WINDOW {
                // The rest of the block cannot refer back: stop here, done.
                return Some(());
            }
            self.out.push(self.input.byte()?);
        }
        Some(())
    }

    fn dynamic_codes(&mut self) -> Option<(Huffman, Huffman)> {
        let literals = usize::from(self.input.bits(5)?) + 257;
        let distances = usize::from(self.input.bits(5)?) + 1;
        let code_lengths = usize::from(self.input.bits(4)?) + 4;
        if literals > 286 || distances > 30 {
            return None;
        }
        let mut lengths = [0u8; 19];
        for &slot in &CODE_LENGTH_ORDER[..code_lengths] {
            lengths[slot] = self.input.bits(3)? as u8;
        }
        let code = Huffman::new(&lengths)?;
        let mut lengths = vec![0u8; literals + distances];
        let mut i = 0;
        while i < lengths.len() {
            let symbol = code.decode(&mut self.input)?;
            let (value, repeat) = match symbol {
                0..=15 => (symbol as u8, 1),
                16 => (*lengths.get(i.checked_sub(1)?)?, 3 + self.input.bits(2)?),
                17 => (0, 3 + self.input.bits(3)?),
                18 => (0, 11 + self.input.bits(7)?),
                _ => return None,
            };
            for _ in 0..repeat {
                *lengths.get_mut(i)? = value;
                i += 1;
            }
        }
        if lengths[256] == 0 {
            return None;
        }
        Some((
            Huffman::new(&lengths[..literals])?,
            Huffman::new(&lengths[literals..])?,
        ))
    }

    /// A compressed block's symbols, up to its end-of-block code or until the window is out
    /// of reach.
    fn codes(&mut self, literals: &Huffman, distances: &Huffman) -> Option<()> {
        loop {
            if self.out.len() >= WINDOW {
                return Some(());
            }
            let symbol = literals.decode(&mut self.input)?;
            match symbol {
                0..=255 => self.out.push(symbol as u8),
                256 => return Some(()),
                _ => {
                    let code = usize::from(symbol - 257);
                    let len = LENGTH_BASE.get(code)? + self.input.bits(*LENGTH_EXTRA.get(code)?)?;
                    let code = usize::from(distances.decode(&mut self.input)?);
                    let distance =
                        DISTANCE_BASE.get(code)? + self.input.bits(*DISTANCE_EXTRA.get(code)?)?;
                    self.copy(usize::from(len), usize::from(distance))?;
                }
            }
        }
    }

    /// A back-reference: `len` bytes from `distance` back, reaching into the window when
    /// the distance is longer than what was decoded so far.
    fn copy(&mut self, len: usize, distance: usize) -> Option<()> {
        for _ in 0..len {
            let at = self.out.len();
            let byte = if distance <= at {
                self.out[at - distance]
            } else {
                let back = distance - at;
                let index = self.window.len().checked_sub(back)?;
                self.used[index] = true;
                self.window[index]
            };
            self.out.push(byte);
        }
        Some(())
    }
}

fn fixed_codes() -> Option<(Huffman, Huffman)> {
    let mut lengths = [0u8; 288];
    lengths[..144].fill(8);
    lengths[144..256].fill(9);
    lengths[256..280].fill(7);
    lengths[280..].fill(8);
    Some((Huffman::new(&lengths)?, Huffman::new(&[5u8; 30])?))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use flate2::{Compression, write::DeflateEncoder};

    use super::*;

    /// Empty blocks take the bits asked for (mod 8), produce nothing, and what follows
    /// them inflates as it would alone, in zlib and in the decoder here.
    #[test]
    fn empty_blocks_align_and_produce_nothing() {
        let data = sample(5000, 3);
        for residue in 0..8 {
            let mut out = BitWriter::default();
            empty_blocks(&mut out, residue);
            let bits = out.out.len() as u32 * 8 + out.held;
            assert_eq!(bits % 8, residue, "residue {residue}");
            // Then a stored block, which starts at the next byte boundary: the
            // alignment is what it must survive.
            out.push(0b001, 3);
            let mut stream = out.finish();
            let len = data.len().min(65_535) as u16;
            stream.extend_from_slice(&len.to_le_bytes());
            stream.extend_from_slice(&(!len).to_le_bytes());
            stream.extend_from_slice(&data[..usize::from(len)]);
            assert_eq!(zlib(&[], &stream, data.len()), data, "residue {residue}");
            let window = vec![1u8; 64];
            let sparse = sparse_window(&window, &stream, 0, &data).expect("decoded alike");
            assert!(sparse.is_empty(), "nothing refers back");
        }
    }

    /// Deterministic bytes that repeat at long and short distances, as code and text do.
    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pick = (state >> 33) as usize;
            if out.len() > 300 && !pick.is_multiple_of(3) {
                let back = 1 + (pick >> 4) % out.len().min(30_000);
                let run = 3 + (pick >> 20) % 40;
                for _ in 0..run {
                    out.push(out[out.len() - back]);
                }
            } else {
                out.push(b'a' + (pick % 26) as u8);
            }
        }
        out.truncate(len);
        out
    }

    fn deflate(data: &[u8], level: u32) -> Vec<u8> {
        let mut encoder = DeflateEncoder::new(Vec::new(), Compression::new(level));
        encoder.write_all(data).expect("deflating into memory");
        encoder.finish().expect("deflating into memory")
    }

    /// Inflates `stream` with zlib, `window` as its dictionary.
    fn zlib(window: &[u8], stream: &[u8], len: usize) -> Vec<u8> {
        let mut inflate = super::super::inflate::RawInflate::new().expect("an inflater");
        inflate
            .set_dictionary(window)
            .expect("a dictionary zlib takes");
        let mut out = vec![0; len];
        let mut done = 0;
        let mut input = stream;
        while done < len {
            let step = inflate
                .inflate(input, &mut out[done..], false)
                .expect("zlib inflates the stream");
            assert!(step.consumed > 0 || step.produced > 0, "zlib stalled");
            input = &input[step.consumed..];
            done += step.produced;
        }
        out
    }

    /// A stream compressed with a dictionary: what a span after a checkpoint looks like.
    fn with_dictionary(window: &[u8], data: &[u8], level: u32) -> Vec<u8> {
        let mut compress = flate2::Compress::new(Compression::new(level), false);
        compress
            .set_dictionary(window)
            .expect("a dictionary zlib takes");
        let mut out = Vec::with_capacity(data.len() + 1024);
        compress
            .compress_vec(data, &mut out, flate2::FlushCompress::Finish)
            .expect("deflating into memory");
        out
    }

    #[test]
    fn a_sparse_window_inflates_to_the_same_bytes_and_is_mostly_zero() {
        for level in [1, 6, 9] {
            let all = sample(200_000, u64::from(level));
            let (window, data) = all.split_at(WINDOW);
            let stream = with_dictionary(window, data, level);
            let sparse = sparse_window(window, &stream, 0, data).expect("references found");
            assert!(sparse.len() <= window.len());
            assert_eq!(zlib(&sparse, &stream, data.len()), data, "level {level}");
            let tail = &window[window.len() - sparse.len()..];
            let kept = sparse
                .iter()
                .zip(tail)
                .filter(|(s, w)| s == w && **w != 0)
                .count();
            assert!(kept > 0, "the sample refers back into its window");
            assert!(
                kept < window.len() / 2,
                "level {level}: {kept} of {} window bytes kept",
                window.len()
            );
            // Zeroing one byte that is kept changes what zlib makes of the span: the kept
            // bytes are really referred to.
            let at = sparse.iter().position(|&b| b != 0).expect("a byte is kept");
            let mut broken = sparse.clone();
            broken[at] ^= 0xff;
            assert_ne!(zlib(&broken, &stream, data.len()), data);
        }
    }

    #[test]
    fn a_stream_that_is_not_what_zlib_made_keeps_the_whole_window() {
        let all = sample(120_000, 7);
        let (window, data) = all.split_at(WINDOW);
        let stream = with_dictionary(window, data, 6);
        let mut other = data.to_vec();
        other[100] ^= 1;
        assert_eq!(sparse_window(window, &stream, 0, &other), None);
        // Too few bytes of the stream to reach the end of the window's reach.
        assert_eq!(sparse_window(window, &stream[..100], 0, data), None);
        // Garbage never panics.
        for seed in 0..200u64 {
            let junk = sample(4096, seed);
            let _ = sparse_window(window, &junk, (seed % 8) as u8, data);
        }
    }

    #[test]
    fn stored_and_fixed_blocks_and_a_short_member_are_decoded() {
        let all = sample(WINDOW + 40_000, 3);
        let (window, data) = all.split_at(WINDOW);
        // Level 0: stored blocks, nothing refers back.
        let stream = with_dictionary(window, data, 0);
        let sparse = sparse_window(window, &stream, 0, data).expect("stored blocks decode");
        assert!(sparse.is_empty(), "nothing refers back: no window at all");
        // A member that ends before the window is out of reach.
        let short = &data[..5000];
        let stream = with_dictionary(window, short, 6);
        let sparse = sparse_window(window, &stream, 0, short).expect("a short member decodes");
        assert_eq!(zlib(&sparse, &stream, short.len()), short);
        // Fixed codes: a tiny stream deflate encodes without a table of its own.
        let stream = deflate(b"abcabcabcabcabc", 6);
        assert_eq!(
            sparse_window(&[], &stream, 0, b"abcabcabcabcabc"),
            Some(Vec::new())
        );
    }
}
