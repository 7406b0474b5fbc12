//! Manifests and indexes as a registry might send them.
#![no_main]

use imgstream::oci::manifest::{Document, Platform, self};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for media_type in ["", manifest::OCI_MANIFEST, manifest::OCI_INDEX, manifest::DOCKER_LIST] {
        if let Ok(Document::Index(index)) = manifest::parse(data, media_type) {
            let _ = index.select(&Platform::host());
        }
    }
});
