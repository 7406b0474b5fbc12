//! The OCI data model, as pure data: content digests, image references, manifests, indexes and
//! media types. No I/O and no knowledge of registries, layer formats or caches: `registry`,
//! `image`, `fetch` and everything above them use these types, and this module uses none of
//! theirs.

pub mod config;
pub mod digest;
pub mod manifest;
pub mod reference;
