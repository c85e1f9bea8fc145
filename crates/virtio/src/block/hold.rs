//! Interrupt moderation: a worker that has handed chains back waits a moment, with the queue's
//! notifications off, for the driver's next request, and serves it before raising one
//! interrupt for all of them.
//!
//! Each interrupt costs a virtio-mmio guest two exits to the VMM (it reads the interrupt status
//! and acknowledges it) besides its injection. Linux's driver asks for an interrupt at the next
//! completion every time it has handled one, so a device that completes each request as it
//! comes settles into one interrupt per request, however many the guest keeps in flight. A
//! short hold lets the requests the guest is still making join the same interrupt.
//!
//! A hold costs latency when nothing comes, so the worker holds only where the driver shows
//! that it keeps making requests while others are in flight:
//! - the call began while the driver had yet to take the last interrupt (where the transport
//!   can tell, [`VirtioInterrupt::queue_interrupt_pending`]): the driver made a request
//!   without waiting for it;
//! - or holds have caught requests lately: after a call whose holds caught one, the next
//!   [`CREDIT`] calls whose holds all run out still hold.
//!
//! Neither shows a guest whose threads each keep one request in flight but run only after it
//! took the last interrupt: from the device, it looks like a driver with one request in flight.
//! So a worker without either sign still holds once in a while, to find out: a probe, at most
//! once every [`PROBE_INTERVAL`], looked for once every [`PROBE_CALLS`] calls. A probe that
//! catches a request starts the holds as any hold does.
//!
//! A driver with one request in flight, or one that makes a batch of requests available and
//! then waits for all of them, takes each interrupt before its next request: its requests are
//! held only by the probes, at most one hold per [`PROBE_INTERVAL`].
//!
//! A hold spins: the gaps it waits for are microseconds, shorter than a timer's slack. It lasts
//! at most twice the longest wait that caught a request lately, and never more than the
//! worker's most ([`MAX_INTERRUPT_HOLD`] unless set with
//! [`BlockWorker::with_interrupt_hold`](super::BlockWorker::with_interrupt_hold)). A hold
//! follows only a pass, or a batch of completions, that handed chains back since the last
//! hold, so a driver cannot make the worker spin more than that most per request it makes,
//! and a call serves at most [`MAX_BATCH`](super::MAX_BATCH) chains. Nothing is held between
//! calls: a call returns with its interrupt raised, so pausing, saving or resetting the device
//! has nothing to flush.

use std::time::Duration;

use ember_rate_limiter::Clock;
use vm_memory::GuestMemory;

#[cfg(doc)]
use crate::VirtioInterrupt;
use crate::queue::{self, Rings};

/// The longest a block worker holds its interrupt by default: 200 µs.
pub const MAX_INTERRUPT_HOLD: Duration = Duration::from_micros(200);

/// The shortest a hold lasts once holding pays, in nanoseconds: a driver's requests a few
/// hundred nanoseconds apart still get a margin.
const MIN_HOLD_NS: u64 = 10_000;

/// How many calls whose holds all ran out a worker still holds in, after a call whose holds
/// caught a request: a guest that keeps requests in flight sometimes takes longer than a hold
/// between two of them, and one such gap should not end its holds.
pub const CREDIT: u32 = 4;

/// The least time between two probes: holds made without a sign that the driver has several
/// requests in flight, to find one that does. A driver that never has cost at most one hold
/// per interval: 1% of the time at the default most.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// How many calls without a sign of several requests in flight a worker makes between two
/// looks at the clock for a probe: a call that cannot probe costs no clock reading.
pub const PROBE_CALLS: u32 = 64;

/// When a worker holds its interrupt, and for how long.
#[derive(Debug)]
pub(super) struct Hold {
    /// The most any hold lasts, in nanoseconds; 0 when the worker never holds.
    max: u64,
    /// The most the next hold lasts, in nanoseconds: twice the longest wait that caught a
    /// request in the last call that held, within `MIN_HOLD_NS` and `max`; it falls by at most
    /// an eighth per call, since a hold cut short costs an interrupt.
    limit: u64,
    /// How many more calls whose holds all run out still hold without other signs: [`CREDIT`]
    /// after a call whose holds caught a request, one less after each that caught none.
    credit: u32,
    /// Calls that had no sign of several requests in flight since the clock was last looked
    /// at for a probe.
    without_sign: u32,
    /// When the last probe began, in nanoseconds on the worker's clock; `None` before the
    /// first.
    probed_at: Option<u64>,
}

