//! Remote layers: eStargz layers read from a [`BlobSource`] by range. The footer, then the
//! TOC (checked against the layer descriptor's TOC digest annotation, and kept in the cache's
//! metadata), then only the chunks a read needs, each verified against its chunkDigest.
//! zstd:chunked layers the same way (their TOC found and checked through their annotations),
//! and plain gzip layers through a span index.
//! Adjacent chunks are fetched in one request. This sits above `registry`, `cache` and
//! `image`: it is where the three meet.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::{
    cache::ChunkCache,
    fetch::link::ASSUMED_RATE,
    image::estargz::{
        self, Chunk, EstargzError, FOOTER_SIZE, LayerIndex, Node, TOC_DIGEST_ANNOTATION,
    },
    image::{gzip::SpanIndex, zstd},
    oci::{
        digest::Digest,
        manifest::{Descriptor, is_gzip_layer, is_zstd_layer},
    },
    registry::{BlobSource, RegistryError},
};

/// Errors opening or reading a remote layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("fetching from {source_name}")]
    Fetch {
        source_name: String,
        #[source]
        source: RegistryError,
    },
    #[error(transparent)]
    Format(#[from] EstargzError),
    #[error("{path:?} is not a regular file in the layer")]
    NotAFile { path: String },
    #[error("{path:?} is not in the layer")]
    NoSuchFile { path: String },
    #[error(
        "the span index is of layer {indexed} ({indexed_size} bytes), not of {layer} ({size} bytes)"
    )]
    WrongIndex {
        layer: Digest,
        size: u64,
        indexed: Digest,
        indexed_size: u64,
    },
    #[error("the span index does not hold a valid layer")]
    Index(#[source] EstargzError),
}

/// An eStargz layer opened for random access.
#[derive(Debug, Clone)]
pub struct RemoteLayer {
    pub desc: Descriptor,
    pub index: LayerIndex,
    pub toc_digest: Digest,
    /// A plain gzip layer served through a span index (its chunks are spans), whose own
    /// digest is checked once the background download has read it through.
    pub indexed: bool,
    /// Every chunk as (node, chunk of that node), in blob order: built on first use.
    blob_order: OnceLock<Arc<[(u32, u32)]>>,
}

/// Bytes at most asked for at an eStargz layer's end at once: the footer and, for most layers,
/// all of the TOC before it (the bench's 140 MB layer of 8,984 files has a 476 KB TOC).
pub const TOC_TAIL: u64 = 512 << 10;

/// The bytes at an eStargz layer's end worth asking for beside its footer, `round_trip`
/// away: what the link carries in one round trip (at 100 Mbit/s, as read-around assumes
/// before it has measured the link), at most [`TOC_TAIL`]. Those bytes cost no more link
/// time than the round trip a second request for the TOC would wait, so a TOC within them
/// comes a round trip sooner, and one larger costs a request as before. With no round trip
/// to speak of, or none measured yet, only the footer is asked for.
pub fn tail_worth(round_trip: Option<std::time::Duration>) -> u64 {
    let carried = round_trip.map_or(0.0, |rtt| rtt.as_secs_f64() * ASSUMED_RATE);
    (carried as u64).clamp(FOOTER_SIZE, TOC_TAIL)
}

/// The bytes asked for at the end of an eStargz layer of `size` bytes `round_trip` away:
/// [`tail_worth`], and no more than 1/256 of the layer (at least 64 KiB) or the blob. A TOC
/// takes about 50 bytes per file compressed (the bench's layer: 0.34 % of it, its files
/// 16 KB each compressed on average), so what is fetched past a smaller TOC is a few tenths
/// of a percent of the layer at most.
pub fn toc_tail(size: u64, round_trip: Option<std::time::Duration>) -> u64 {
    tail_worth(round_trip)
        .min((size / 256).max(64 << 10))
        .min(size)
}

