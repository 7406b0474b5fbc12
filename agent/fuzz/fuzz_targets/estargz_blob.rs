//! A whole blob: footer, TOC member (gzip, tar, JSON) and every chunk it points at.
#![no_main]

use imgstream::image::estargz::{self, FOOTER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < FOOTER_SIZE as usize {
        return;
    }
    let size = data.len() as u64;
    let Ok(toc_offset) = estargz::parse_footer(&data[data.len() - FOOTER_SIZE as usize..]) else { return };
    if toc_offset >= size - FOOTER_SIZE {
        return;
    }
    let member = &data[toc_offset as usize..(size - FOOTER_SIZE) as usize];
    let Ok((index, _)) = estargz::read_toc(member, toc_offset, size, None) else { return };
    for node in &index.nodes {
        for chunk in &node.chunks {
            let _ = estargz::decode_chunk(&data[chunk.blob_offset as usize..chunk.blob_end as usize], chunk);
        }
    }
});
