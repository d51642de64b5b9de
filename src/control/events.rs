//! The node's lifecycle events (SPEC: `P2PInitializing`, `P2PConnected`, `P2PActive`,
//! `P2PDisconnected`, `P2PFailed`), rate-limited per reason so that a busy node cannot flood
//! the API server. They go to the log and, in a pod, to the pod's events (`kube.rs`) through a
//! bounded queue that drops rather than wait.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Initializing,
    Connected,
    Active,
    Disconnected,
    Failed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initializing => "P2PInitializing",
            Reason::Connected => "P2PConnected",
            Reason::Active => "P2PActive",
            Reason::Disconnected => "P2PDisconnected",
            Reason::Failed => "P2PFailed",
        }
    }

    pub fn is_warning(self) -> bool {
        matches!(self, Reason::Disconnected | Reason::Failed)
    }

    /// The shortest time between two events of this reason. Connected and Disconnected are state
    /// changes (0 ↔ some peers) and are never dropped: the pod's last event must tell its state.
    fn min_interval(self) -> Duration {
        match self {
            Reason::Active | Reason::Failed => Duration::from_secs(30),
            _ => Duration::ZERO,
        }
    }
}

#[derive(Default)]
pub struct Reporter {
    last: HashMap<Reason, Instant>,
    suppressed: HashMap<Reason, u64>,
    sink: Option<tokio::sync::mpsc::Sender<Published>>,
}

/// An event on its way to the API server, with whom to tell once it is published.
pub type Published = (Reason, String, Option<std::sync::mpsc::Sender<()>>);

impl Reporter {
    pub fn with_sink(sink: tokio::sync::mpsc::Sender<Published>) -> Self {
        Self { sink: Some(sink), ..Self::default() }
    }

    /// Reports a failure to start, bypassing the rate limit; `published` hears once it is out.
    pub fn report_fatal(&mut self, message: &str, published: std::sync::mpsc::Sender<()>) {
        tracing::error!(event = Reason::Failed.as_str(), "{message}");
        if let Some(sink) = &self.sink {
            let _ = sink.try_send((Reason::Failed, message.to_owned(), Some(published)));
        }
    }

    /// Reports an event unless one of the same reason went out too recently.
    pub fn report(&mut self, reason: Reason, message: &str) {
        let now = Instant::now();
        if let Some(t) = self.last.get(&reason) {
            if now.duration_since(*t) < reason.min_interval() {
                *self.suppressed.entry(reason).or_default() += 1;
                return;
            }
        }
        self.last.insert(reason, now);
        let also = self.suppressed.remove(&reason).unwrap_or(0);
        if reason.is_warning() {
            tracing::warn!(event = reason.as_str(), suppressed = also, "{message}");
        } else {
            tracing::info!(event = reason.as_str(), suppressed = also, "{message}");
        }
        if let Some(sink) = &self.sink {
            // Full means the API server is slow: drop, never wait.
            let _ = sink.try_send((reason, message.to_owned(), None));
        }
    }
}