/// Opens an eStargz layer: one range request for its end (the footer, and on a link with a
/// round trip the TOC too, [`toc_tail`]), a second for the start of a TOC larger than that.
/// A layer that is not eStargz, or
/// whose descriptor lacks the TOC digest annotation (so its TOC could not be verified), is
/// reported as [`EstargzError::NotEstargz`]: read it whole instead.
pub async fn open(source: &dyn BlobSource, desc: &Descriptor) -> Result<RemoteLayer, LayerError> {
    open_cached(source, desc, None).await
}

/// [`open`], keeping the TOC in `cache` (under its digest, with its offset in front) so that
/// opening the layer again costs no request. A cached TOC is checked against the digest like
/// a fetched one.
pub async fn open_cached(
    source: &dyn BlobSource,
    desc: &Descriptor,
    cache: Option<&ChunkCache>,
) -> Result<RemoteLayer, LayerError> {
    open_cached_with_tail(source, desc, cache, None).await
}

/// [`open_cached`] with the blob's last bytes and its size already fetched (`tail`, from
/// [`BlobSource::read_tail`], asked beside the manifest): the footer found there saves its
/// round trip, and the part of the TOC there is not asked for again. A tail of another
/// size than the descriptor's blob is not used.
pub async fn open_cached_with_tail(
    source: &dyn BlobSource,
    desc: &Descriptor,
    cache: Option<&ChunkCache>,
    tail: Option<(bytes::Bytes, u64)>,
) -> Result<RemoteLayer, LayerError> {
    let fetch = |source_err| LayerError::Fetch {
        source_name: source.name(),
        source: source_err,
    };
    if let Some(toc) = zstd::toc_of(desc) {
        return open_zstd_chunked(source, desc, toc?, cache).await;
    }
    if is_zstd_layer(&desc.media_type) {
        return Err(EstargzError::NotEstargz("a zstd layer without a zstd:chunked TOC").into());
    }
    if !is_gzip_layer(&desc.media_type) {
        return Err(EstargzError::NotEstargz("the layer is not a gzip tar").into());
    }
    let Some(expected) = desc.annotations.get(TOC_DIGEST_ANNOTATION) else {
        return Err(EstargzError::NotEstargz("the descriptor has no TOC digest annotation").into());
    };
    let expected: Digest = expected.parse().map_err(|_| {
        EstargzError::BadToc(format!(
            "annotation {TOC_DIGEST_ANNOTATION} is not a digest"
        ))
    })?;
    if desc.size < FOOTER_SIZE {
        return Err(EstargzError::NotEstargz("the blob is shorter than an eStargz footer").into());
    }
    if let Some(cached) = cache.and_then(|c| c.get_toc(&expected).ok().flatten())
        && let Ok((index, toc_digest)) =
            estargz::read_toc(&cached.member, cached.offset, desc.size, Some(&expected))
    {
        return Ok(RemoteLayer::new(desc.clone(), index, toc_digest));
    }
    let fits = |tail: &Bytes| (FOOTER_SIZE..=desc.size).contains(&(tail.len() as u64));
    let tail = match tail {
        Some((tail, size)) if size == desc.size && fits(&tail) => tail,
        _ => source
            .read_range(
                &desc.digest,
                desc.size - toc_tail(desc.size, source.round_trip())..desc.size,
            )
            .await
            .map_err(fetch)?,
    };
    if !fits(&tail) {
        return Err(EstargzError::NotEstargz("the blob's end came back short").into());
    }
    // The blob offset of the tail's first byte.
    let tail_start = desc.size - tail.len() as u64;
    let toc_offset = estargz::parse_footer(&tail[tail.len() - FOOTER_SIZE as usize..])?;
    let toc_end = desc.size - FOOTER_SIZE;
    if toc_offset >= toc_end {
        return Err(
            EstargzError::BadToc(format!("TOC offset {toc_offset} lies beyond the blob")).into(),
        );
    }
    if toc_end - toc_offset > estargz::MAX_TOC_COMPRESSED {
        return Err(
            EstargzError::BadTocMember("larger than the compressed TOC limit".into()).into(),
        );
    }
    // Offsets within `tail` (both within it: tail_start <= toc_end < desc.size).
    let in_tail = |offset: u64| (offset - tail_start) as usize;
    let member = if toc_offset >= tail_start {
        tail.slice(in_tail(toc_offset)..in_tail(toc_end))
    } else {
        let head = source
            .read_range(&desc.digest, toc_offset..tail_start)
            .await
            .map_err(fetch)?;
        let mut member = Vec::with_capacity((toc_end - toc_offset) as usize);
        member.extend_from_slice(&head);
        member.extend_from_slice(&tail[..in_tail(toc_end)]);
        Bytes::from(member)
    };
    let (index, toc_digest) = estargz::read_toc(&member, toc_offset, desc.size, Some(&expected))?;
    if let Some(cache) = cache
        && let Err(err) = cache.put_toc(&expected, toc_offset, &member)
    {
        tracing::warn!(%err, "TOC not cached");
    }
    Ok(RemoteLayer::new(desc.clone(), index, toc_digest))
}