impl Hold {
    /// Holds of at most `max` (none for zero).
    pub(super) fn new(max: Duration) -> Self {
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Hold {
            max,
            limit: max,
            credit: 0,
            without_sign: 0,
            probed_at: None,
        }
    }

    /// How long a call's holds last at most, in nanoseconds, when the call began with the
    /// driver's last interrupt `pending`; `None` when the call raises its interrupt at once.
    /// A call asks once, after its first pass that handed chains back; without a sign of
    /// several requests in flight, it probes when one is due on `clock`.
    pub(super) fn limit<C: Clock>(&mut self, pending: bool, clock: &C) -> Option<u64> {
        if self.max == 0 {
            return None;
        }
        if pending || self.credit > 0 {
            return Some(self.limit);
        }
        self.without_sign += 1;
        if self.without_sign < PROBE_CALLS {
            return None;
        }
        self.without_sign = 0;
        let now = clock.now();
        let interval = u64::try_from(PROBE_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        if self
            .probed_at
            .is_some_and(|at| now.saturating_sub(at) < interval)
        {
            return None;
        }
        self.probed_at = Some(now);
        Some(self.limit)
    }

    /// Records what a call's holds came to: the longest wait that caught a request, or `None`
    /// when every hold ran out.
    pub(super) fn record(&mut self, caught: Option<u64>) {
        let Some(waited) = caught else {
            self.credit = self.credit.saturating_sub(1);
            return;
        };
        self.credit = CREDIT;
        let floor = MIN_HOLD_NS.min(self.max);
        self.limit = waited
            .saturating_mul(2)
            .max(self.limit - self.limit / 8)
            .clamp(floor, self.max);
    }
}

/// Waits until the driver makes a chain available in `rings` or `limit` nanoseconds on `clock`
/// have passed, spinning; returns how long it waited for a chain, or `None` if none came. It
/// also stops after `limit` looks at the ring, each of which takes longer than a nanosecond,
/// so that a clock that stands still (a test's) cannot keep it spinning.
///
/// # Errors
///
/// As [`Rings::avail_idx`].
pub(super) fn wait_for_chain<M: GuestMemory, C: Clock>(
    rings: &Rings<'_, '_, M>,
    clock: &C,
    limit: u64,
) -> Result<Option<u64>, queue::Error> {
    let next = rings.queue().next_avail();
    let start = clock.now();
    let mut waited = 0;
    let mut looks = 0u64;
    loop {
        if rings.avail_idx()? != next {
            return Ok(Some(waited));
        }
        looks += 1;
        if waited >= limit || looks > limit {
            return Ok(None);
        }
        std::hint::spin_loop();
        waited = clock.now().saturating_sub(start);
    }
}

#[cfg(test)]
mod tests {
    use ember_rate_limiter::ManualClock;

    use super::*;

    const MAX: u64 = 200_000;

    fn hold() -> Hold {
        Hold::new(Duration::from_nanos(MAX))
    }

    /// The limit of a hold in a call that began with no interrupt pending, on a clock that
    /// stands still.
    fn unsignalled(hold: &mut Hold) -> Option<u64> {
        hold.limit(false, &ManualClock::new(0))
    }

    #[test]
    fn a_driver_that_waits_for_each_interrupt_is_held_only_by_probes() {
        let mut hold = hold();
        assert_eq!(unsignalled(&mut hold), None);
        // Even after holds that ran out.
        hold.record(None);
        assert_eq!(unsignalled(&mut hold), None);
        for _ in 3..PROBE_CALLS {
            assert_eq!(unsignalled(&mut hold), None);
        }
        assert_eq!(unsignalled(&mut hold), Some(MAX), "the first probe");
        hold.record(None);
        for _ in 0..10 * PROBE_CALLS {
            assert_eq!(unsignalled(&mut hold), None, "no other before the interval");
        }
    }

