//! The one shutdown token handed to every long-lived task. SIGINT and SIGTERM trigger it;
//! tasks finish their current step, clean up (detach probes, unmount) and return.

use tokio_util::sync::CancellationToken;

/// Cloneable shutdown signal: check it with [`Shutdown::is_triggered`] in blocking loops or
/// await [`Shutdown::triggered`] in async ones.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Blocks for `timeout` or until shutdown is triggered, whichever comes first; returns
    /// whether it was triggered. For threads outside the runtime (sleeps that must not hold
    /// a stopping download up).
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        let step = std::time::Duration::from_millis(20);
        loop {
            if self.is_triggered() {
                return true;
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(step));
        }
    }

    /// Completes once shutdown is triggered.
    pub async fn triggered(&self) {
        self.0.cancelled().await;
    }

    /// Triggers shutdown on the first SIGINT or SIGTERM.
    pub fn trigger_on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            this.trigger();
        });
        Ok(())
    }
}
