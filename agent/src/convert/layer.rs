//! One layer to eStargz: decompress, re-order prioritised files first, write.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    path::Path,
};

use flate2::read::MultiGzDecoder;

use crate::{
    image::{
        estargz::{
            EstargzWriter, LayerSummary, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME,
            WriterOptions, normalize,
        },
        tar::{Header, Kind, TarError, TarReader},
    },
    oci::{
        digest::{Digest, Hasher},
        manifest::{DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD},
    },
};

/// Errors converting one layer.
#[derive(Debug, thiserror::Error)]
pub enum ConvertLayerError {
    #[error("layer media type {0:?} is not supported (gzip or plain tar layers only)")]
    MediaType(String),
    #[error("reading the layer's tar stream")]
    Tar(#[from] TarError),
    #[error("staging the layer")]
    Io(#[from] io::Error),
}

/// Reports progress: bytes of the compressed input consumed so far.
pub type Progress<'a> = &'a dyn Fn(u64);

/// Counts the bytes read through it.
struct Counted<'a, R> {
    inner: R,
    read: u64,
    report: Progress<'a>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if n > 0 {
            (self.report)(self.read);
        }
        Ok(n)
    }
}

fn tar_stream<'a>(
    path: &Path,
    media_type: &str,
    report: Progress<'a>,
) -> Result<TarReader<Box<dyn Read + 'a>>, ConvertLayerError> {
    let file = Counted {
        inner: BufReader::with_capacity(1 << 20, File::open(path)?),
        read: 0,
        report,
    };
    let stream: Box<dyn Read + 'a> = match media_type {
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Box::new(MultiGzDecoder::new(file)),
        OCI_LAYER_ZSTD => Box::new(crate::image::zstd::decoder(BufReader::new(file))?),
        OCI_LAYER_TAR | "application/vnd.docker.image.rootfs.diff.tar" => Box::new(file),
        other => return Err(ConvertLayerError::MediaType(other.to_string())),
    };
    Ok(TarReader::new(stream))
}

/// What to put first in a converted layer, and what to prefetch.
#[derive(Clone, Debug, Default)]
pub struct LayerPlan {
    /// Entries to put first, in this order, before the prefetch landmark.
    pub prioritized: Vec<String>,
    /// Recorded reads, (path, offset, size) in the order they were made: the chunks they
    /// touch become the TOC's prefetch list.
    pub reads: Vec<(String, u64, u64)>,
}

/// Entries an eStargz layer carries for its readers, not for the image: an eStargz input
/// being converted again gets fresh ones.
fn is_estargz_bookkeeping(name: &str) -> bool {
    [TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&name)
}

/// Converts the layer blob at `input` (of `media_type`) into an eStargz blob at `output`.
/// Entries named in `plan.prioritized` (in that order) come first, followed by the prefetch
/// landmark; without any, the no-prefetch landmark comes first.
pub fn convert_layer(
    input: &Path,
    media_type: &str,
    output: &Path,
    options: WriterOptions,
    plan: &LayerPlan,
    report: Progress<'_>,
) -> Result<LayerSummary, ConvertLayerError> {
    let prioritized = &plan.prioritized;
    let wanted: HashMap<String, usize> = prioritized
        .iter()
        .enumerate()
        .filter_map(|(i, p)| normalize(p).ok().map(|p| (p, i)))
        .collect();
    let out = io::BufWriter::with_capacity(1 << 20, File::create(output)?);
    let mut writer = EstargzWriter::new(out, options);
    writer.prefetch_reads(plan.reads.iter().cloned());

    // Pass 1: set the prioritised entries aside (data spilled to a scratch file).
    let mut first: Vec<(usize, Header, u64)> = Vec::new();
    let spill_path = output.with_extension("prioritized");
    if !wanted.is_empty() {
        let mut spill = File::create(&spill_path)?;
        let mut offset = 0u64;
        let mut tar = tar_stream(input, media_type, &|_| {})?;
        while let Some(header) = tar.next_header()? {
            let name = normalize(&header.name).unwrap_or_default();
            // A hard link must follow its target, so it is never moved ahead.
            let Some(&rank) = wanted
                .get(&name)
                .filter(|_| header.kind != Kind::HardLink && !is_estargz_bookkeeping(&name))
            else {
                continue;
            };
            let copied = copy_data(&mut tar, &mut spill)?;
            first.push((rank, header, offset));
            offset += copied;
        }
        first.sort_by_key(|(rank, ..)| *rank);
    }
    if first.is_empty() {
        writer.append_landmark(false)?;
    } else {
        let mut spill = File::open(&spill_path)?;
        for (_, header, offset) in &first {
            spill.seek(SeekFrom::Start(*offset))?;
            writer.append(header, &mut (&mut spill).take(header.size))?;
        }
        writer.append_landmark(true)?;
    }
    let moved: std::collections::HashSet<String> = first
        .iter()
        .map(|(_, h, _)| normalize(&h.name).unwrap_or_default())
        .collect();

    // Pass 2: everything else, in the original order.
    let mut tar = tar_stream(input, media_type, report)?;
    while let Some(header) = tar.next_header()? {
        let name = normalize(&header.name).unwrap_or_default();
        if (moved.contains(&name) && header.kind != Kind::HardLink) || is_estargz_bookkeeping(&name)
        {
            continue;
        }
        let mut data = TarData { tar: &mut tar };
        writer.append(&header, &mut data)?;
    }
    let (mut out, summary) = writer.finish()?;
    out.flush()?;
    out.get_ref().sync_all()?;
    let _ = std::fs::remove_file(&spill_path);
    Ok(summary)
}

/// The current entry's data as a reader.
struct TarData<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for TarData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tar.read_data(buf).map_err(io::Error::other)
    }
}

fn copy_data<R: Read>(
    tar: &mut TarReader<R>,
    out: &mut impl Write,
) -> Result<u64, ConvertLayerError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = tar.read_data(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// The diff ID (digest of the decompressed content) of a gzip blob.
pub(super) fn diff_id_of_gzip(path: &Path) -> Result<Digest, ConvertLayerError> {
    let mut hasher = Hasher::new();
    io::copy(
        &mut MultiGzDecoder::new(BufReader::new(File::open(path)?)),
        &mut hasher,
    )?;
    Ok(hasher.finish())
}
