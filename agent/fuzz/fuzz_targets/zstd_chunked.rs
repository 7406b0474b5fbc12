//! zstd:chunked blobs as a registry might serve them: TOC and frames.
//! The check is `imgstream::fuzzing::zstd_chunked`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::zstd_chunked, data);
});
