//! What each image fetched when: a bounded journal of the range requests the fetchers of
//! lazily mounted layers made, by image, so that a pod's timeline can say how many bytes
//! and requests its container's start waited on (`starts::CriticalPath`): those fetched
//! for readers (their misses and the read-around beside them) between the pod's start and
//! the container's first log line. The background download's requests are kept too, apart.
//!
//! Memory is bounded twice: [`ENTRIES`] requests (the oldest dropped first; a window that
//! reaches past the oldest kept is reported as unknown, not undercounted) and [`IMAGES`]
//! images.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use crate::{
    oci::{digest::Digest, manifest::Descriptor},
    registry::{BlobSource, FetchedManifest, RegistryError},
    sync::lock,
};

/// Requests kept at most: about 2.5 MB.
pub const ENTRIES: usize = 65_536;
/// Images kept at most.
pub const IMAGES: usize = 4096;

struct Entry {
    at_ns: u64,
    image: Arc<str>,
    bytes: u64,
    background: bool,
}

/// The layers of an image that imgstream serves, and when each was all cached.
#[derive(Default)]
struct ImageState {
    layers: u32,
    cached_at: Vec<u64>,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<Entry>,
    /// Time of the newest request dropped for room: windows from before it are unknown.
    dropped_until: Option<u64>,
    images: HashMap<Arc<str>, ImageState>,
    image_order: VecDeque<Arc<str>>,
}

/// The journal; one per agent, shared by every lazily mounted layer's fetcher.
#[derive(Default)]
pub struct FetchJournal(Mutex<Inner>);

impl std::fmt::Debug for FetchJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchJournal").finish_non_exhaustive()
    }
}

/// What an image fetched in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// For readers: their misses and the read-around.
    pub bytes: u64,
    pub requests: u64,
    /// By the background download.
    pub background_bytes: u64,
    pub background_requests: u64,
    /// Every layer of the image that imgstream serves was all cached at the window's end.
    pub fully_cached: bool,
}

impl FetchJournal {
    /// A layer of `image` is mounted lazily: the image's requests are journaled from now.
    pub fn layer_mounted(&self, image: &str) -> Arc<str> {
        let mut inner = lock(&self.0);
        if let Some(state) = inner.images.get_mut(image) {
            state.layers += 1;
        }
        if let Some((name, _)) = inner.images.get_key_value(image) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(image);
        if inner.images.len() >= IMAGES
            && let Some(oldest) = inner.image_order.pop_front()
        {
            inner.images.remove(&oldest);
        }
        inner.image_order.push_back(name.clone());
        inner.images.insert(
            name.clone(),
            ImageState {
                layers: 1,
                cached_at: Vec::new(),
            },
        );
        name
    }

    /// One range request of `image`'s, answered at `at_ns` with `bytes`.
    pub fn request(&self, image: &Arc<str>, at_ns: u64, bytes: u64, background: bool) {
        let mut inner = lock(&self.0);
        if inner.entries.len() >= ENTRIES
            && let Some(old) = inner.entries.pop_front()
        {
            inner.dropped_until = inner.dropped_until.max(Some(old.at_ns));
        }
        inner.entries.push_back(Entry {
            at_ns,
            image: image.clone(),
            bytes,
            background,
        });
    }

    /// A layer of `image` is all cached since `at_ns`.
    pub fn layer_cached(&self, image: &str, at_ns: u64) {
        if let Some(state) = lock(&self.0).images.get_mut(image) {
            state.cached_at.push(at_ns);
        }
    }

    /// What `image` fetched from `from_ns` to `to_ns`; `None` when imgstream serves no layer
    /// of it, or the window reaches back past what the journal still holds.
    pub fn window(&self, image: &str, from_ns: u64, to_ns: u64) -> Option<Fetched> {
        let inner = lock(&self.0);
        let state = inner.images.get(image)?;
        if inner.dropped_until.is_some_and(|t| t >= from_ns) {
            return None;
        }
        let mut fetched = Fetched {
            fully_cached: state.cached_at.len() as u32 >= state.layers
                && state.cached_at.iter().all(|&t| t <= to_ns),
            ..Default::default()
        };
        let first = inner.entries.partition_point(|e| e.at_ns < from_ns);
        for e in inner.entries.range(first..) {
            if e.at_ns > to_ns {
                continue;
            }
            if &*e.image != image {
                continue;
            }
            if e.background {
                fetched.background_bytes += e.bytes;
                fetched.background_requests += 1;
            } else {
                fetched.bytes += e.bytes;
                fetched.requests += 1;
            }
        }
        Some(fetched)
    }
}

