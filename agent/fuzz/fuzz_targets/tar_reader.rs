//! Tar streams: every header and every byte of data, never more than the stream holds.
//! The check is `imgstream::fuzzing::tar_reader`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::tar_reader, data);
});
