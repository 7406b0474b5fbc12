//! Learned prefetch: what a layer's first start on this node read becomes its prefetch list
//! for the next cold starts, with no new image.
//!
//! A layer with no prefetch list of its own (neither `imgstream convert --prefetch-from` nor
//! eStargz's prioritised files) is watched from its mount: from the first read of a reader
//! until reads have been quiet for [`QUIET`] (a start reads in one burst; a long-running
//! container's later reads are not its start), at most [`WINDOW`], every chunk readers asked
//! for is noted, once, in the order first asked. Then the list is written to the learned
//! directory under the layer's blob digest, as the blob offsets of those chunks. The next
//! time the layer is mounted with no chunk cached, the list is the layer's prefetch list
//! ([`super::prefetch`]): the start's chunks are on their way at PullImage, a few requests
//! at a time, before the container asks.
//!
//! The file is keyed by the layer's content digest, so it can only describe that layer;
//! still, it is read as untrusted: bounded in size, and offsets that are not the start of one
//! of the layer's chunks are dropped. When asked, lists are also shared through the image's
//! registry ([`share`]).

pub mod share;

use std::{
    collections::{HashMap, HashSet},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Fetcher, layer::RemoteLayer};
use crate::{oci::digest::Digest, shutdown::Shutdown};

/// Reads quiet this long end a start.
pub const QUIET: Duration = Duration::from_secs(2);
/// A start is watched at most this long.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Chunks a list holds at most (a TOC holds at most `estargz::MAX_ENTRIES` files).
const MAX_CHUNKS: usize = 1 << 20;
/// Largest list file read: more than [`MAX_CHUNKS`] offsets written as JSON.
pub(crate) const MAX_FILE_BYTES: u64 = 32 << 20;

/// One layer's learned list as stored (and as shared).
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    layer: Digest,
    /// Blob offsets of the chunks the start read, in the order it first read them.
    chunks: Vec<u64>,
}

/// Chunks readers asked for while a start is watched: (blob, blob offset), first ask first.
#[derive(Debug, Default)]
pub(super) struct Notes {
    seen: HashSet<(Digest, u64)>,
    order: Vec<(Digest, u64)>,
}

impl Notes {
    pub(super) fn note(&mut self, blob: Digest, offset: u64) {
        if self.order.len() < MAX_CHUNKS && self.seen.insert((blob, offset)) {
            self.order.push((blob, offset));
        }
    }
}

fn path(dir: &Path, layer: &Digest) -> PathBuf {
    dir.join(layer.hex())
}

/// Gives each layer without a prefetch list of its own the list learned for it, if there is
/// one in `dir`. Returns how many layers got one.
pub fn apply(layers: &mut [RemoteLayer], dir: &Path) -> usize {
    let mut applied = 0;
    for layer in layers.iter_mut().filter(|l| !has_own_list(l)) {
        match load(dir, layer) {
            Ok(Some(list)) if !list.is_empty() => {
                tracing::info!(
                    layer = %layer.desc.digest,
                    chunks = list.len(),
                    "prefetching what this layer's first start on this node read"
                );
                layer.index.prefetch = list;
                applied += 1;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, layer = %layer.desc.digest, dir = %dir.display(), "learned prefetch list unreadable; ignored");
            }
        }
    }
    applied
}

/// The layers with no list of their own and none learned in `dir`.
pub(crate) fn without_list(layers: &[RemoteLayer], dir: &Path) -> Vec<Digest> {
    layers
        .iter()
        .filter(|l| !has_own_list(l) && !path(dir, &l.desc.digest).exists())
        .map(|l| l.desc.digest)
        .collect()
}

fn has_own_list(layer: &RemoteLayer) -> bool {
    !layer.index.prefetch.is_empty() || layer.index.prefetch_end.is_some()
}

/// The learned list of `layer` as (node, chunk) indexes, if `dir` has one.
fn load(dir: &Path, layer: &RemoteLayer) -> io::Result<Option<Vec<(usize, usize)>>> {
    let path = path(dir, &layer.desc.digest);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display()),
        ));
    }
    let stored: Stored = serde_json::from_reader(io::BufReader::new(file))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if stored.layer != layer.desc.digest {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is the list of layer {}", path.display(), stored.layer),
        ));
    }
    let mut at: HashMap<u64, (usize, usize)> = HashMap::new();
    for (n, node) in layer.index.nodes.iter().enumerate() {
        for (c, chunk) in node.chunks.iter().enumerate() {
            at.entry(chunk.blob_offset).or_insert((n, c));
        }
    }
    Ok(Some(
        stored
            .chunks
            .iter()
            .take(MAX_CHUNKS)
            .filter_map(|offset| at.get(offset).copied())
            .collect(),
    ))
}

