//! Just enough of ELF to know what the dynamic loader will read next: a shared object's or
//! executable's loadable segments, its dynamic section, and the libraries it needs
//! (`DT_NEEDED`) with the directories it names to find them (`DT_RUNPATH`, `DT_RPATH`).
//!
//! The bytes come from an image, so they are untrusted: every offset and count is checked
//! against the bytes at hand and bounded, and anything unexpected is `None` or left out,
//! never a panic. Only 64-bit little-endian objects are read (x86-64 and AArch64 images).

use std::ops::Range;

/// How an ELF file starts.
pub const MAGIC: &[u8; 4] = b"\x7fELF";
/// Program headers read at most (real objects have about a dozen).
const MAX_PHDRS: usize = 64;
/// Dynamic entries read at most (real objects have a few dozen).
pub const MAX_DYNAMIC_BYTES: u64 = 64 << 10;
/// Libraries taken from one object at most.
const MAX_NEEDED: usize = 256;
/// Longest name or search path taken from the string table.
pub const MAX_NAME: u64 = 4096;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_GNU_EH_FRAME: u32 = 0x6474_e550;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const ET_DYN: u16 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// A loadable segment: where it is in the file and in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub file_size: u64,
    pub vaddr: u64,
    pub writable: bool,
    /// Code (`PF_X`): what runs, page by page, as the object's constructors and callers do.
    pub executable: bool,
}

/// What an object's headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// `e_machine`.
    pub machine: u16,
    pub loads: Vec<Segment>,
    /// The dynamic section's bytes in the file (none: statically linked).
    pub dynamic: Option<Range<u64>>,
    /// A shared object that names no interpreter (`ET_DYN` without `PT_INTERP`): a library
    /// or a module a program opens, not a program (position-independent programs are
    /// `ET_DYN` too, but name their loader).
    pub library: bool,
    /// Where the interpreter's path (`PT_INTERP`, the dynamic loader the kernel starts) is in
    /// the file, when it is within the bytes parsed.
    pub interpreter: Option<Range<u64>>,
    /// Where the unwind tables start in the file (`PT_GNU_EH_FRAME`, `.eh_frame_hdr`):
    /// linkers put them, with `.eh_frame` and `.gcc_except_table`, after the constant data at
    /// the end of its read-only segment, and only an exception or a backtrace reads them.
    pub unwind: Option<u64>,
}

impl Object {
    /// Reads the ELF header and program headers from `head`, the file's first bytes. `None`
    /// for anything that is not a 64-bit little-endian ELF object whose program headers lie
    /// within `head`. Segments that would lie beyond the file's `file_bytes` are left out.
    pub fn parse(head: &[u8], file_bytes: u64) -> Option<Self> {
        if head.get(..4)? != MAGIC || *head.get(4)? != 2 || *head.get(5)? != 1 {
            return None;
        }
        let kind = u16_at(head, 16)?;
        let machine = u16_at(head, 18)?;
        let phoff = u64_at(head, 32)?;
        let phentsize = u64::from(u16_at(head, 54)?);
        let phnum = usize::from(u16_at(head, 56)?);
        if phentsize < 56 || phnum > MAX_PHDRS {
            return None;
        }
        let mut loads = Vec::new();
        let mut dynamic = None;
        let mut interpreter = false;
        let mut interpreter_at = None;
        let mut unwind = None;
        for i in 0..phnum as u64 {
            let at = usize::try_from(phoff.checked_add(i.checked_mul(phentsize)?)?).ok()?;
            let kind = u32_at(head, at)?;
            let flags = u32_at(head, at + 4)?;
            let offset = u64_at(head, at + 8)?;
            let vaddr = u64_at(head, at + 16)?;
            let file_size = u64_at(head, at + 32)?;
            let end = offset.checked_add(file_size)?;
            if end > file_bytes {
                // A segment beyond the file is no segment of it.
                continue;
            }
            match kind {
                PT_LOAD => loads.push(Segment {
                    offset,
                    file_size,
                    vaddr,
                    writable: flags & PF_W != 0,
                    executable: flags & PF_X != 0,
                }),
                PT_DYNAMIC if file_size > 0 => dynamic = Some(offset..end),
                PT_GNU_EH_FRAME => unwind = Some(offset),
                PT_INTERP => {
                    interpreter = true;
                    interpreter_at =
                        (end <= head.len() as u64 && file_size > 1).then_some(offset..end);
                }
                _ => {}
            }
        }
        Some(Self {
            machine,
            loads,
            dynamic,
            library: kind == ET_DYN && !interpreter,
            interpreter: interpreter_at,
            unwind,
        })
    }

