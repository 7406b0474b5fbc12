//! A whole blob: footer, TOC member (gzip, tar, JSON) and every chunk it points at.
//! The check is `imgstream::fuzzing::estargz_blob`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::estargz_blob, data);
});
