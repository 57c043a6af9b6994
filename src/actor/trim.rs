//! Handing the memory of passivated session actors back to the system (glibc's
//! `malloc_trim`; this is a policy, not a storage backend).
//! Owns the trim policy and the one `unsafe` call of the crate. Called by the supervisor
//! only; calls nothing else in the crate.
//!
//! A session actor caches its state, so a wave of sessions touched at once costs memory in
//! proportion to how many actors were live together. When they passivate, glibc's
//! allocator keeps the freed memory for reuse instead of returning it (freed chunks sit in
//! its per-thread arenas, mostly below the top of the heap, where its automatic trimming
//! never reaches), so an idle process would stay at the resident size of its busiest
//! moment. [`MemoryReturn`], kept by the supervisor, decides when a wave has passivated
//! far enough for a `malloc_trim` to be worth it and runs [`release_freed_memory`] on a
//! blocking thread. On every other platform the policy never fires and nothing is called.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Trim when the live session actors have fallen to this fraction (1/N) of their peak
/// since the last trim.
const FALL_TO_ONE_IN: usize = 8;

/// Session actors that must have ended since the last trim before another is worth it:
/// about 12 MiB at the ~12 KB that a live session with a 1 KB state holds.
const MIN_ENDED: usize = 1_024;

/// At most one trim this often: a trim walks every arena's free chunks, holding each
/// arena's lock while it does.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// What [`MemoryReturn::on_end`] and [`MemoryReturn::on_retry`] ask their caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing now.
    Nothing,
    /// Call [`MemoryReturn::trim`] now.
    TrimNow,
    /// A trim is due but rate-limited: call [`MemoryReturn::on_retry`] after this long
    /// (asked once until then; later ends re-decide anyway).
    RetryIn(Duration),
}

/// The policy: follows the number of live session actors and says when to trim.
#[derive(Debug)]
pub(crate) struct MemoryReturn {
    enabled: bool,
    /// Most live session actors since the last trim.
    peak: usize,
    /// Session actors ended since the last trim.
    ended: usize,
    last_trim: Option<Instant>,
    retry_scheduled: bool,
    in_flight: Arc<AtomicBool>,
}

impl MemoryReturn {
    /// A policy that fires only where [`release_freed_memory`] does something.
    pub(crate) fn new() -> Self {
        Self::with_enabled(TRIM_SUPPORTED)
    }

    fn with_enabled(enabled: bool) -> Self {
        MemoryReturn {
            enabled,
            peak: 0,
            ended: 0,
            last_trim: None,
            retry_scheduled: false,
            in_flight: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Records that a session actor was spawned; `live` counts it.
    pub(crate) fn on_spawn(&mut self, live: usize) {
        self.peak = self.peak.max(live);
    }

    /// Records that a session actor ended and says whether to trim; `live` no longer
    /// counts it.
    pub(crate) fn on_end(&mut self, live: usize, now: Instant) -> Decision {
        self.ended += 1;
        self.decide(live, now)
    }

    /// Re-decides after a [`Decision::RetryIn`] delay.
    pub(crate) fn on_retry(&mut self, live: usize, now: Instant) -> Decision {
        self.retry_scheduled = false;
        self.decide(live, now)
    }

    fn decide(&mut self, live: usize, now: Instant) -> Decision {
        if !self.enabled || self.ended < MIN_ENDED || live > self.peak / FALL_TO_ONE_IN {
            return Decision::Nothing;
        }
        let wait = match self.last_trim {
            Some(t) => MIN_INTERVAL.saturating_sub(now.saturating_duration_since(t)),
            None => Duration::ZERO,
        };
        // A trim still running counts as a recent one: two at once would only contend
        // for the same arena locks.
        let wait =
            if self.in_flight.load(Ordering::Acquire) { wait.max(MIN_INTERVAL / 4) } else { wait };
        if !wait.is_zero() {
            if self.retry_scheduled {
                return Decision::Nothing;
            }
            self.retry_scheduled = true;
            return Decision::RetryIn(wait);
        }
        self.peak = live;
        self.ended = 0;
        self.last_trim = Some(now);
        Decision::TrimNow
    }

    /// Runs the trim on a blocking thread (never on the caller's); `live`, the session
    /// actors still live, goes into its debug event.
    pub(crate) fn trim(&self, live: usize) {
        self.in_flight.store(true, Ordering::Release);
        let in_flight = self.in_flight.clone();
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let released = release_freed_memory();
            in_flight.store(false, Ordering::Release);
            tracing::debug!(
                live_session_actors = live,
                released,
                elapsed_us = start.elapsed().as_micros() as u64,
                "returned freed memory to the system after session actors passivated"
            );
        });
    }
}

/// Whether [`release_freed_memory`] does anything on this platform.
const TRIM_SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Returns free heap memory to the system (glibc's `malloc_trim(0)`: every arena's free
/// pages, not only the top of the heap). Returns whether any memory was released. Blocks
/// for a while on a large, fragmented heap: call it off the async runtime's threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn release_freed_memory() -> bool {
    // SAFETY: malloc_trim has no preconditions: it takes each arena's lock itself and may
    // be called from any thread at any time; it only gives back pages no chunk uses.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Does nothing: other allocators have their own policy for returning memory.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_freed_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wave of `peak` live actors, all of which end; returns the decisions.
    fn wave(p: &mut MemoryReturn, peak: usize, now: Instant) -> Vec<(usize, Decision)> {
        for live in 1..=peak {
            p.on_spawn(live);
        }
        (0..peak)
            .rev()
            .map(|live| (live, p.on_end(live, now)))
            .filter(|(_, d)| *d != Decision::Nothing)
            .collect()
    }

    #[test]
    fn trims_when_a_wave_has_fallen_to_an_eighth_and_again_for_the_rest_after_the_interval() {
        let t0 = Instant::now();
        let mut p = MemoryReturn::with_enabled(true);
        // At 1/8 of the peak of 10,000; then, once 1,024 more have ended and the live ones
        // are at 1/8 of the new peak of 1,250, the trim is due but rate-limited (one retry).
        assert_eq!(
            wave(&mut p, 10_000, t0),
            [(1_250, Decision::TrimNow), (156, Decision::RetryIn(MIN_INTERVAL))]
        );
        assert_eq!(p.on_retry(0, t0 + MIN_INTERVAL), Decision::TrimNow);
        assert_eq!(p.on_retry(0, t0 + MIN_INTERVAL * 2), Decision::Nothing, "nothing ended since");
    }

    #[test]
    fn small_waves_and_steady_load_never_trim() {
        let now = Instant::now();
        let mut p = MemoryReturn::with_enabled(true);
        assert!(wave(&mut p, MIN_ENDED - 1, now).is_empty());
        // Steady churn: 5,000 live, actors replaced one for one.
        let mut p = MemoryReturn::with_enabled(true);
        for live in 1..=5_000 {
            p.on_spawn(live);
        }
        for _ in 0..100_000 {
            assert_eq!(p.on_end(4_999, now), Decision::Nothing);
            p.on_spawn(5_000);
        }
    }

    #[test]
    fn a_disabled_policy_never_trims() {
        let mut p = MemoryReturn::with_enabled(false);
        assert!(wave(&mut p, 10_000, Instant::now()).is_empty());
    }

    #[test]
    fn release_freed_memory_can_be_called() {
        let v = vec![0u8; 1 << 20];
        drop(v);
        let _ = release_freed_memory();
    }
}