    /// The bytes of `segment` a starting program may read: all of it, but for the unwind
    /// tables at its end when they are in it (after its start: a segment that would be only
    /// unwind tables is kept whole, as a layout this does not know).
    pub fn warm_part(&self, segment: &Segment) -> Range<u64> {
        let end = segment.offset + segment.file_size;
        match self.unwind {
            Some(at) if at > segment.offset && at < end => segment.offset..at,
            _ => segment.offset..end,
        }
    }

    /// The interpreter's path, from `head`, the bytes [`Object::parse`] read.
    pub fn interpreter_path<'h>(&self, head: &'h [u8]) -> Option<&'h str> {
        let range = self.interpreter.clone()?;
        let bytes =
            head.get(usize::try_from(range.start).ok()?..usize::try_from(range.end).ok()?)?;
        let path = bytes.split(|&b| b == 0).next()?;
        std::str::from_utf8(path).ok().filter(|p| !p.is_empty())
    }

    /// Where in the file the byte loaded at `vaddr` comes from.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.file_size)
            .map(|s| s.offset + (vaddr - s.vaddr))
    }

    /// The multiarch directory name of the object's machine (`x86_64-linux-gnu`), where
    /// Debian-style images keep their libraries.
    pub fn triplet(&self) -> Option<&'static str> {
        match self.machine {
            EM_X86_64 => Some("x86_64-linux-gnu"),
            EM_AARCH64 => Some("aarch64-linux-gnu"),
            _ => None,
        }
    }
}

/// What the dynamic section says about libraries: offsets into the string table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// `DT_NEEDED` names, as string table offsets, in order.
    pub needed: Vec<u64>,
    /// `DT_RUNPATH`, else `DT_RPATH`, as a string table offset.
    pub search: Option<u64>,
    /// The string table's address (`DT_STRTAB`) and size (`DT_STRSZ`).
    pub strtab: Option<(u64, u64)>,
}

impl Dynamic {
    /// Reads the entries of a dynamic section, up to its `DT_NULL`.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut out = Self::default();
        let (mut strtab, mut strsz, mut runpath, mut rpath) = (None, None, None, None);
        for entry in bytes
            .chunks_exact(16)
            .take((MAX_DYNAMIC_BYTES / 16) as usize)
        {
            let (Some(tag), Some(value)) = (u64_at(entry, 0), u64_at(entry, 8)) else {
                break;
            };
            match tag {
                DT_NULL => break,
                DT_NEEDED if out.needed.len() < MAX_NEEDED => out.needed.push(value),
                DT_STRTAB => strtab = Some(value),
                DT_STRSZ => strsz = Some(value),
                DT_RUNPATH => runpath = Some(value),
                DT_RPATH => rpath = Some(value),
                _ => {}
            }
        }
        out.search = runpath.or(rpath);
        out.strtab = strtab.zip(strsz);
        out
    }

    /// The span of the string table the names need, relative to its start: from the first
    /// name to the last one's end at most [`MAX_NAME`] later, within the table.
    pub fn names_span(&self) -> Option<Range<u64>> {
        let (_, size) = self.strtab?;
        let offsets = self.needed.iter().chain(&self.search);
        let start = *offsets.clone().min()?;
        let end = offsets.max()?.saturating_add(MAX_NAME).min(size);
        (start < end).then_some(start..end)
    }
}

