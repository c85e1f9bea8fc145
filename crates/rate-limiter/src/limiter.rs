//! The rate limiter a device owns: a bandwidth bucket, an operations bucket and a timerfd.
//!
//! A device asks [`RateLimiter::consume`] before each request, once for its bytes and once for
//! the operation. When a bucket cannot pay, the request waits: the limiter is blocked, refuses
//! every consume, and has armed its timerfd for the moment the tokens the request needs are back.
//! The device stops working its queue, and its event loop, which watches the timerfd, calls
//! [`RateLimiter::event_handler`] when it fires and works the queue again.
//!
//! # The timer
//!
//! Firecracker arms its rate limiter's timer for a fixed 100 ms after every failed consume. ember
//! arms it for the exact time until the failed request's tokens are back, which the bucket works
//! out in its exact arithmetic, rounded up to the nanosecond. That is correct because the time is
//! counted from a reading of `CLOCK_MONOTONIC` taken before the timer is armed, and the timerfd
//! counts on the same clock: when it expires the bucket holds the tokens, unless something else
//! took them meanwhile, and then the retry fails and arms the timer again. It is better in two
//! ways: a 1500-byte packet that is 150 µs short waits 150 µs, not 100 ms; and a bucket smaller
//! than 100 ms of its own rate, which a fixed period would leave idle for part of each period
//! (holding the device below its configured rate), is drained exactly as fast as it refills.
//!
//! A request larger than its bucket goes through when the bucket is full and leaves the bucket in
//! debt (see [`BucketReduction::OverConsumption`]). Firecracker blocks the whole limiter for the
//! time the debt takes to repay. ember keeps the debt in the bucket instead: the next consume of
//! that kind waits for the debt and its own tokens with one timer, and the other kind is not
//! held up. The average rate is the same.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use crate::bucket::{BucketConfig, BucketReduction, TokenBucket, TokenBucketState};
use crate::clock::{Clock, MonotonicClock};

/// The longest the timer is armed for at once: about 136 years, well inside what
/// `timerfd_settime` accepts. A longer wait wakes the device, whose retry arms the timer again.
const MAX_TIMER_DELAY: Duration = Duration::from_secs(u32::MAX as u64);

/// The shortest the timer is armed for: a zero delay would disarm it instead.
const MIN_TIMER_DELAY: Duration = Duration::from_nanos(1);

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The timerfd could not be created.
    #[error("Cannot create the rate limiter's timerfd")]
    CreateTimer(#[source] io::Error),
    /// The timerfd could not be made non-blocking.
    #[error("Cannot make the rate limiter's timerfd non-blocking")]
    NonBlockingTimer(#[source] io::Error),
    /// [`RateLimiter::event_handler`] was called while the timer had not expired.
    #[error("The rate limiter's timer has not expired")]
    SpuriousEvent,
    /// The timerfd could not be read.
    #[error("Cannot read the rate limiter's timerfd")]
    ReadTimer(#[source] io::Error),
    /// A saved bucket's state is not one a bucket can be in.
    #[error("The saved state of a token bucket is invalid: {0}")]
    InvalidState(String),
}

/// The result type of the rate limiter.
pub type Result<T> = std::result::Result<T, Error>;

/// The kind of tokens a consume takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Bytes, from the bandwidth bucket.
    Bytes,
    /// Operations (requests, packets), from the operations bucket.
    Ops,
}

/// A change to one of a rate limiter's buckets, for [`RateLimiter::update_buckets`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Keep the bucket as it is, tokens and burst included.
    None,
    /// Remove the bucket: no limit on that kind of tokens.
    Disabled,
    /// Replace the bucket with this one.
    Update(TokenBucket),
}

impl From<BucketConfig> for BucketUpdate {
    /// The update to a new, full bucket of these settings, or to no limit when they set none.
    fn from(config: BucketConfig) -> Self {
        config
            .bucket()
            .map_or(BucketUpdate::Disabled, BucketUpdate::Update)
    }
}

