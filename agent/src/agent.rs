//! `imgstream agent`: the long-running node agent. Today it runs the rename-ENXIO detector:
//! probes -> detector -> one log line and one JSON line per detection.

use std::{
    fs::OpenOptions,
    io::{self, Write},
};

use crate::{
    attribution::CgroupResolver,
    config::AgentConfig,
    detect::{Detector, Verdict},
    probes::{DropCounters, ProbeError, RenameProbes},
    shutdown::Shutdown,
};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("setting up the probes")]
    Probes(#[from] ProbeError),
    #[error("opening the detections file {0}")]
    OpenOutput(std::path::PathBuf, #[source] io::Error),
    #[error("writing a detection")]
    WriteOutput(#[source] io::Error),
    #[error("the probe loop panicked")]
    LoopPanicked,
}

/// Runs the agent until `shutdown` is triggered.
pub async fn run(config: AgentConfig, shutdown: Shutdown) -> Result<(), AgentError> {
    let out: Box<dyn Write + Send> = match &config.detections_out {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| AgentError::OpenOutput(path.clone(), e))?,
        ),
        None => Box::new(io::stdout()),
    };
    let probes = RenameProbes::attach()?;
    let cgroups = match CgroupResolver::discover() {
        Ok(resolver) => Some(resolver),
        Err(err) => {
            tracing::warn!(%err, "detections will carry no cgroup or container");
            None
        }
    };
    tokio::task::spawn_blocking(move || {
        probe_loop(probes, Detector::new(cgroups), out, &config, &shutdown)
    })
    .await
    .map_err(|_| AgentError::LoopPanicked)?
}

fn probe_loop(
    mut probes: RenameProbes,
    mut detector: Detector,
    mut out: Box<dyn Write + Send>,
    config: &AgentConfig,
    shutdown: &Shutdown,
) -> Result<(), AgentError> {
    let mut drops = DropCounters::default();
    tracing::info!("watching rename, renameat and renameat2 for ENXIO");
    while !shutdown.is_triggered() {
        for event in probes.next_batch(config.poll_interval)? {
            let failure = match event {
                Ok(failure) => failure,
                Err(err) => {
                    tracing::warn!(%err, "undecodable rename event skipped");
                    continue;
                }
            };
            match detector.judge(failure) {
                Verdict::Report(detection) => {
                    detection.log();
                    let line = serde_json::to_string(&detection).expect("detections serialize");
                    writeln!(out, "{line}")
                        .and_then(|()| out.flush())
                        .map_err(AgentError::WriteOutput)?;
                }
                Verdict::NotSymlink(kind) => {
                    tracing::debug!(?kind, "rename failed with ENXIO, but not on a symlink");
                }
            }
        }
        let now = probes.drops();
        if now != drops {
            tracing::warn!(?now, "the kernel side dropped events");
            drops = now;
        }
    }
    tracing::info!("probes detached");
    Ok(())
}
