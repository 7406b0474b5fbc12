//! The image-serving half of `/metrics`: the fetch totals of every lazy layer, the chunk
//! cache, and virtio-fs backends. Counters are read at scrape time from the parts that keep
//! them; nothing is copied in between. Names follow Prometheus' conventions (base units,
//! `_total` on counters), and no label carries an image or pod (the series stay bounded).

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{cache::ChunkCache, fetch::FetchStats, fs::virtiofs::VirtioFsStats};

/// What the serving parts registered with the metrics.
#[derive(Debug, Default)]
pub(super) struct Serving {
    pub fetch: Arc<FetchStats>,
    pub cache: Option<Arc<ChunkCache>>,
    pub virtiofs: Option<Arc<VirtioFsStats>>,
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

impl Serving {
    pub(super) fn render(&self, out: &mut String) {
        let memory = crate::cache::budget::global();
        let pools = [("fetches", &memory.fetches), ("kept", &memory.kept)];
        let per_pool = |value: fn(&crate::cache::MemoryBudget) -> u64| {
            pools.map(|(pool, budget)| (format!("{{pool=\"{pool}\"}}"), value(budget)))
        };
        for (name, kind, help, values) in [
            (
                "imgstream_memory_budget_bytes",
                "gauge",
                "The process's memory budget for chunk data (--memory-budget), by pool: fetches in flight, chunks kept (recent, queued writes).",
                per_pool(|b| b.limit()),
            ),
            (
                "imgstream_memory_budget_used_bytes",
                "gauge",
                "Chunk bytes leased from the budget now, by pool.",
                per_pool(|b| b.used()),
            ),
            (
                "imgstream_memory_budget_peak_bytes",
                "gauge",
                "The most ever leased from the budget at once, by pool.",
                per_pool(|b| load(&b.stats.peak)),
            ),
            (
                "imgstream_memory_budget_waits_total",
                "counter",
                "Leases that waited for room, by pool.",
                per_pool(|b| load(&b.stats.waits)),
            ),
        ] {
            let samples: Vec<(&str, u64)> = values.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            family(out, name, kind, help, &samples);
        }
        let f = &self.fetch;
        let by_priority = |total: &AtomicU64, background: &AtomicU64, around: &AtomicU64| {
            let (background, around) = (load(background), load(around));
            [
                (
                    "{priority=\"on_demand\"}",
                    load(total)
                        .saturating_sub(background)
                        .saturating_sub(around),
                ),
                ("{priority=\"read_around\"}", around),
                ("{priority=\"background\"}", background),
            ]
        };
        family(
            out,
            "imgstream_fetch_requests_total",
            "counter",
            "Range requests sent to registries, by what they served (readers, guesses around readers' misses, or the background download).",
            &by_priority(&f.requests, &f.background_requests, &f.read_around_requests),
        );
        family(
            out,
            "imgstream_fetch_bytes_total",
            "counter",
            "Compressed bytes received from registries, by what they served.",
            &by_priority(&f.bytes, &f.background_bytes, &f.read_around_bytes),
        );
        for (name, help, counter) in [
            (
                "imgstream_fetch_chunks_total",
                "Chunks fetched from registries and verified.",
                &f.chunks_fetched,
            ),
            (
                "imgstream_fetch_cache_hits_total",
                "Chunks served from the cache (memory or disk) instead of a registry.",
                &f.cache_hits,
            ),
            (
                "imgstream_fetch_inflight_waits_total",
                "Reads that waited for a chunk another read was already fetching.",
                &f.merged,
            ),
            (
                "imgstream_fetch_deadline_exceeded_total",
                "Reads answered with EIO because their deadline passed.",
                &f.deadline_exceeded,
            ),
            (
                "imgstream_fetch_errors_total",
                "Range requests or chunks that failed (network, status, digest).",
                &f.errors,
            ),
        ] {
            family(out, name, "counter", help, &[("", load(counter))]);
        }
        let images = &crate::cri::image_proxy::IMAGES_PULLED;
        family(
            out,
            "imgstream_images_pulled_total",
            "counter",
            "Images pulled through the CRI image proxy whose layers the snapshotter prepared, by how those layers were served: all lazily, some, or none (unpacked by containerd).",
            &[
                ("{how=\"streamed\"}", load(&images.streamed)),
                ("{how=\"partly_streamed\"}", load(&images.partly_streamed)),
                ("{how=\"unpacked\"}", load(&images.unpacked)),
            ],
        );
        let layers = &crate::mount::LAYERS_OPENED;
        family(
            out,
            "imgstream_layers_opened_total",
            "counter",
            "Layers opened to be served, by how: eStargz or zstd:chunked (its TOC), a plain gzip layer through a span index, or downloaded whole (by a mount; unpacked by containerd for the snapshotter) and why, a lazy mount that failed (refused credentials, its deadline, or else) included.",
            &[
                ("{how=\"estargz\"}", load(&layers.estargz)),
                ("{how=\"zstd_chunked\"}", load(&layers.zstd_chunked)),
                ("{how=\"span_index\"}", load(&layers.span_index)),
                (
                    "{how=\"whole\",why=\"not_gzip\"}",
                    load(&layers.whole_not_gzip),
                ),
                (
                    "{how=\"whole\",why=\"no_index\"}",
                    load(&layers.whole_no_index),
                ),
                (
                    "{how=\"whole\",why=\"index_refused\"}",
                    load(&layers.whole_index_refused),
                ),
                (
                    "{how=\"whole\",why=\"lazy_mount_credentials\"}",
                    load(&layers.fallback_credentials),
                ),
                (
                    "{how=\"whole\",why=\"lazy_mount_deadline\"}",
                    load(&layers.fallback_deadline),
                ),
                (
                    "{how=\"whole\",why=\"lazy_mount_failed\"}",
                    load(&layers.fallback_other),
                ),
            ],
        );
        family(
            out,
            "imgstream_layers_verified_total",
            "counter",
            "Layers served through a span index that the background download read through and checked against their descriptors' digests: those that matched, and those quarantined (their reads fail).",
            &[
                ("{result=\"match\"}", load(&f.layers_verified)),
                ("{result=\"quarantined\"}", load(&f.layers_quarantined)),
            ],
        );
        let opens = &crate::fs::passthrough::TOTALS;
        family(
            out,
            "imgstream_fuse_opens_total",
            "counter",
            "Opens of image files on FUSE mounts, by the path their reads take: handed to a backing file (FUSE passthrough; the reads never reach the agent), or served by the agent.",
            &[
                ("{path=\"passthrough\"}", load(&opens.opens)),
                ("{path=\"agent\"}", load(&opens.cached_opens)),
            ],
        );
        family(
            out,
            "imgstream_backing_files_total",
            "counter",
            "Backing files for FUSE passthrough written from verified cached chunks, and those that could not be written or registered.",
            &[
                ("{result=\"written\"}", load(&opens.written)),
                ("{result=\"failed\"}", load(&opens.failed)),
            ],
        );
        family(
            out,
            "imgstream_dir_readahead_files_total",
            "counter",
            "Cached files asked into the page cache ahead of a reader going through their directory in listing order.",
            &[("", load(&crate::fs::ahead::FILES_TOTAL))],
        );
        family(
            out,
            "imgstream_fs_request_panics_total",
            "counter",
            "Filesystem requests (FUSE or virtio-fs) whose handling panicked; each was answered with EIO and its worker kept serving.",
            &[("", load(&crate::fs::REQUEST_PANICS))],
        );
        if let Some(cache) = &self.cache {
            let s = &cache.stats;
            family(
                out,
                "imgstream_cache_size_bytes",
                "gauge",
                "Bytes the chunk cache directory takes on disk (allocated blocks, as du counts them).",
                &[("", cache.usage())],
            );
            if let Some(limit) = cache.limit() {
                family(
                    out,
                    "imgstream_cache_limit_bytes",
                    "gauge",
                    "Most bytes the chunk cache directory may take on disk.",
                    &[("", limit)],
                );
            }
            for (name, help, counter) in [
                (
                    "imgstream_cache_hits_total",
                    "Chunk reads the cache answered.",
                    &s.hits,
                ),
                (
                    "imgstream_cache_misses_total",
                    "Chunk reads the cache could not answer.",
                    &s.misses,
                ),
                (
                    "imgstream_cache_writes_total",
                    "Entries written to the cache.",
                    &s.writes,
                ),
                (
                    "imgstream_cache_written_bytes_total",
                    "Bytes written to the cache.",
                    &s.bytes_written,
                ),
                (
                    "imgstream_cache_evicted_chunks_total",
                    "Chunks removed to make room.",
                    &s.evicted,
                ),
                (
                    "imgstream_cache_quarantined_chunks_total",
                    "Chunks that failed their crc32 check, moved aside and fetched again.",
                    &s.corrupt,
                ),
                (
                    "imgstream_cache_skipped_over_limit_total",
                    "Chunks not cached because the size limit left no room.",
                    &s.skipped_over_limit,
                ),
                (
                    "imgstream_cache_write_errors_total",
                    "Cache writes that failed.",
                    &s.write_errors,
                ),
            ] {
                family(out, name, "counter", help, &[("", load(counter))]);
            }
        }
        if let Some(v) = &self.virtiofs {
            for (name, help, counter) in [
                (
                    "imgstream_virtiofs_sessions_total",
                    "Guest connections accepted.",
                    &v.sessions,
                ),
                (
                    "imgstream_virtiofs_requests_total",
                    "Requests answered.",
                    &v.requests,
                ),
                (
                    "imgstream_virtiofs_bad_requests_total",
                    "Descriptor chains that could not be served (bad descriptors, malformed messages).",
                    &v.bad_requests,
                ),
                (
                    "imgstream_virtiofs_queue_full_total",
                    "Kicks that found a queue with as many requests in flight as its size: what the guest posted waited for room.",
                    &v.deferrals,
                ),
            ] {
                family(out, name, "counter", help, &[("", load(counter))]);
            }
            family(
                out,
                "imgstream_virtiofs_requests_in_flight",
                "gauge",
                "Requests taken off the guest's queues and not yet answered.",
                &[("", load(&v.in_flight))],
            );
        }
    }
}
