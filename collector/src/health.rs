//! Whether the store can write, for `GET /readyz`.
//!
//! The store's writer thread reports every write transaction it attempts
//! (commits, directory and inventory updates, retention, and the probe it
//! makes while idle); `/readyz` reads the outcome. `/healthz` stays a
//! liveness check: a collector whose disk is full is alive, and restarting
//! it would not free the disk.

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A write that has not finished after this long makes the store not
/// ready (a disk that hangs, a lock held by another process).
pub const STUCK_AFTER: Duration = Duration::from_secs(3);

/// How long the writer may stay idle before a probe write checks that it
/// still can write.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The store's write health, shared by the writer thread and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// When the write in progress began.
    writing_since: Option<Instant>,
    /// When the last write ended.
    last_write: Option<Instant>,
    failure: Option<Failure>,
    /// The writer thread has ended (shutdown, or it died).
    stopped: bool,
}

/// What a write transaction was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Sidecars' batches: what acknowledgements wait for.
    Commit,
    /// The inventory, the pod directory, retention.
    Other,
    /// The idle writer's check that it can write.
    Probe,
}

#[derive(Debug, Clone)]
struct Failure {
    kind: WriteKind,
    error: String,
    since: Instant,
    since_unix_ns: u64,
    attempts: u64,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady {
        /// Why, in one sentence.
        reason: String,
        /// Since when (nanoseconds since the Unix epoch).
        since_unix_ns: u64,
    },
}

impl StoreHealth {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write transaction begins.
    pub fn writing(&self) {
        self.state().writing_since = Some(Instant::now());
    }

    /// The write transaction begun with [`StoreHealth::writing`] ended.
    ///
    /// A failed commit of batches is cleared only by a commit that
    /// succeeds, or by a probe (which runs only once nothing was written
    /// for [`PROBE_EVERY`]: a store whose sidecars are kept away while it
    /// is not ready must be able to become ready again); a small inventory
    /// update that succeeds says nothing about room for new events.
    pub fn wrote<E: Display>(&self, kind: WriteKind, outcome: Result<(), E>) {
        let mut state = self.state();
        state.writing_since = None;
        state.last_write = Some(Instant::now());
        match outcome {
            Ok(()) => {
                let clears = state.failure.as_ref().is_some_and(|failure| {
                    kind != WriteKind::Other || failure.kind == WriteKind::Other
                });
                if let Some(failure) = state.failure.take_if(|_| clears) {
                    tracing::info!(
                        "store: writes succeed again after failing for {:.1}s ({} failed attempts)",
                        failure.since.elapsed().as_secs_f64(),
                        failure.attempts
                    );
                }
            }
            Err(err) => {
                let error = err.to_string();
                match &mut state.failure {
                    Some(failure) => {
                        failure.attempts += 1;
                        failure.error = error;
                        failure.kind = kind;
                    }
                    None => {
                        state.failure = Some(Failure {
                            kind,
                            error,
                            since: Instant::now(),
                            since_unix_ns: crate::time::now_unix_nanos(),
                            attempts: 1,
                        });
                    }
                }
            }
        }
    }

    /// The writer thread has ended: nothing can be stored any more.
    pub fn stopped(&self) {
        let mut state = self.state();
        state.stopped = true;
        if state.failure.is_none() {
            state.failure = Some(Failure {
                kind: WriteKind::Other,
                error: "the store's writer has stopped".into(),
                since: Instant::now(),
                since_unix_ns: crate::time::now_unix_nanos(),
                attempts: 0,
            });
        }
    }

    /// How long the writer has had nothing to write (zero while writing).
    pub fn idle_for(&self) -> Duration {
        let state = self.state();
        match (state.writing_since, state.last_write) {
            (Some(_), _) => Duration::ZERO,
            (None, Some(last)) => last.elapsed(),
            (None, None) => Duration::MAX,
        }
    }

    pub fn readiness(&self) -> Readiness {
        let state = self.state();
        if let Some(failure) = &state.failure {
            let reason = if state.stopped {
                format!("the store's writer has stopped: {}", failure.error)
            } else {
                format!(
                    "the store cannot write: {} ({} failed attempts)",
                    failure.error, failure.attempts
                )
            };
            return Readiness::NotReady {
                reason,
                since_unix_ns: failure.since_unix_ns,
            };
        }
        if let Some(since) = state.writing_since {
            let running = since.elapsed();
            if running >= STUCK_AFTER {
                return Readiness::NotReady {
                    reason: format!(
                        "a write to the store has not finished after {:.1}s \
                         (a hung disk, or a lock held by another process)",
                        running.as_secs_f64()
                    ),
                    since_unix_ns: crate::time::now_unix_nanos()
                        .saturating_sub(running.as_nanos() as u64),
                };
            }
        }
        Readiness::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_makes_the_store_not_ready_until_one_succeeds() {
        let health = StoreHealth::new();
        assert_eq!(health.readiness(), Readiness::Ready);
        health.writing();
        health.wrote(WriteKind::Commit, Err("database or disk is full"));
        health.writing();
        health.wrote(WriteKind::Commit, Err("database or disk is full"));
        match health.readiness() {
            Readiness::NotReady { reason, .. } => assert!(
                reason.contains("database or disk is full") && reason.contains("2 failed"),
                "{reason}"
            ),
            Readiness::Ready => panic!("ready after failed writes"),
        }
        // An inventory update in place says nothing about room for events.
        health.writing();
        health.wrote(WriteKind::Other, Ok::<(), String>(()));
        assert!(matches!(health.readiness(), Readiness::NotReady { .. }));
        health.writing();
        health.wrote(WriteKind::Commit, Ok::<(), String>(()));
        assert_eq!(health.readiness(), Readiness::Ready);
        // The idle probe clears any failure.
        health.writing();
        health.wrote(WriteKind::Other, Err("disk I/O error"));
        health.writing();
        health.wrote(WriteKind::Probe, Ok::<(), String>(()));
        assert_eq!(health.readiness(), Readiness::Ready);
        health.stopped();
        assert!(matches!(health.readiness(), Readiness::NotReady { .. }));
    }
}
