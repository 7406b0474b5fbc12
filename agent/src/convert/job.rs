//! `imgstream convert SRC DST` as a whole: both references opened, the cross-repository mount
//! decided, the layers staged in a scratch directory of its own (removed afterwards), and
//! progress bars on a terminal.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::{ConvertError, ConvertOptions, ConvertReport, ProgressFn};
use crate::{
    image::{estargz::WriterOptions, reads::RecordedRead},
    oci::{manifest::Platform, reference::ImageRef},
    registry::{http::HttpConfig, open_sink, open_source},
};

/// One conversion, as the command line asks for it.
#[derive(Clone, Debug)]
pub struct ConvertJob {
    pub src: ImageRef,
    pub dst: ImageRef,
    pub format: super::LayerFormat,
    pub writer: WriterOptions,
    /// Files to put first, in this order.
    pub prioritized: Vec<String>,
    /// Reads recorded while the workload started.
    pub reads: Vec<RecordedRead>,
    pub platform: Platform,
    /// A directory under which the job stages its layers in a directory of its own.
    pub scratch_parent: PathBuf,
    pub http: HttpConfig,
}

impl ConvertJob {
    /// Converts SRC into DST, with progress bars when standard error is a terminal.
    pub async fn run(self) -> Result<ConvertReport, ConvertError> {
        let source = open_source(&self.src, &self.http)?;
        let sink = open_sink(&self.dst, &self.http)?;
        let options = ConvertOptions {
            format: self.format,
            writer: self.writer,
            prioritized: self.prioritized,
            reads: self.reads,
            platform: self.platform,
            scratch: self
                .scratch_parent
                .join(format!("imgstream-convert-{}", std::process::id())),
            progress: terminal_progress(),
            mount_from: mount_from(&self.src, &self.dst),
        };
        let result = super::convert(
            source,
            self.src.manifest_reference().as_deref(),
            sink,
            self.dst.tag(),
            &options,
        )
        .await;
        let _ = std::fs::remove_dir_all(&options.scratch);
        result
    }
}

/// The repository layers can be mounted from instead of uploaded: SRC's, when DST is another
/// repository of the same registry.
fn mount_from(src: &ImageRef, dst: &ImageRef) -> Option<String> {
    match (src, dst) {
        (
            ImageRef::Registry {
                registry: a,
                repository,
                ..
            },
            ImageRef::Registry { registry: b, .. },
        ) if a == b => Some(repository.clone()),
        _ => None,
    }
}

/// One progress bar per layer, only when standard error is a terminal.
pub fn terminal_progress() -> Option<ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let multi = indicatif::MultiProgress::new();
    let bars = Mutex::new(BTreeMap::<usize, indicatif::ProgressBar>::new());
    let style = indicatif::ProgressStyle::with_template(
        "layer {prefix:>2} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    Some(Arc::new(move |layer, read, total| {
        let mut bars = crate::sync::lock(&bars);
        let bar = bars.entry(layer).or_insert_with(|| {
            let bar = multi.add(indicatif::ProgressBar::new(total));
            bar.set_style(style.clone());
            bar.set_prefix(layer.to_string());
            bar
        });
        bar.set_position(read);
        if read >= total {
            bar.finish();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_mounted_only_within_one_registry() {
        let r = |s: &str| ImageRef::parse(s).unwrap();
        assert_eq!(
            mount_from(&r("r:5000/a/src:1"), &r("r:5000/b/dst:1")),
            Some("a/src".into())
        );
        assert_eq!(mount_from(&r("r:5000/a/src:1"), &r("s:5000/a/src:2")), None);
        assert_eq!(mount_from(&r("oci:/tmp/x:1"), &r("r:5000/a:1")), None);
    }
}