/// The saved state of a [`RateLimiter`]: each of its buckets, or `None` for no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct RateLimiterState {
    /// The bandwidth bucket, if bytes are limited.
    pub bandwidth: Option<TokenBucketState>,
    /// The operations bucket, if operations are limited.
    pub ops: Option<TokenBucketState>,
}

/// When the timer was armed, on the limiter's clock, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Armed {
    at: u64,
    delay: Duration,
}

/// A bandwidth and an operations token bucket, and the timerfd that wakes the device when a
/// request that had to wait can go.
///
/// Either bucket may be absent, which means no limit on that kind. The time comes from the
/// clock `C`: [`MonotonicClock`] unless a test gives another with
/// [`with_clock`](Self::with_clock).
///
/// See the [crate documentation](crate) for a device loop.
#[derive(Debug)]
pub struct RateLimiter<C: Clock = MonotonicClock> {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// Set while the limiter is blocked.
    armed: Option<Armed>,
    clock: C,
    /// Whether a failure to arm the timer was logged, so it is logged once.
    arm_error_logged: bool,
}

impl RateLimiter {
    /// A rate limiter with a bandwidth bucket and an operations bucket of these settings, both
    /// full, on the system's monotonic clock.
    ///
    /// A bucket that is `None`, or whose size or refill time is 0, sets no limit.
    ///
    /// # Errors
    ///
    /// [`Error::CreateTimer`] or [`Error::NonBlockingTimer`] when the timerfd cannot be set up,
    /// for example when the process is out of file descriptors.
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>) -> Result<Self> {
        Self::with_clock(bandwidth, ops, MonotonicClock)
    }

    /// A rate limiter that lets everything through and never arms its timer, until
    /// [`update_buckets`](Self::update_buckets) sets a limit.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new): it has a timerfd, so that a device can watch it from the start.
    pub fn unlimited() -> Result<Self> {
        Self::new(None, None)
    }
}

impl Default for RateLimiter {
    /// A rate limiter that lets everything through; see [`RateLimiter::unlimited`].
    ///
    /// # Panics
    ///
    /// When the timerfd cannot be created, which happens only when the process is out of file
    /// descriptors or memory. Use [`RateLimiter::unlimited`] to handle that case.
    fn default() -> Self {
        // The timerfd is created with fixed, valid flags: it fails only on resource exhaustion.
        RateLimiter::unlimited().expect("Cannot create the rate limiter's timerfd")
    }
}

impl<C: Clock> RateLimiter<C> {
    /// As [`RateLimiter::new`], with the time read from `clock`.
    ///
    /// The timerfd still counts on `CLOCK_MONOTONIC`: with another clock, the delays it is armed
    /// for are that clock's, which is what a test checks with [`retry_after`](Self::retry_after).
    ///
    /// # Errors
    ///
    /// As [`RateLimiter::new`].
    pub fn with_clock(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
        clock: C,
    ) -> Result<Self> {
        let timer = TimerFd::new().map_err(|e| Error::CreateTimer(e.into()))?;
        set_nonblocking(&timer).map_err(Error::NonBlockingTimer)?;
        Ok(RateLimiter {
            bandwidth: bandwidth.and_then(|config| config.bucket()),
            ops: ops.and_then(|config| config.bucket()),
            timer,
            armed: None,
            clock,
            arm_error_logged: false,
        })
    }