/// The digest `desc`'s TOC is cached under once opened: zstd:chunked's TOC checksum, or
/// eStargz's TOC digest annotation. `None` for a layer with neither (or a malformed one),
/// which [`open_cached`] does not open through a TOC.
pub fn toc_key(desc: &Descriptor) -> Option<Digest> {
    if let Some(toc) = zstd::toc_of(desc) {
        return toc.ok().map(|(_, checksum)| checksum);
    }
    if !is_gzip_layer(&desc.media_type) {
        return None;
    }
    desc.annotations.get(TOC_DIGEST_ANNOTATION)?.parse().ok()
}

/// Opens a zstd:chunked layer whose TOC is at `position` and hashes to `checksum` (both
/// from the descriptor's annotations): one range request, none when the TOC is cached.
async fn open_zstd_chunked(
    source: &dyn BlobSource,
    desc: &Descriptor,
    (position, checksum): (zstd::TocPosition, Digest),
    cache: Option<&ChunkCache>,
) -> Result<RemoteLayer, LayerError> {
    if let Some(cached) = cache.and_then(|c| c.get_toc(&checksum).ok().flatten())
        && cached.offset == position.offset
        && let Ok(index) = zstd::read_toc(&cached.member, &position, &checksum, desc.size)
    {
        return Ok(RemoteLayer::new(desc.clone(), index, checksum));
    }
    let member = source
        .read_range(
            &desc.digest,
            position.offset..position.offset + position.length,
        )
        .await
        .map_err(|source_err| LayerError::Fetch {
            source_name: source.name(),
            source: source_err,
        })?;
    let index = zstd::read_toc(&member, &position, &checksum, desc.size)?;
    if let Some(cache) = cache
        && let Err(err) = cache.put_toc(&checksum, position.offset, &member)
    {
        tracing::warn!(%err, "zstd:chunked TOC not cached");
    }
    Ok(RemoteLayer::new(desc.clone(), index, checksum))
}

/// Opens a plain gzip layer through its span index, `index` (decoded from bytes of digest
/// `index_digest`): no request at all. The index must have been built from this very blob;
/// each span is then checked against its digest as it is read.
pub fn open_indexed(
    desc: &Descriptor,
    index: &SpanIndex,
    index_digest: Digest,
) -> Result<RemoteLayer, LayerError> {
    if index.layer != desc.digest || index.compressed_size != desc.size {
        return Err(LayerError::WrongIndex {
            layer: desc.digest,
            size: desc.size,
            indexed: index.layer,
            indexed_size: index.compressed_size,
        });
    }
    let files = index.layer_index().map_err(LayerError::Index)?;
    Ok(RemoteLayer {
        indexed: true,
        ..RemoteLayer::new(desc.clone(), files, index_digest)
    })
}

