//! Manifests and indexes as a registry might send them.
//! The check is `imgstream::fuzzing::manifest`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::manifest, data);
});
