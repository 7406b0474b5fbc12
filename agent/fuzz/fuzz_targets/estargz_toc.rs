//! A TOC as JSON, validated into a layer index: every accepted index must be consistent.
#![no_main]

use imgstream::image::estargz::{LayerIndex, NodeKind, Toc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(toc) = serde_json::from_slice::<Toc>(data) else { return };
    let Ok(index) = LayerIndex::from_toc(toc, 1 << 20, (1 << 20) + 51) else { return };
    for node in &index.nodes {
        assert!(!node.path.split('/').any(|p| p == ".." || p == "."), "{}", node.path);
        let mut expected = 0;
        for chunk in &node.chunks {
            assert_eq!(chunk.file_offset, expected);
            assert!(chunk.blob_offset < chunk.blob_end && chunk.blob_end <= index.toc_offset);
            expected += chunk.size;
        }
        if node.kind == NodeKind::Regular {
            assert_eq!(expected, node.size);
        }
        if let NodeKind::HardLink { target } = node.kind {
            assert!(!matches!(index.nodes[target].kind, NodeKind::HardLink { .. } | NodeKind::Directory));
        }
    }
});
