//! The layers' part of each pull, as the snapshotter sees it: from the first Prepare of a
//! layer of an image to the last of its layers mounted lazily or, unpacked by containerd,
//! committed. Without the CRI image proxy in kubelet's path, this is what a pod's timeline
//! has of the pull (`starts::pods`); it starts after containerd fetched the manifest and the
//! config, so it is a part of the pull, and is labelled as the snapshotter's.

use std::collections::VecDeque;

use super::LayersServed;
use crate::{starts::PullRecord, sync::lock};

/// A pull's span ends once no layer is in flight and none came for this long: containerd
/// prepares an image's layers one after another, each right after the one below.
const QUIET_NS: u64 = 2_000_000_000;

/// Spans remembered at most (they are in the pull log and the store too).
const SPANS: usize = 256;

/// What happened to a layer of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LayerEvent {
    /// Its Prepare arrived.
    Preparing,
    /// Mounted lazily.
    Mounted,
    /// Left to containerd to unpack: in flight until its Commit.
    Unpacking,
    /// Committed after containerd unpacked it.
    Committed,
}

#[derive(Clone, Debug)]
struct Span {
    image: String,
    start_ns: u64,
    end_ns: u64,
    /// Layers being unpacked by containerd.
    pending: u32,
    served: LayersServed,
}

/// The recent spans, by image.
#[derive(Debug, Default)]
pub(super) struct LayerSpans(std::sync::Mutex<VecDeque<Span>>);

impl LayerSpans {
    /// Notes `event` for a layer of `image` at `now_ns`; returns the span it belongs to, as a
    /// pull record (the source is `snapshotter`, no pod).
    pub(super) fn touch(&self, image: &str, event: LayerEvent, now_ns: u64) -> PullRecord {
        let mut spans = lock(&self.0);
        let open = spans.iter().rposition(|s| {
            s.image == image && (s.pending > 0 || now_ns <= s.end_ns.saturating_add(QUIET_NS))
        });
        let at = match open {
            Some(at) => at,
            None => {
                if spans.len() >= SPANS {
                    spans.pop_front();
                }
                spans.push_back(Span {
                    image: image.to_string(),
                    start_ns: now_ns,
                    end_ns: now_ns,
                    pending: 0,
                    served: LayersServed::default(),
                });
                spans.len() - 1
            }
        };
        let span = &mut spans[at];
        match event {
            LayerEvent::Preparing => {}
            LayerEvent::Mounted => span.served.lazy += 1,
            LayerEvent::Unpacking => {
                span.served.unpacked += 1;
                span.pending += 1;
            }
            LayerEvent::Committed => span.pending = span.pending.saturating_sub(1),
        }
        span.end_ns = span.end_ns.max(now_ns);
        PullRecord {
            start_ns: span.start_ns,
            end_ns: span.end_ns,
            image: span.image.clone(),
            pod: Default::default(),
            ok: true,
            served: (span.served != LayersServed::default())
                .then(|| span.served.kind().to_string()),
            source: Some(crate::starts::pods::FROM_SNAPSHOTTER.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_pull_spans_its_layers_until_the_last_commit_and_a_later_one_is_its_own() {
        let spans = LayerSpans::default();
        spans.touch("reg/app:1", LayerEvent::Preparing, 10 * S);
        spans.touch("reg/app:1", LayerEvent::Mounted, 11 * S);
        spans.touch("reg/app:1", LayerEvent::Preparing, 11 * S);
        spans.touch("reg/app:1", LayerEvent::Unpacking, 11 * S);
        // A long unpack: the span stays open while a layer is in flight.
        let other = spans.touch("reg/other:1", LayerEvent::Preparing, 20 * S);
        assert_eq!(other.start_ns, 20 * S, "another image is another span");
        let done = spans.touch("reg/app:1", LayerEvent::Committed, 40 * S);
        assert_eq!((done.start_ns, done.end_ns), (10 * S, 40 * S));
        assert_eq!(done.served.as_deref(), Some("partly-streamed"));
        assert_eq!(done.source.as_deref(), Some("snapshotter"));
        let again = spans.touch("reg/app:1", LayerEvent::Preparing, 43 * S);
        assert_eq!(
            again.start_ns,
            43 * S,
            "a pull after a quiet spell is a new one"
        );
        assert_eq!(again.served, None);
    }
}
