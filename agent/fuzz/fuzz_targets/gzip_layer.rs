//! Plain gzip layers, indexed, and every span read back from its own bytes.
//! The check is `imgstream::fuzzing::gzip_layer`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::gzip_layer, data);
});