/// Starts watching the first start of the `layers` that have no list (own or learned) and
/// writes what it read to `dir` when it ends, unless a list for the layer arrived there in
/// the meantime (from the registry, or another mount); with `shared`, publishes it too.
/// `None` when every layer has a list.
pub fn spawn(
    fetcher: Arc<Fetcher>,
    layers: &[RemoteLayer],
    dir: PathBuf,
    shared: Option<share::Shared>,
    stop: Shutdown,
) -> Option<thread::JoinHandle<()>> {
    let blobs: Vec<Digest> = layers
        .iter()
        .filter(|l| !has_own_list(l))
        .map(|l| l.desc.digest)
        .collect();
    if blobs.is_empty() {
        return None;
    }
    let notes = Arc::new(Mutex::new(Notes::default()));
    fetcher.learn_into(notes.clone());
    let spawned = thread::Builder::new()
        .name("learn-prefetch".into())
        .spawn(move || {
            let begun = watch(&fetcher, &stop);
            fetcher.stop_learning();
            let Some(begun) = begun else { return };
            let notes = std::mem::take(&mut *crate::sync::lock(&notes));
            for blob in blobs {
                let chunks: Vec<u64> = notes
                    .order
                    .iter()
                    .filter(|(b, _)| *b == blob)
                    .map(|&(_, offset)| offset)
                    .collect();
                if chunks.is_empty() {
                    continue;
                }
                if path(&dir, &blob).exists() {
                    tracing::debug!(layer = %blob, "a list arrived while this start was watched; kept");
                    continue;
                }
                let stored = Stored {
                    layer: blob,
                    chunks,
                };
                match save(&dir, &stored) {
                    Ok(()) => tracing::info!(
                        layer = %blob,
                        chunks = stored.chunks.len(),
                        secs = begun.elapsed().as_secs_f32(),
                        "learned what this layer's start reads: its next cold starts prefetch it"
                    ),
                    Err(err) => {
                        tracing::warn!(%err, dir = %dir.display(), "learned prefetch list not written")
                    }
                }
                if let Some(shared) = shared.as_ref().filter(|s| s.sink.is_some()) {
                    publish(&fetcher, shared, &stored);
                }
            }
        });
    spawned
        .inspect_err(|err| tracing::warn!(%err, "no thread to learn the start's reads"))
        .ok()
}

/// How long publishing one list may take before it is given up.
const PUBLISH_WITHIN: Duration = Duration::from_secs(60);

fn publish(fetcher: &Fetcher, shared: &share::Shared, stored: &Stored) {
    let published = fetcher
        .runtime
        .block_on(async { tokio::time::timeout(PUBLISH_WITHIN, shared.publish(stored)).await });
    match published {
        Ok(Ok(Some(artifact))) => tracing::info!(
            layer = %stored.layer,
            %artifact,
            subject = %shared.subject.digest,
            "learned prefetch list published for other nodes"
        ),
        Ok(Ok(None)) => {}
        Ok(Err(err)) => {
            let err = crate::error_chain(&err);
            tracing::warn!(%err, layer = %stored.layer, "learned prefetch list not published");
        }
        Err(_) => tracing::warn!(
            layer = %stored.layer,
            secs = PUBLISH_WITHIN.as_secs(),
            "learned prefetch list not published in time"
        ),
    }
}

/// Waits for the first read, then for the reads to go quiet (or the window to pass).
/// Returns when the first read came, or `None` when stopped before any.
fn watch(fetcher: &Fetcher, stop: &Shutdown) -> Option<Instant> {
    let tick = Duration::from_millis(100);
    let mut begun = None;
    loop {
        if begun.is_none() && fetcher.readers_seen() {
            begun = Some(Instant::now());
        }
        if stop.is_triggered() {
            return begun;
        }
        if let Some(at) = begun
            && (at.elapsed() >= WINDOW || fetcher.readers_quiet_for(QUIET))
        {
            return begun;
        }
        thread::sleep(tick);
    }
}

fn save(dir: &Path, stored: &Stored) -> io::Result<()> {
    crate::private::own_dir(dir)?;
    let bytes = serde_json::to_vec(stored).map_err(io::Error::other)?;
    // Written aside and renamed: a reader never sees half a list.
    let path = path(dir, &stored.layer);
    let partial = path.with_extension("partial");
    crate::private::write(&partial, &bytes)?;
    std::fs::rename(&partial, &path)
}