    #[test]
    fn probes_come_at_most_once_per_interval_and_every_probe_calls() {
        let mut hold = hold();
        let clock = ManualClock::new(0);
        let interval = u64::try_from(PROBE_INTERVAL.as_nanos()).unwrap();
        // Calls 1 us apart for 100 intervals, each probe catching nothing.
        let calls = 100 * interval / 1000;
        let mut probes = Vec::new();
        for call in 0..calls {
            clock.set(call * 1000);
            if hold.limit(false, &clock).is_some() {
                probes.push(call);
                hold.record(None);
            }
        }
        assert_eq!(probes.len(), 100, "one per interval");
        for pair in probes.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap * 1000 >= interval && gap * 1000 < interval + u64::from(PROBE_CALLS) * 1000,
                "{gap} calls apart"
            );
        }
        // Calls an interval apart probe once every PROBE_CALLS calls.
        let mut probes = 0;
        for call in 0..10 * u64::from(PROBE_CALLS) {
            clock.set(calls * 1000 + call * interval);
            if hold.limit(false, &clock).is_some() {
                probes += 1;
                hold.record(None);
            }
        }
        assert_eq!(probes, 10);
    }

    #[test]
    fn a_probe_that_catches_a_request_starts_the_holds() {
        let mut hold = hold();
        for _ in 1..PROBE_CALLS {
            assert_eq!(unsignalled(&mut hold), None);
        }
        assert_eq!(unsignalled(&mut hold), Some(MAX));
        hold.record(Some(100_000));
        for _ in 0..CREDIT {
            assert_eq!(unsignalled(&mut hold), Some(MAX));
            hold.record(None);
        }
        assert_eq!(unsignalled(&mut hold), None);
    }

    #[test]
    fn a_request_made_before_the_last_interrupt_was_taken_is_held_up_to_the_most() {
        let mut hold = hold();
        assert_eq!(hold.limit(true, &ManualClock::new(0)), Some(MAX));
        hold.record(None);
        assert_eq!(
            hold.limit(true, &ManualClock::new(0)),
            Some(MAX),
            "whatever the holds before came to"
        );
    }

    #[test]
    fn holds_go_on_for_a_few_calls_after_one_caught_a_request() {
        let mut hold = hold();
        hold.record(Some(150_000));
        for _ in 0..CREDIT {
            assert_eq!(
                unsignalled(&mut hold),
                Some(MAX),
                "twice 150 us, within the most"
            );
            hold.record(None);
        }
        assert_eq!(
            unsignalled(&mut hold),
            None,
            "calls whose holds ran out end them"
        );
        hold.record(Some(150_000));
        assert_eq!(
            unsignalled(&mut hold),
            Some(MAX),
            "until one catches a request again"
        );
    }

    #[test]
    fn the_limit_follows_the_longest_wait_that_caught_a_request() {
        let mut hold = hold();
        hold.record(Some(30_000));
        assert_eq!(
            unsignalled(&mut hold),
            Some(175_000),
            "it falls by an eighth at most"
        );
        hold.record(Some(30_000));
        assert_eq!(unsignalled(&mut hold), Some(153_125));
        for _ in 0..30 {
            hold.record(Some(30_000));
        }
        assert_eq!(
            unsignalled(&mut hold),
            Some(60_000),
            "twice the wait that paid"
        );
        for _ in 0..30 {
            hold.record(Some(0));
        }
        assert_eq!(
            unsignalled(&mut hold),
            Some(MIN_HOLD_NS),
            "never below the floor"
        );
        hold.record(None);
        assert_eq!(
            unsignalled(&mut hold),
            Some(MIN_HOLD_NS),
            "holds that ran out keep it"
        );
        hold.record(Some(80_000));
        assert_eq!(
            unsignalled(&mut hold),
            Some(160_000),
            "it grows back at once"
        );
        hold.record(Some(u64::MAX));
        assert_eq!(unsignalled(&mut hold), Some(MAX), "never above the most");
    }

    #[test]
    fn a_hold_ends_even_on_a_clock_that_stands_still() {
        let mem = crate::mock::guest_memory(0x10000).unwrap();
        let driver = crate::mock::MockDriver::new(16, vm_memory::GuestAddress(0));
        let mut queue = driver.queue();
        queue.validate(&mem).unwrap();
        let rings = queue.rings(&mem);
        let clock = ManualClock::new(0);
        assert_eq!(wait_for_chain(&rings, &clock, 1000).unwrap(), None);
    }

    #[test]
    fn a_zero_most_never_holds() {
        let mut hold = Hold::new(Duration::ZERO);
        assert_eq!(hold.limit(true, &ManualClock::new(0)), None);
        hold.record(Some(5));
        assert_eq!(hold.limit(true, &ManualClock::new(0)), None);
    }

    #[test]
    fn a_most_below_the_floor_bounds_every_hold() {
        let mut hold = Hold::new(Duration::from_nanos(2_000));
        for _ in 0..30 {
            hold.record(Some(0));
        }
        assert_eq!(unsignalled(&mut hold), Some(2_000));
    }
}