impl RemoteLayer {
    pub fn new(desc: Descriptor, index: LayerIndex, toc_digest: Digest) -> Self {
        Self {
            desc,
            index,
            toc_digest,
            indexed: false,
            blob_order: OnceLock::new(),
        }
    }

    /// The chunks whose members lie within `from..to` of the blob, in blob order; a chunk
    /// that several files share (the same member) once.
    pub fn chunks_between(&self, from: u64, to: u64) -> Vec<&Chunk> {
        let order = self.blob_order.get_or_init(|| {
            let mut order: Vec<(u32, u32)> = self
                .index
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(n, node)| (0..node.chunks.len()).map(move |c| (n as u32, c as u32)))
                .collect();
            order
                .sort_by_key(|&(n, c)| self.index.nodes[n as usize].chunks[c as usize].blob_offset);
            order.into()
        });
        let chunk = |&(n, c): &(u32, u32)| &self.index.nodes[n as usize].chunks[c as usize];
        let first = order.partition_point(|e| chunk(e).blob_offset < from);
        let mut out: Vec<&Chunk> = Vec::new();
        for entry in &order[first..] {
            let c = chunk(entry);
            if c.blob_end > to {
                break;
            }
            if out
                .last()
                .is_none_or(|last| last.blob_offset != c.blob_offset)
            {
                out.push(c);
            }
        }
        out
    }

    /// The whole content of the regular file (or hard link) at `path`.
    pub async fn read_file(
        &self,
        source: &dyn BlobSource,
        path: &str,
    ) -> Result<Vec<u8>, LayerError> {
        let node = self
            .index
            .get(path)
            .ok_or_else(|| LayerError::NoSuchFile { path: path.into() })?;
        let node = self.index.data_node(node);
        if node.kind != estargz::NodeKind::Regular {
            return Err(LayerError::NotAFile { path: path.into() });
        }
        let mut out = Vec::with_capacity(node.size as usize);
        for chunk in self.read_chunks(source, node, 0..node.chunks.len()).await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// The bytes of chunks `which` of `node`, verified, fetching runs of adjacent chunks in
    /// one request.
    pub async fn read_chunks(
        &self,
        source: &dyn BlobSource,
        node: &Node,
        which: std::ops::Range<usize>,
    ) -> Result<Vec<Bytes>, LayerError> {
        let chunks = &node.chunks[which];
        let mut out = Vec::with_capacity(chunks.len());
        let mut i = 0;
        while i < chunks.len() {
            // Extend the run while the next chunk's member starts where this one's ends.
            let mut j = i;
            while j + 1 < chunks.len() && chunks[j + 1].follows(&chunks[j]) {
                j += 1;
            }
            let (start, end) = (chunks[i].blob_offset, chunks[j].blob_end);
            let fetch_err = |e| LayerError::Fetch {
                source_name: source.name(),
                source: e,
            };
            let wanted = super::windows::wanted(chunks[i..=j].iter(), None);
            let (bytes, windows) = tokio::join!(
                source.read_range(&self.desc.digest, start..end),
                super::windows::fetch(source, &wanted)
            );
            let (bytes, windows) = (bytes.map_err(fetch_err)?, windows.map_err(fetch_err)?);
            // Spans inflated so far, by where they end: the next one's window.
            let mut spans: Vec<(u64, Bytes)> = Vec::new();
            for chunk in &chunks[i..=j] {
                let member =
                    &bytes[(chunk.blob_offset - start) as usize..(chunk.blob_end - start) as usize];
                let unit = Bytes::from(estargz::decode_unit(
                    member,
                    chunk,
                    windows.window(chunk, &spans),
                )?);
                let part = chunk.slice(&unit).ok_or(EstargzError::BadChunk {
                    offset: chunk.blob_offset,
                    why: "shorter than the file's part of it".into(),
                })?;
                out.push(unit.slice_ref(part));
                if let Some(end) = super::windows::span_end(chunk) {
                    spans.push((end, unit));
                }
            }
            i = j + 1;
        }
        Ok(out)
    }
}