/// A source whose answers are journaled as its image's while a layer is being opened (the
/// manifest, the footer and the TOC: requests the pull waits on). Once the layer is open,
/// [`Journaled::opened`] stops it: the fetcher journals its own requests from then on, by
/// whom they were for.
pub struct Journaled {
    inner: Arc<dyn BlobSource>,
    journal: Arc<FetchJournal>,
    image: Arc<str>,
    opening: std::sync::atomic::AtomicBool,
}

impl Journaled {
    pub fn new(inner: Arc<dyn BlobSource>, journal: Arc<FetchJournal>, image: &str) -> Self {
        Self {
            inner,
            journal,
            image: Arc::from(image),
            opening: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The layer is open: later requests are the fetcher's to journal.
    pub fn opened(&self) {
        self.opening
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn note(&self, bytes: u64) {
        if self.opening.load(std::sync::atomic::Ordering::Relaxed) {
            let now = crate::time::unix_ns(std::time::SystemTime::now());
            self.journal.request(&self.image, now, bytes, false);
        }
    }
}

#[async_trait::async_trait]
impl BlobSource for Journaled {
    async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let fetched = self.inner.manifest(reference).await?;
        self.note(fetched.bytes.len() as u64);
        Ok(fetched)
    }

    async fn blob(&self, desc: &Descriptor) -> Result<bytes::Bytes, RegistryError> {
        let blob = self.inner.blob(desc).await?;
        self.note(blob.len() as u64);
        Ok(blob)
    }

    async fn blob_to_file(
        &self,
        desc: &Descriptor,
        path: &std::path::Path,
    ) -> Result<(), RegistryError> {
        self.inner.blob_to_file(desc, path).await?;
        self.note(desc.size);
        Ok(())
    }

    async fn read_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, RegistryError> {
        let bytes = self.inner.read_range(digest, range).await?;
        self.note(bytes.len() as u64);
        Ok(bytes)
    }

    async fn preconnect(&self, n: usize) {
        self.inner.preconnect(n).await;
    }

    async fn read_tail(
        &self,
        digest: &Digest,
        len: u64,
    ) -> Result<Option<(bytes::Bytes, u64)>, RegistryError> {
        let tail = self.inner.read_tail(digest, len).await?;
        if let Some((bytes, _)) = &tail {
            self.note(bytes.len() as u64);
        }
        Ok(tail)
    }

    fn name(&self) -> String {
        self.inner.name()
    }

    fn round_trip(&self) -> Option<std::time::Duration> {
        self.inner.round_trip()
    }

    async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<bytes::Bytes>, RegistryError> {
        self.inner.referrers(subject, artifact_type).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_sums_its_images_requests_and_knows_when_it_cannot() {
        let journal = FetchJournal::default();
        let app = journal.layer_mounted("reg/app:1");
        let other = journal.layer_mounted("reg/other:1");
        journal.request(&app, 10, 100, false);
        journal.request(&app, 20, 1000, true);
        journal.request(&other, 25, 7, false);
        journal.request(&app, 30, 10, false);
        journal.request(&app, 50, 1, false);
        let w = journal
            .window("reg/app:1", 10, 40)
            .expect("the test's own setup");
        assert_eq!(
            (
                w.bytes,
                w.requests,
                w.background_bytes,
                w.background_requests
            ),
            (110, 2, 1000, 1)
        );
        assert!(!w.fully_cached);
        assert_eq!(
            journal.window("reg/unknown:1", 0, 100),
            None,
            "not served by imgstream"
        );
        journal.layer_cached("reg/app:1", 45);
        assert!(
            journal
                .window("reg/app:1", 0, 50)
                .expect("the test's own setup")
                .fully_cached
        );
        assert!(
            !journal
                .window("reg/app:1", 0, 44)
                .expect("the test's own setup")
                .fully_cached,
            "cached later"
        );
        for i in 0..ENTRIES as u64 {
            journal.request(&other, 100 + i, 1, false);
        }
        assert_eq!(
            journal.window("reg/app:1", 10, 40),
            None,
            "dropped: unknown, not zero"
        );
        assert!(journal.window("reg/other:1", 200, 300).is_some());
    }
}
