//! A span index as the [`LayerIndex`] the filesystem serves: the tar headers validated as
//! eStargz TOC entries are (paths, parents, duplicates, hard links, every cap), and each
//! file's data cut into chunks at span boundaries, each chunk naming its span as the unit to
//! fetch, decode and verify.

use std::sync::Arc;

use super::SpanIndex;
use crate::image::{
    estargz::{self, Chunk, EstargzError, LayerIndex, NodeKind, Toc, Unit},
    tar::Kind,
};

impl SpanIndex {
    /// The layer's files, their data in chunks of spans.
    pub fn layer_index(&self) -> Result<LayerIndex, EstargzError> {
        // Files go in with no data first: the TOC rules for data (chunks inside the blob,
        // before the TOC) are eStargz's, and spans replace them below.
        let toc = Toc {
            version: 1,
            entries: self
                .entries
                .iter()
                .map(|e| {
                    let mut entry = estargz::toc_entry(&e.header);
                    entry.size = 0;
                    entry
                })
                .collect(),
            prefetch: Vec::new(),
        };
        let end = self.compressed_size;
        let mut index = LayerIndex::from_toc(toc, end, end + estargz::FOOTER_SIZE)?;
        let starts: Vec<Arc<super::Checkpoint>> = self
            .spans
            .iter()
            .map(|s| Arc::new(s.start.clone()))
            .collect();
        for (i, entry) in self.entries.iter().enumerate() {
            let header = &entry.header;
            if header.kind != Kind::Regular || header.size == 0 {
                continue;
            }
            let bad = |why: &str| EstargzError::BadEntry {
                index: i,
                name: header.name.chars().take(256).collect(),
                why: why.into(),
            };
            let node = index
                .position(&header.name)
                .ok_or_else(|| bad("not in the index"))?;
            let data = entry.data_offset..entry.data_offset + header.size;
            let mut chunks = Vec::new();
            for s in self.spans_for(data.clone()) {
                let span = &self.spans[s];
                let span_start = span.start.uncompressed;
                let from = data.start.max(span_start);
                let to = data.end.min(span_start + span.len);
                let range = self.span_range(s).map_err(|e| bad(&e.to_string()))?;
                chunks.push(Chunk {
                    file_offset: from - data.start,
                    size: to - from,
                    blob_offset: range.start,
                    blob_end: range.end,
                    digest: span.digest,
                    unit: Unit::Span {
                        start: starts[s].clone(),
                        len: span.len,
                        offset: from - span_start,
                        before: self.window_before(s),
                    },
                });
            }
            let file = &mut index.nodes[node];
            if file.kind != NodeKind::Regular
                || chunks.iter().map(|c| c.size).sum::<u64>() != header.size
            {
                return Err(bad("its data is not covered by the spans"));
            }
            file.size = header.size;
            file.chunks = chunks;
        }
        Ok(index)
    }

    /// The span before span `s` (its digest and length), if its bytes hold all of `s`'s
    /// window: it ends where `s` starts, in the same gzip member, and is no shorter than the
    /// window `s` refers back to.
    fn window_before(&self, s: usize) -> Option<(crate::oci::digest::Digest, u64)> {
        let span = &self.spans[s];
        let prev = self.spans.get(s.checked_sub(1)?)?;
        let window = span.start.window.len() as u64;
        (!span.start.member
            && prev.start.uncompressed.checked_add(prev.len) == Some(span.start.uncompressed)
            && prev.len >= window)
            .then_some((prev.digest, prev.len))
    }
}
