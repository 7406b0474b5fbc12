//! Tar streams: every header and every byte of data, never more than the stream holds.
#![no_main]

use imgstream::image::tar::TarReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = TarReader::new(data);
    let mut buf = [0u8; 4096];
    let mut total = 0u64;
    while let Ok(Some(header)) = reader.next_header() {
        let _ = header;
        loop {
            match reader.read_data(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
    }
    assert!(total <= data.len() as u64);
});
