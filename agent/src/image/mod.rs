//! Layer formats, and only formats: tar headers, the eStargz footer, TOC, chunks and writer,
//! span indexes of plain gzip layers, zstd and zstd:chunked, the ELF headers that say which
//! libraries a program loads, and recorded reads turned into prefetch lists. Everything here
//! works on bytes handed in: nothing knows where they come from (`registry`), where they are
//! kept (`cache`) or how files are served (`fs`). Digests and manifests are `oci`'s.

pub mod elf;
pub mod estargz;
pub mod gzip;
pub mod reads;
pub mod tar;
pub mod zstd;
