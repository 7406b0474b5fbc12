//! The eStargz footer and table of contents, as stargz-snapshotter's `docs/estargz.md` defines
//! them: the JSON as written, untrusted until `index` validates it into a `LayerIndex`.

use std::{borrow::Cow, collections::BTreeMap};

use serde::{Deserialize, Serialize};

use super::EstargzError;

/// Size of the eStargz footer at the end of a blob.
pub const FOOTER_SIZE: u64 = 51;
/// Name of the TOC's tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Landmark entry that ends the prioritised files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark entry of a layer without prioritised files.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Annotation on a layer descriptor holding the TOC's digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Annotation on a layer descriptor holding its uncompressed size.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// Largest compressed TOC member accepted.
pub const MAX_TOC_COMPRESSED: u64 = 64 << 20;
/// Largest decompressed TOC JSON accepted.
pub const MAX_TOC_JSON: u64 = 256 << 20;
/// Largest decompressed chunk accepted (whole chunks are verified in memory).
pub const MAX_CHUNK: u64 = 64 << 20;

/// The 51-byte footer pointing at the TOC: an empty gzip member with the offset in an
/// RFC 1952 extra field (`SG`, 22 bytes: 16 hex digits and "STARGZ").
pub fn footer_bytes(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut f = [0u8; FOOTER_SIZE as usize];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored deflate block, then CRC32 and ISIZE of nothing (both 0).
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

/// The TOC offset a footer names, or an error saying why these bytes are not one.
pub fn parse_footer(footer: &[u8]) -> Result<u64, EstargzError> {
    let not = |why: &'static str| EstargzError::NotEstargz(why);
    if footer.len() != FOOTER_SIZE as usize {
        return Err(not("the blob is shorter than an eStargz footer"));
    }
    if footer[..4] != [0x1f, 0x8b, 0x08, 0x04] {
        return Err(not(
            "the last 51 bytes are not a gzip header with an extra field",
        ));
    }
    if footer[10..16] != [26, 0, b'S', b'G', 22, 0] || &footer[32..38] != b"STARGZ" {
        return Err(not(
            "the footer's extra field is not an eStargz TOC pointer",
        ));
    }
    let hex = std::str::from_utf8(&footer[16..32]).map_err(|_| not("TOC offset is not hex"))?;
    u64::from_str_radix(hex, 16).map_err(|_| not("TOC offset is not hex"))
}

/// The TOC as serialised: field names follow the Go implementation. Parsed, its strings
/// borrow from the JSON where they can (a TOC of 10k entries holds 80k of them, whose
/// allocation and freeing were a third of its parse).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Toc<'a> {
    pub version: i64,
    #[serde(borrow)]
    pub entries: Vec<TocEntry<'a>>,
    /// imgstream's extension: the chunks a workload read as it started, in the order it first
    /// read them (recorded with `imgstream mount --record-reads`). Readers that do not know
    /// the field ignore it; imgstream fetches these chunks as soon as the layer is mounted.
    #[serde(
        rename = "imgstream.prefetch",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub prefetch: Vec<PrefetchChunk>,
}

/// One chunk of the prefetch list: the file and where the chunk starts in it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrefetchChunk {
    pub name: String,
    #[serde(rename = "chunkOffset", default)]
    pub chunk_offset: u64,
}

/// One TOC entry (a tar entry or a chunk of a regular file).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TocEntry<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, borrow, skip_serializing_if = "empty")]
    pub modtime: Cow<'a, str>,
    #[serde(rename = "linkName", default, borrow, skip_serializing_if = "empty")]
    pub link_name: Cow<'a, str>,
    #[serde(default)]
    pub mode: i64,
    #[serde(default)]
    pub uid: u64,
    #[serde(default)]
    pub gid: u64,
    #[serde(rename = "userName", default, borrow, skip_serializing_if = "empty")]
    pub user_name: Cow<'a, str>,
    #[serde(rename = "groupName", default, borrow, skip_serializing_if = "empty")]
    pub group_name: Cow<'a, str>,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero_i")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero_i")]
    pub dev_minor: i64,
    /// Values base64-encoded, as Go encodes `[]byte`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, borrow, skip_serializing_if = "empty")]
    pub digest: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub offset: i64,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero_i")]
    pub chunk_offset: i64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero_i")]
    pub chunk_size: i64,
    #[serde(rename = "chunkDigest", default, borrow, skip_serializing_if = "empty")]
    pub chunk_digest: Cow<'a, str>,
    /// zstd:chunked's: where the frames of a regular file's data end.
    #[serde(rename = "endOffset", default, skip_serializing_if = "is_zero_i")]
    pub end_offset: i64,
}

fn empty(s: &str) -> bool {
    s.is_empty()
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i(v: &i64) -> bool {
    *v == 0
}
