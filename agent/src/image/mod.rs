//! Images: what a registry or a local layout hands over, made safe to use. Owns content
//! digests, tar headers, and the eStargz format (footer, TOC, chunks, writing). Knows nothing
//! about where bytes come from (`registry`) or how files are served (`fs`).

pub mod digest;
pub mod estargz;
pub mod layer;
pub mod manifest;
pub mod reads;
pub mod tar;
