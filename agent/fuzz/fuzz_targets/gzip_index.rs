//! Encoded span indexes as a registry or a cache might hand them over.
//! The check is `imgstream::fuzzing::gzip_index`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::gzip_index, data);
});
