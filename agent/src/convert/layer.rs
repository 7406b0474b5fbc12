//! One layer to eStargz or zstd:chunked: decompress, re-order prioritised files first, write.

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
        zstd::{self, ChunkedOptions, ChunkedWriter, TocPosition},
    },
    oci::{
        digest::{Digest, Hasher},
        manifest::{DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD},
    },
};

/// Errors converting one layer.
#[derive(Debug, thiserror::Error)]
pub enum ConvertLayerError {
    #[error("layer media type {0:?} is not supported (gzip, zstd or plain tar layers only)")]
    MediaType(String),
    #[error("reading the layer's tar stream")]
    Tar(#[from] TarError),
    #[error("staging the layer")]
    Io(#[from] io::Error),
}

/// The format a layer is converted to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerFormat {
    /// eStargz: gzip members, readable by every runtime that reads gzip layers.
    #[default]
    Estargz,
    /// zstd:chunked, as containers/storage (podman, CRI-O) writes it.
    ZstdChunked,
}

impl std::str::FromStr for LayerFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "estargz" => Ok(Self::Estargz),
            "zstd:chunked" => Ok(Self::ZstdChunked),
            other => Err(format!("{other:?}: estargz or zstd:chunked")),
        }
    }
}

/// A converted layer: what it is, and for zstd:chunked where its TOC is.
#[derive(Clone, Debug)]
pub struct Converted {
    pub summary: LayerSummary,
    pub zstd_toc: Option<TocPosition>,
}

/// The writer of one format.
enum LayerWriter<W: Write> {
    Estargz(EstargzWriter<W>),
    ZstdChunked(ChunkedWriter<W>),
}

impl<W: Write> LayerWriter<W> {
    fn new(out: W, format: LayerFormat, options: WriterOptions) -> io::Result<Self> {
        Ok(match format {
            LayerFormat::Estargz => Self::Estargz(EstargzWriter::new(out, options)),
            LayerFormat::ZstdChunked => Self::ZstdChunked(ChunkedWriter::new(
                out,
                ChunkedOptions {
                    chunk_size: options.chunk_size,
                    ..Default::default()
                },
            )?),
        })
    }

    fn append(&mut self, header: &Header, data: &mut dyn Read) -> io::Result<()> {
        match self {
            Self::Estargz(w) => w.append(header, data),
            Self::ZstdChunked(w) => w.append(header, data),
        }
    }

    /// eStargz's landmark entries; zstd:chunked has none.
    fn append_landmark(&mut self, prioritised: bool) -> io::Result<()> {
        match self {
            Self::Estargz(w) => w.append_landmark(prioritised),
            Self::ZstdChunked(_) => Ok(()),
        }
    }

    fn prefetch_reads(&mut self, reads: impl IntoIterator<Item = (String, u64, u64)>) {
        match self {
            Self::Estargz(w) => w.prefetch_reads(reads),
            Self::ZstdChunked(w) => w.prefetch_reads(reads),
        }
    }

    fn finish(self) -> io::Result<(W, Converted)> {
        Ok(match self {
            Self::Estargz(w) => {
                let (out, summary) = w.finish()?;
                (
                    out,
                    Converted {
                        summary,
                        zstd_toc: None,
                    },
                )
            }
            Self::ZstdChunked(w) => {
                let (out, summary, position) = w.finish()?;
                (
                    out,
                    Converted {
                        summary,
                        zstd_toc: Some(position),
                    },
                )
            }
        })
    }
}

/// Reports progress: bytes of the compressed input consumed so far.
pub type Progress<'a> = &'a dyn Fn(u64);

/// Counts the bytes read through it, and reports the count.
pub(super) struct Counted<'a, R> {
    inner: R,
    read: u64,
    report: Progress<'a>,
}

impl<'a, R> Counted<'a, R> {
    pub(super) fn new(inner: R, report: Progress<'a>) -> Self {
        Self {
            inner,
            read: 0,
            report,
        }
    }
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
        OCI_LAYER_ZSTD => Box::new(zstd::decoder(BufReader::new(file))?),
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

/// Converts the layer blob at `input` (of `media_type`) into a blob of `format` at `output`.
/// Entries named in `plan.prioritized` (in that order) come first, followed (in eStargz) by
/// the prefetch landmark; without any, the no-prefetch landmark comes first.
pub fn convert_layer(
    input: &Path,
    media_type: &str,
    output: &Path,
    (format, options): (LayerFormat, WriterOptions),
    plan: &LayerPlan,
    report: Progress<'_>,
) -> Result<Converted, ConvertLayerError> {
    let prioritized = &plan.prioritized;
    let wanted: HashMap<String, usize> = prioritized
        .iter()
        .enumerate()
        .filter_map(|(i, p)| normalize(p).ok().map(|p| (p, i)))
        .collect();
    let out = io::BufWriter::with_capacity(1 << 20, File::create(output)?);
    let mut writer = LayerWriter::new(out, format, options)?;
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
    let (mut out, converted) = writer.finish()?;
    out.flush()?;
    out.get_ref().sync_all()?;
    let _ = std::fs::remove_file(&spill_path);
    Ok(converted)
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

/// The diff ID (digest of the decompressed content) of a layer blob of `media_type`.
pub(super) fn diff_id_of(path: &Path, media_type: &str) -> Result<Digest, ConvertLayerError> {
    let mut hasher = Hasher::new();
    let file = BufReader::new(File::open(path)?);
    if media_type == OCI_LAYER_ZSTD {
        io::copy(&mut zstd::decoder(file)?, &mut hasher)?;
    } else {
        io::copy(&mut MultiGzDecoder::new(file), &mut hasher)?;
    }
    Ok(hasher.finish())
}