    /// Takes `tokens` of `token_type` for a request; returns whether the request may go.
    ///
    /// It returns `false`, and takes nothing, while the limiter is blocked, or when the bucket
    /// lacks the tokens: then the limiter blocks and arms its timer for the moment they are back
    /// (see [`retry_after`](Self::retry_after)). Either way the device should stop and wait for
    /// the timerfd. With no bucket for `token_type`, and the limiter not blocked, it returns
    /// `true`.
    ///
    /// A request larger than the bucket goes through when the bucket is full and leaves it in
    /// debt; the next consume of that kind waits for the debt to be repaid.
    ///
    /// A device that takes both kinds for one request, and is refused the second, gives the
    /// first back with [`replenish`](Self::replenish).
    #[must_use = "a refused request must wait for the timerfd"]
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        if self.armed.is_some() {
            return false;
        }
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else {
            return true;
        };
        let now = self.clock.now();
        match bucket.consume_at(tokens, now) {
            BucketReduction::Success | BucketReduction::OverConsumption(_) => true,
            BucketReduction::Failure => {
                let delay = bucket.retry_after_at(tokens, now);
                self.arm(now, delay)
            }
        }
    }

    /// Gives back `tokens` of `token_type` taken for a request that did not happen.
    ///
    /// See [`TokenBucket::replenish`]. It does not unblock the limiter.
    pub fn replenish(&mut self, tokens: u64, token_type: TokenType) {
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(bucket) = bucket {
            bucket.replenish(tokens);
        }
    }

    /// The clock the limiter reads the time from, for a device that times its own work on the
    /// same clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Whether the limiter is blocked: a consume failed and the timer has not been handled.
    pub fn is_blocked(&self) -> bool {
        self.armed.is_some()
    }

    /// How long until the armed timer expires and the refused request can go, or `None` when
    /// the limiter is not blocked.
    ///
    /// Right after a refused consume it is the exact time the bucket needs to refill the
    /// request's tokens.
    pub fn retry_after(&self) -> Option<Duration> {
        let armed = self.armed?;
        let elapsed = Duration::from_nanos(self.clock.now().saturating_sub(armed.at));
        Some(armed.delay.saturating_sub(elapsed))
    }

    /// Handles the timerfd's event: reads the timerfd and unblocks the limiter. The device then
    /// works its queue again.
    ///
    /// # Errors
    ///
    /// [`Error::SpuriousEvent`] when the timer has not expired (the limiter stays as it was), and
    /// [`Error::ReadTimer`] when the timerfd cannot be read.
    pub fn event_handler(&mut self) -> Result<()> {
        match self.timer.wait() {
            Ok(0) => Err(Error::SpuriousEvent),
            Ok(_) => {
                self.armed = None;
                Ok(())
            }
            Err(e) if e.errno() == libc::EAGAIN => Err(Error::SpuriousEvent),
            Err(e) => Err(Error::ReadTimer(e.into())),
        }
    }

    /// Changes the buckets at run time; a bucket that is not changed keeps its state, tokens,
    /// debt and burst left.
    ///
    /// When the limiter is blocked, the timer is re-armed to expire at once, so that the device
    /// retries its request under the new limits rather than wait out the old ones.
    pub fn update_buckets(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let changed =
            !matches!(bandwidth, BucketUpdate::None) || !matches!(ops, BucketUpdate::None);
        update(&mut self.bandwidth, bandwidth);
        update(&mut self.ops, ops);
        if changed && self.armed.is_some() {
            let now = self.clock.now();
            self.arm(now, MIN_TIMER_DELAY);
        }
    }

    /// The bandwidth bucket, if bytes are limited.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if operations are limited.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// The state of the buckets, refilled up to now, to save ([`TokenBucket::state_at`]).
    ///
    /// A request the limiter holds back is not part of it: the device gives it back to its
    /// queue, and the restored device asks for its tokens again.
    pub fn state(&self) -> RateLimiterState {
        let now = self.clock.now();
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| b.state_at(now)),
            ops: self.ops.as_ref().map(|b| b.state_at(now)),
        }
    }

    /// Replaces the buckets with those `state` describes, refilling from now on. Nothing
    /// changes unless both buckets are valid.
    ///
    /// It is meant for a limiter built afresh, which is not blocked. A blocked one is handled
    /// as [`update_buckets`](Self::update_buckets) handles it: its timer is re-armed to expire
    /// at once, so that the device retries its request under the restored buckets.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] when a bucket's state is not one a bucket can be in (see
    /// [`TokenBucket::from_state_at`]).
    pub fn restore(&mut self, state: &RateLimiterState) -> Result<()> {
        let now = self.clock.now();
        let bucket = |saved: &Option<TokenBucketState>| {
            saved
                .as_ref()
                .map(|saved| TokenBucket::from_state_at(saved, now))
                .transpose()
        };
        let bandwidth = bucket(&state.bandwidth)?;
        let ops = bucket(&state.ops)?;
        self.bandwidth = bandwidth;
        self.ops = ops;
        if self.armed.is_some() {
            self.arm(now, MIN_TIMER_DELAY);
        }
        Ok(())
    }

    /// Whether the limiter has no bucket at all and lets everything through.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Blocks the limiter with the timer armed for `delay` from `now`, and returns `false`: the
    /// request waits.
    ///
    /// If the timer cannot be armed, which `timerfd_settime` does only for a bad descriptor or
    /// bad times, none of which this limiter passes, the limiter is not blocked and the request
    /// goes (`true`): a device waiting for a timer that never fires would stall for good.
    fn arm(&mut self, now: u64, delay: Duration) -> bool {
        let delay = delay.clamp(MIN_TIMER_DELAY, MAX_TIMER_DELAY);
        match self.timer.reset(delay, None) {
            Ok(()) => {
                self.armed = Some(Armed { at: now, delay });
                false
            }
            Err(e) => {
                if !self.arm_error_logged {
                    self.arm_error_logged = true;
                    log::error!("Cannot arm the rate limiter's timer, letting requests go: {e}");
                }
                self.armed = None;
                true
            }
        }
    }
}