/// The NUL-terminated string at `offset` of `table`, when it is UTF-8 and not too long.
pub fn string_at(table: &[u8], offset: u64) -> Option<&str> {
    let rest = table.get(usize::try_from(offset).ok()?..)?;
    let len = rest.iter().take(MAX_NAME as usize).position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..len])
        .ok()
        .filter(|s| !s.is_empty())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The libraries `path` needs, read the way the prefetch reads them: headers from the
    /// first 4 KiB, then the dynamic section, then the names.
    fn needed_of(path: &str) -> Vec<String> {
        let bytes = std::fs::read(path).expect("a binary of this machine");
        let object = Object::parse(&bytes[..4096], bytes.len() as u64).expect("an ELF object");
        let dynamic = object.dynamic.clone().expect("dynamically linked");
        let dynamic = Dynamic::parse(&bytes[dynamic.start as usize..dynamic.end as usize]);
        let (strtab, _) = dynamic.strtab.expect("a string table");
        let strtab = object.file_offset(strtab).expect("a loaded string table") as usize;
        dynamic
            .needed
            .iter()
            .map(|&n| {
                string_at(&bytes[strtab..], n)
                    .expect("a name in the table")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_libraries_a_real_binary_needs_are_what_readelf_lists() {
        for path in ["/usr/bin/ls", "/usr/bin/tar"] {
            let readelf = std::process::Command::new("readelf")
                .args(["-d", path])
                .output()
                .expect("readelf (binutils) is installed");
            let text = String::from_utf8_lossy(&readelf.stdout);
            let expected: Vec<String> = text
                .lines()
                .filter(|l| l.contains("(NEEDED)"))
                .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
                .collect();
            assert!(!expected.is_empty(), "{path}: readelf lists no library");
            assert_eq!(needed_of(path), expected, "{path}");
        }
    }

    #[test]
    fn libraries_are_told_from_programs_and_code_from_data_as_readelf_does() {
        for (path, library) in [
            ("/usr/bin/ls", false),
            ("/usr/lib/x86_64-linux-gnu/libz.so.1", true),
            ("/usr/lib/x86_64-linux-gnu/libselinux.so.1", true),
        ] {
            let bytes = std::fs::read(path).expect("a binary of this machine");
            let object = Object::parse(&bytes[..4096], bytes.len() as u64).expect("ELF");
            assert_eq!(object.library, library, "{path}");
            let readelf = std::process::Command::new("readelf")
                .args(["-lW", path])
                .output()
                .expect("readelf (binutils) is installed");
            // `LOAD off vaddr paddr filesz memsz flags align`, flags split in words.
            let expected: Vec<(u64, bool, bool)> = String::from_utf8_lossy(&readelf.stdout)
                .lines()
                .filter(|l| l.trim_start().starts_with("LOAD"))
                .map(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    let offset = u64::from_str_radix(words[1].trim_start_matches("0x"), 16)
                        .expect("a hex offset");
                    let flags = words[6..words.len() - 1].concat();
                    (offset, flags.contains('W'), flags.contains('E'))
                })
                .collect();
            let got: Vec<(u64, bool, bool)> = object
                .loads
                .iter()
                .map(|s| (s.offset, s.writable, s.executable))
                .collect();
            assert_eq!(got, expected, "{path}");
            assert!(got.iter().any(|&(_, _, code)| code), "{path} has code");
            // `[Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]`
            let interpreter = String::from_utf8_lossy(&readelf.stdout)
                .lines()
                .find_map(|l| {
                    let (_, path) = l.split_once("program interpreter: ")?;
                    Some(path.trim_end_matches(']').to_string())
                });
            assert_eq!(
                object.interpreter_path(&bytes[..4096]).map(str::to_string),
                interpreter,
                "{path}"
            );
            assert_eq!(interpreter.is_none(), library, "{path}");
        }
    }

    #[test]
    fn an_interpreter_path_out_of_the_head_or_unterminated_junk_is_none_or_bounded() {
        let mut head = std::fs::read("/usr/bin/ls").expect("this machine's ls")[..4096].to_vec();
        let object = Object::parse(&head, 1 << 20).expect("ELF");
        let range = object.interpreter.clone().expect("ls names its loader");
        // Not valid UTF-8: no path.
        head[range.start as usize] = 0xff;
        assert_eq!(object.interpreter_path(&head), None);
        // Parsed from fewer bytes than the path's end: not known.
        let short = &head[..range.start as usize + 2];
        let object = Object::parse(short, 1 << 20);
        assert!(object.is_none_or(|o| o.interpreter.is_none()));
    }

    #[test]
    fn what_is_not_a_64_bit_little_endian_object_is_none() {
        assert_eq!(Object::parse(b"", 0), None);
        assert_eq!(Object::parse(b"#!/bin/sh\n", 10), None);
        let mut head = std::fs::read("/usr/bin/ls").expect("this machine's ls")[..4096].to_vec();
        head[4] = 1; // 32-bit
        assert_eq!(Object::parse(&head, 1 << 20), None);
    }

    #[test]
    fn hostile_headers_and_sections_are_bounded_and_never_panic() {
        let real = std::fs::read("/usr/bin/ls").expect("this machine's ls");
        let size = real.len() as u64;
        let good = Object::parse(&real[..4096], size).expect("ls is ELF");
        // Truncated anywhere: program headers beyond the bytes at hand are no object.
        for cut in [0, 5, 20, 63, 64, 100, 200] {
            assert!(Object::parse(&real[..cut], size).is_none(), "cut at {cut}");
        }
        // Segments that claim to lie beyond the file are left out.
        assert!(
            Object::parse(&real[..4096], 100)
                .expect("ls is ELF")
                .loads
                .is_empty()
        );
        // Program header counts and offsets at their limits.
        let mut head = real[..4096].to_vec();
        head[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(Object::parse(&head, size), None);
        let mut head = real[..4096].to_vec();
        head[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Object::parse(&head, size), None);
        // Random bytes after the magic, many times: never a panic.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut head = real[..512].to_vec();
            for b in head.iter_mut().skip(4) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if state.is_multiple_of(7) {
                    *b = state as u8;
                }
            }
            if let Some(o) = Object::parse(&head, size) {
                let _ = o.file_offset(state);
            }
            let d = Dynamic::parse(&head);
            assert!(d.needed.len() <= MAX_NEEDED);
            let _ = d.names_span();
            let _ = string_at(&head, state % 600);
        }
        // A dynamic section with no end and too many entries stops at its bound.
        let endless: Vec<u8> =
            std::iter::repeat_n([1u64.to_le_bytes(), 7u64.to_le_bytes()], 10_000)
                .flatten()
                .flatten()
                .collect();
        assert_eq!(Dynamic::parse(&endless).needed.len(), MAX_NEEDED);
        assert!(good.dynamic.is_some());
        // A string with no end within the bound is no name.
        assert_eq!(string_at(&[b'a'; 5000], 0), None);
        assert_eq!(string_at(b"libc.so.6\0", 0), Some("libc.so.6"));
        assert_eq!(string_at(b"libc.so.6\0", 100), None);
    }

    #[test]
    fn a_segments_warm_part_stops_where_readelf_puts_the_unwind_tables() {
        for path in [
            "/usr/bin/ls",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
        ] {
            let bytes = std::fs::read(path).expect("a binary of this machine");
            let object = Object::parse(&bytes[..4096], bytes.len() as u64).expect("ELF");
            let readelf = std::process::Command::new("readelf")
                .args(["-SW", path])
                .output()
                .expect("readelf (binutils) is installed");
            // `[Nr] Name Type Address Off Size ...`: the unwind tables' file offset.
            let eh_frame_hdr = String::from_utf8_lossy(&readelf.stdout)
                .lines()
                .find_map(|l| {
                    let words: Vec<&str> = l.split(']').nth(1)?.split_whitespace().collect();
                    (words.first() == Some(&".eh_frame_hdr"))
                        .then(|| u64::from_str_radix(words[3], 16).expect("a hex offset"))
                })
                .expect("a Debian binary has unwind tables");
            assert_eq!(object.unwind, Some(eh_frame_hdr), "{path}");
            let constant = object
                .loads
                .iter()
                .find(|s| !s.writable && !s.executable && s.offset > 0)
                .expect("a read-only segment after the code");
            assert_eq!(
                object.warm_part(constant),
                constant.offset..eh_frame_hdr,
                "{path}"
            );
            // Segments without them are whole.
            for segment in object.loads.iter().filter(|s| s != &constant) {
                assert_eq!(
                    object.warm_part(segment),
                    segment.offset..segment.offset + segment.file_size
                );
            }
        }
        // Unwind tables claimed at a segment's very start, or outside it, trim nothing.
        let segment = Segment {
            offset: 4096,
            file_size: 8192,
            vaddr: 4096,
            writable: false,
            executable: false,
        };
        let mut object = Object::parse(
            &std::fs::read("/usr/bin/ls").expect("this machine's ls")[..4096],
            1 << 20,
        )
        .expect("ELF");
        for at in [0, 4096, 12288, u64::MAX] {
            object.unwind = Some(at);
            assert_eq!(object.warm_part(&segment), 4096..12288, "{at}");
        }
        object.unwind = Some(5000);
        assert_eq!(object.warm_part(&segment), 4096..5000);
        // A first segment holding the constant data and the tables (lld's layout) is trimmed
        // the same way.
        let first = Segment {
            offset: 0,
            vaddr: 0,
            ..segment
        };
        assert_eq!(object.warm_part(&first), 0..5000);
    }
}
