//! A TOC as JSON, validated into a layer index: every accepted index must be consistent.
//! The check is `imgstream::fuzzing::estargz_toc`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::estargz_toc, data);
});