impl<C: Clock> AsRawFd for RateLimiter<C> {
    /// The timerfd, readable when a blocked limiter's wait is over: a device watches it in its
    /// event loop and calls [`RateLimiter::event_handler`].
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// Applies `update` to `bucket`.
fn update(bucket: &mut Option<TokenBucket>, update: BucketUpdate) {
    match update {
        BucketUpdate::None => {}
        BucketUpdate::Disabled => *bucket = None,
        BucketUpdate::Update(new) => *bucket = Some(new),
    }
}

/// Sets `O_NONBLOCK` on `fd`, so that reading an unexpired timer fails instead of waiting.
fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor this process owns reads its flags and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor this process owns sets its flags and touches no memory.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::thread::sleep;

    use super::*;
    use crate::clock::ManualClock;

    fn config(size: u64, one_time_burst: u64, refill_time: u64) -> Option<BucketConfig> {
        Some(BucketConfig {
            size,
            one_time_burst,
            refill_time,
        })
    }

    fn limiter(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> (RateLimiter<ManualClock>, ManualClock) {
        let clock = ManualClock::new(0);
        let limiter = RateLimiter::with_clock(bandwidth, ops, clock.clone()).unwrap();
        (limiter, clock)
    }

    fn timer_is_armed<C: Clock>(limiter: &RateLimiter<C>) -> bool {
        limiter.timer.is_armed().unwrap()
    }

    #[test]
    fn an_unlimited_limiter_lets_everything_through_and_never_arms() {
        for mut l in [RateLimiter::default(), RateLimiter::unlimited().unwrap()] {
            assert!(l.is_unlimited());
            for _ in 0..1000 {
                assert!(l.consume(u64::MAX, TokenType::Bytes));
                assert!(l.consume(u64::MAX, TokenType::Ops));
            }
            l.replenish(10, TokenType::Bytes);
            assert!(!l.is_blocked());
            assert_eq!(l.retry_after(), None);
            assert!(!timer_is_armed(&l));
            // The timerfd is non-blocking: reading an unarmed one fails at once.
            assert!(matches!(l.event_handler(), Err(Error::SpuriousEvent)));
        }
    }

    #[test]
    fn zero_settings_set_no_limit() {
        let (mut l, _) = limiter(config(0, 10, 100), config(10, 0, 0));
        assert!(l.is_unlimited());
        assert!(l.consume(1 << 40, TokenType::Bytes));
        assert!(l.consume(1 << 40, TokenType::Ops));
    }

    #[test]
    fn a_refused_consume_arms_the_timer_with_the_exact_delay() {
        // 1000 bytes per second, so one byte per millisecond.
        let (mut l, clock) = limiter(config(1000, 0, 1000), None);
        assert!(l.consume(990, TokenType::Bytes));
        clock.advance(Duration::from_micros(2500));
        // 12.5 bytes are there; 25 needs 12.5 ms more.
        assert!(!l.consume(25, TokenType::Bytes));
        assert!(l.is_blocked());
        assert!(timer_is_armed(&l));
        assert_eq!(l.retry_after(), Some(Duration::from_micros(12_500)));
        clock.advance(Duration::from_millis(10));
        assert_eq!(l.retry_after(), Some(Duration::from_micros(2500)));
        clock.advance(Duration::from_millis(10));
        assert_eq!(l.retry_after(), Some(Duration::ZERO));
        // The bucket took nothing for the refused request.
        assert_eq!(l.bandwidth().unwrap().budget(), 12);
    }

    #[test]
    fn a_blocked_limiter_refuses_everything_and_arms_once() {
        let (mut l, clock) = limiter(config(100, 0, 1000), config(10, 0, 1000));
        assert!(l.consume(100, TokenType::Bytes));
        assert!(!l.consume(50, TokenType::Bytes));
        assert_eq!(l.retry_after(), Some(Duration::from_millis(500)));
        clock.advance(Duration::from_millis(100));
        // Neither kind goes, and the timer keeps its first deadline.
        assert!(!l.consume(1, TokenType::Ops));
        assert!(!l.consume(1, TokenType::Bytes));
        assert_eq!(l.retry_after(), Some(Duration::from_millis(400)));
        assert_eq!(l.ops().unwrap().budget(), 10);
    }

    #[test]
    fn the_timer_fires_after_the_delay_and_the_event_unblocks() {
        // A byte per millisecond; the real timer is armed for the manual clock's 30 ms.
        let (mut l, clock) = limiter(config(1000, 0, 1000), None);
        assert!(l.consume(1000, TokenType::Bytes));
        assert!(!l.consume(30, TokenType::Bytes));
        assert_eq!(l.retry_after(), Some(Duration::from_millis(30)));
        // Too early: the event is refused and the limiter stays blocked.
        assert!(matches!(l.event_handler(), Err(Error::SpuriousEvent)));
        assert!(l.is_blocked());
        sleep(Duration::from_millis(40));
        assert!(!timer_is_armed(&l));
        l.event_handler().unwrap();
        assert!(!l.is_blocked());
        assert_eq!(l.retry_after(), None);
        // Read once; a second event is spurious.
        assert!(matches!(l.event_handler(), Err(Error::SpuriousEvent)));
        clock.advance(Duration::from_millis(30));
        assert!(l.consume(30, TokenType::Bytes));
    }

    #[test]
    fn the_timer_follows_the_real_clock() {
        // 100 bytes per 10 ms: a 50-byte request on an empty bucket waits 5 ms.
        let mut l = RateLimiter::new(config(100, 0, 10), None).unwrap();
        assert!(l.consume(100, TokenType::Bytes));
        let start = std::time::Instant::now();
        assert!(!l.consume(50, TokenType::Bytes));
        let delay = l.retry_after().unwrap();
        assert!(delay <= Duration::from_millis(5) && delay > Duration::from_millis(4));
        let mut fds = [libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd that outlives the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
        assert_eq!(ready, 1);
        assert!(start.elapsed() >= delay);
        l.event_handler().unwrap();
        assert!(l.consume(50, TokenType::Bytes));
    }

    #[test]
    fn an_over_consumption_goes_through_and_the_debt_delays_the_next() {
        let (mut l, clock) = limiter(config(1000, 0, 1000), config(10, 0, 1000));
        assert!(l.consume(3000, TokenType::Bytes));
        assert!(!l.is_blocked());
        assert_eq!(l.bandwidth().unwrap().deficit(), 2000);
        // Operations are not held up by the bytes' debt.
        assert!(l.consume(1, TokenType::Ops));
        clock.advance(Duration::from_millis(500));
        // 1500 owed, then 100 for the request.
        assert!(!l.consume(100, TokenType::Bytes));
        assert_eq!(l.retry_after(), Some(Duration::from_millis(1600)));
    }

    #[test]
    fn replenish_gives_back_to_the_right_bucket() {
        let (mut l, _) = limiter(config(100, 0, 1000), config(10, 5, 1000));
        assert!(l.consume(3, TokenType::Ops));
        assert!(l.consume(100, TokenType::Bytes));
        l.replenish(60, TokenType::Bytes);
        l.replenish(3, TokenType::Ops);
        assert_eq!(l.bandwidth().unwrap().budget(), 60);
        assert_eq!(l.ops().unwrap().one_time_burst(), 5);
        assert_eq!(l.ops().unwrap().budget(), 10);
        assert!(l.consume(60, TokenType::Bytes));
        // Once the burst is spent, what is given back goes to the bucket.
        assert!(l.consume(12, TokenType::Ops));
        l.replenish(4, TokenType::Ops);
        assert_eq!(l.ops().unwrap().one_time_burst(), 0);
        assert_eq!(l.ops().unwrap().budget(), 7);
    }

    #[test]
    fn updating_one_bucket_keeps_the_other_as_it_was() {
        let (mut l, _) = limiter(config(1000, 500, 1000), config(100, 50, 1000));
        assert!(l.consume(700, TokenType::Bytes));
        assert!(l.consume(20, TokenType::Ops));
        let ops = l.ops().unwrap().clone();
        assert_eq!((ops.one_time_burst(), ops.budget()), (30, 100));

        let new = TokenBucket::new(2000, 0, 500).unwrap();
        l.update_buckets(BucketUpdate::Update(new.clone()), BucketUpdate::None);
        assert_eq!(l.bandwidth(), Some(&new));
        assert_eq!(l.ops(), Some(&ops));

        let bandwidth = l.bandwidth().unwrap().clone();
        l.update_buckets(BucketUpdate::None, BucketUpdate::Disabled);
        assert_eq!(l.ops(), None);
        assert_eq!(l.bandwidth(), Some(&bandwidth));
        assert!(l.consume(u64::MAX, TokenType::Ops));

        l.update_buckets(
            BucketUpdate::Disabled,
            BucketUpdate::from(config(5, 0, 10).unwrap()),
        );
        assert_eq!(l.bandwidth(), None);
        assert_eq!(l.ops().map(|b| b.config()), config(5, 0, 10));
        assert_eq!(
            BucketUpdate::from(BucketConfig::default()),
            BucketUpdate::Disabled
        );
    }

    #[test]
    fn an_update_while_blocked_wakes_the_device_at_once() {
        // A byte per second: the request would wait about a day.
        let (mut l, _) = limiter(config(1, 0, 1000), None);
        assert!(l.consume(1, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
        assert_eq!(l.retry_after(), Some(Duration::from_secs(1)));
        // Keeping both buckets changes nothing.
        l.update_buckets(BucketUpdate::None, BucketUpdate::None);
        assert_eq!(l.retry_after(), Some(Duration::from_secs(1)));
        l.update_buckets(BucketUpdate::Disabled, BucketUpdate::None);
        assert_eq!(l.retry_after(), Some(Duration::from_nanos(1)));
        sleep(Duration::from_millis(1));
        l.event_handler().unwrap();
        assert!(l.consume(1, TokenType::Bytes));
    }

    #[test]
    fn a_wait_longer_than_the_timer_can_hold_is_capped() {
        // One token per u64::MAX ms, asked for again at once.
        let (mut l, _) = limiter(config(1, 0, u64::MAX), None);
        assert!(l.consume(1, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
        assert!(timer_is_armed(&l));
        assert_eq!(l.retry_after(), Some(MAX_TIMER_DELAY));
        // The largest over-consumption goes through and the next request waits.
        let (mut l, _) = limiter(config(1, 0, u64::MAX), None);
        assert!(l.consume(u64::MAX, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
        assert_eq!(l.retry_after(), Some(MAX_TIMER_DELAY));
    }

    #[test]
    fn a_limiter_holds_to_the_rate_with_one_timer_per_refused_request() {
        // 1500-byte packets against 10 MB/s (1 MB per 100 ms), each retried when the timer
        // fires: the bytes sent are the first bucketful and the exact refill since, and every
        // refused packet went on the first retry.
        let (mut l, clock) = limiter(config(1_000_000, 0, 100), None);
        let mut sent = 0u64;
        let mut refusals = 0u64;
        while refusals < 1000 {
            if l.consume(1500, TokenType::Bytes) {
                sent += 1500;
                continue;
            }
            refusals += 1;
            clock.advance(l.retry_after().unwrap());
            // The real timer is armed for the same 150 µs at most: wait for it.
            let mut fds = [libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` is a valid array of one pollfd that outlives the call.
            assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
            l.event_handler().unwrap();
            assert!(l.consume(1500, TokenType::Bytes));
            sent += 1500;
        }
        let refilled = u128::from(clock.now()) / 100;
        let left = u128::from(l.bandwidth().unwrap().budget());
        assert_eq!(u128::from(sent) + left, 1_000_000 + refilled);
        assert!(left < 1500);
    }

    #[test]
    fn a_restored_limiter_has_the_saved_buckets_and_is_not_blocked() {
        let clock = ManualClock::new(0);
        let mut limiter =
            RateLimiter::with_clock(config(1000, 500, 1000), config(10, 0, 1000), clock.clone())
                .unwrap();
        assert!(limiter.consume(1200, TokenType::Bytes));
        assert!(limiter.consume(10, TokenType::Ops));
        clock.advance(Duration::from_millis(100));
        // One operation refilled; two are refused, and the limiter blocks.
        assert!(!limiter.consume(2, TokenType::Ops));
        assert!(limiter.is_blocked());
        let state = limiter.state();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let state: RateLimiterState = postcard::from_bytes(&bytes).unwrap();
        let bandwidth = state.bandwidth.as_ref().unwrap();
        assert_eq!((bandwidth.budget, bandwidth.one_time_burst), (400, 0));
        assert_eq!(state.ops.as_ref().unwrap().budget, 1);

        // Another process, whose clock reads another time.
        let other = ManualClock::new(42 * 1_000_000_000);
        let mut restored = RateLimiter::with_clock(None, None, other.clone()).unwrap();
        restored.restore(&state).unwrap();
        assert!(!restored.is_blocked());
        assert_eq!(restored.state(), state);
        assert!(restored.consume(1, TokenType::Ops));
        assert!(!restored.consume(500, TokenType::Bytes));
        assert_eq!(restored.retry_after(), Some(Duration::from_millis(100)));

        // A blocked limiter restored wakes its device at once.
        limiter.restore(&state).unwrap();
        assert!(limiter.is_blocked());
        assert_eq!(limiter.retry_after(), Some(MIN_TIMER_DELAY));
        sleep(Duration::from_millis(1));
        limiter.event_handler().unwrap();
        assert!(limiter.consume(400, TokenType::Bytes));
    }

    #[test]
    fn an_invalid_state_leaves_the_limiter_as_it_was() {
        let clock = ManualClock::new(0);
        let mut limiter =
            RateLimiter::with_clock(config(1000, 0, 1000), None, clock.clone()).unwrap();
        let before = limiter.state();
        let mut state = before.clone();
        state.ops = RateLimiter::with_clock(None, config(10, 0, 100), clock)
            .unwrap()
            .state()
            .ops;
        state.ops.as_mut().unwrap().budget = 11;
        assert!(matches!(
            limiter.restore(&state),
            Err(Error::InvalidState(_))
        ));
        assert_eq!(limiter.state(), before);
        // A state without buckets lets everything through.
        limiter.restore(&RateLimiterState::default()).unwrap();
        assert!(limiter.is_unlimited());
    }
}
