//! Files of an image read as ELF programs, as the loader prefetch reads them.
//! The check is `imgstream::fuzzing::elf_object`, run on a tokio worker's 2 MiB stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgstream::fuzzing::on_worker_stack(imgstream::fuzzing::elf_object, data);
});
