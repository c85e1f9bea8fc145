//! The token bucket: `size` tokens per `refill_time` milliseconds, in exact integer arithmetic.
//!
//! # The model
//!
//! A bucket holds at most `size` tokens and starts full. Tokens flow in continuously, `size` of
//! them every `refill_time` milliseconds; what flows into a full bucket is lost. A consume takes
//! tokens out or, when there are not enough, takes nothing. On top of the bucket, an optional
//! `one_time_burst` is a credit spent before the bucket and never refilled, so a guest can, say,
//! read its root filesystem fast at boot and is held to the rate afterwards.
//!
//! A request larger than `size` could never be met by a bucket that holds at most `size`, so it
//! goes through when the bucket is full and leaves the bucket in debt (a deficit) for the rest.
//! The refill pays the debt before the bucket fills again, so a stream of large requests is held
//! to the same average rate as one of small ones, and a large request waits at most the time the
//! bucket takes to fill, never forever.
//!
//! # The arithmetic
//!
//! The refill is kept exact, so the count of tokens let through over a day or a year is what the
//! configuration says to the token, however often the bucket is looked at. The bucket keeps the
//! fraction of a token it has refilled and not yet handed out, as a numerator over the refill
//! period in nanoseconds: `elapsed` nanoseconds add `elapsed * size` to it, and each whole
//! `refill_time * 1_000_000` of it is one token. Products of two `u64`s are taken in `u128`,
//! where they cannot overflow, and divided before anything is added to them; what is left is
//! below the period (less than 2^84), so sums of two of them fit too. Counts of tokens saturate
//! at `u64::MAX`, and only where that many tokens fill the bucket anyway: the debt and the room
//! left in the bucket together never exceed `u64::MAX`.

use std::num::{NonZeroU64, NonZeroU128};
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::limiter::{Error, Result};

/// Nanoseconds in a millisecond, the unit of the configured refill time.
// `NonZero::new` of a non-zero constant is `Some`; the `expect` runs at compile time.
const NS_PER_MS: NonZeroU128 = NonZeroU128::new(1_000_000).expect("a million is not zero");

/// Nanoseconds in a second.
const NS_PER_SEC: u128 = 1_000_000_000;

/// The settings of a token bucket, as a user writes them in a rate limiter's configuration.
///
/// A `size` or `refill_time` of 0 means no limit, as in Firecracker's API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketConfig {
    /// How many tokens the bucket holds, and how many it refills per `refill_time`.
    pub size: u64,
    /// Tokens granted once, on top of the bucket, before it is drawn from; never refilled.
    pub one_time_burst: u64,
    /// Milliseconds the bucket takes to refill `size` tokens.
    pub refill_time: u64,
}

impl BucketConfig {
    /// The bucket these settings describe, full, or `None` when they set no limit.
    pub fn bucket(&self) -> Option<TokenBucket> {
        TokenBucket::new(self.size, self.one_time_burst, self.refill_time)
    }
}

/// What a [`TokenBucket::consume`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a failed consume took nothing: the request must wait"]
pub enum BucketReduction {
    /// There were not enough tokens; none were taken.
    Failure,
    /// The tokens were taken.
    Success,
    /// The request was larger than the bucket: it was let through on a full bucket, which is now
    /// in debt for the rest. The duration is the time until the refill has paid the debt off,
    /// after which the bucket fills again.
    OverConsumption(Duration),
}

/// A token bucket with an optional one-time burst, refilled continuously in exact arithmetic.
///
/// The operations that depend on time come in two forms: one that reads [`MonotonicClock`]
/// (`consume`, `retry_after`) and one that is given the time in nanoseconds of any [`Clock`]
/// (`consume_at`, `retry_after_at`, `refill_at`). All the times one bucket is given must come from
/// the same clock.
///
/// # Example
///
/// ```
/// use std::time::Duration;
///
/// use ember_rate_limiter::{BucketReduction, TokenBucket};
///
/// // 1000 tokens per second, plus 500 once.
/// let mut bucket = TokenBucket::new(1000, 500, 1000).expect("the size and refill time are set");
/// assert_eq!(bucket.consume_at(1200, 0), BucketReduction::Success);
/// assert_eq!((bucket.one_time_burst(), bucket.budget()), (0, 300));
///
/// // 500 more are there 200 ms later.
/// assert_eq!(bucket.consume_at(500, 0), BucketReduction::Failure);
/// assert_eq!(bucket.retry_after_at(500, 0), Duration::from_millis(200));
/// assert_eq!(bucket.consume_at(500, 200_000_000), BucketReduction::Success);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Capacity, and tokens refilled per period.
    size: NonZeroU64,
    /// The configured refill period, in milliseconds.
    refill_time_ms: NonZeroU64,
    /// The refill period in nanoseconds: below 2^84.
    period_ns: NonZeroU128,
    /// The period when it fits in a `u64`, for the division of the common case.
    period_ns_u64: Option<NonZeroU64>,
    /// The configured one-time burst.
    initial_one_time_burst: u64,
    /// What is left of the one-time burst.
    one_time_burst: u64,
    /// Tokens in the bucket; zero while there is a deficit.
    budget: u64,
    /// Tokens owed by an over-consumption, repaid by the refill before the budget grows.
    deficit: u64,
    /// The refilled fraction of the next token, in 1/`period_ns` tokens: below `period_ns`.
    fraction: u128,
    /// The time the refill has been counted up to, in nanoseconds.
    last_update: u64,
}

impl TokenBucket {
    /// A full bucket of `size` tokens that refills `size` tokens per `complete_refill_time_ms`
    /// milliseconds, with `one_time_burst` extra tokens spent first and never refilled.
    ///
    /// Every `u64` value is accepted: the arithmetic neither overflows nor loses precision.
    ///
    /// # Arguments
    ///
    /// * `size`: how many tokens the bucket holds, and refills per period.
    /// * `one_time_burst`: the initial extra credit; 0 for none.
    /// * `complete_refill_time_ms`: the refill period in milliseconds.
    ///
    /// Returns `None` when `size` or `complete_refill_time_ms` is 0, which means no limit.
    pub fn new(size: u64, one_time_burst: u64, complete_refill_time_ms: u64) -> Option<Self> {
        let size = NonZeroU64::new(size)?;
        let refill_time_ms = NonZeroU64::new(complete_refill_time_ms)?;
        // At most (2^64 - 1) * 10^6 < 2^84: the multiplication cannot saturate.
        let period_ns = NonZeroU128::from(refill_time_ms).saturating_mul(NS_PER_MS);
        Some(TokenBucket {
            size,
            refill_time_ms,
            period_ns,
            period_ns_u64: NonZeroU64::try_from(period_ns).ok(),
            initial_one_time_burst: one_time_burst,
            one_time_burst,
            budget: size.get(),
            deficit: 0,
            fraction: 0,
            last_update: 0,
        })
    }

    /// How many tokens the bucket holds when full, and refills per period.
    pub fn size(&self) -> u64 {
        self.size.get()
    }

    /// The refill period, in milliseconds.
    pub fn refill_time_ms(&self) -> u64 {
        self.refill_time_ms.get()
    }

    /// The one-time burst the bucket was configured with.
    pub fn initial_one_time_burst(&self) -> u64 {
        self.initial_one_time_burst
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// The tokens in the bucket, as of the last time the bucket was used or refilled.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The tokens owed by an over-consumption and not yet repaid, as of the last time the bucket
    /// was used or refilled.
    pub fn deficit(&self) -> u64 {
        self.deficit
    }

    /// The settings this bucket was made from.
    pub fn config(&self) -> BucketConfig {
        BucketConfig {
            size: self.size.get(),
            one_time_burst: self.initial_one_time_burst,
            refill_time: self.refill_time_ms.get(),
        }
    }

    /// Takes `tokens` from the one-time burst and then the bucket, at the current time of
    /// [`MonotonicClock`]. See [`consume_at`](Self::consume_at).
    pub fn consume(&mut self, tokens: u64) -> BucketReduction {
        self.consume_at(tokens, MonotonicClock.now())
    }

    /// Refills the bucket up to `now` and takes `tokens`: from what is left of the one-time burst
    /// first, then from the bucket.
    ///
    /// A request the burst and the bucket together cannot meet fails and takes nothing, unless it
    /// is larger than the whole bucket: then it goes through if the bucket is full, takes the
    /// burst and the bucket, and leaves the bucket in debt for the rest
    /// ([`BucketReduction::OverConsumption`]).
    ///
    /// # Arguments
    ///
    /// * `tokens`: how many tokens the request needs.
    /// * `now`: the time in nanoseconds, from the clock of all this bucket's times.
    pub fn consume_at(&mut self, tokens: u64, now: u64) -> BucketReduction {
        self.refill_at(now);
        let Some(need) = tokens.checked_sub(self.one_time_burst) else {
            // The burst alone covers the request.
            self.one_time_burst = self.one_time_burst.saturating_sub(tokens);
            return BucketReduction::Success;
        };
        if need <= self.budget {
            self.one_time_burst = 0;
            self.budget = self.budget.saturating_sub(need);
            return BucketReduction::Success;
        }
        if need > self.size.get() && self.is_full() {
            // The bucket holds `size` tokens: the debt is the rest, at most `u64::MAX - size`.
            self.one_time_burst = 0;
            self.budget = 0;
            self.deficit = need.saturating_sub(self.size.get());
            return BucketReduction::OverConsumption(self.time_to_refill(self.deficit));
        }
        BucketReduction::Failure
    }

    /// How long from the current time of [`MonotonicClock`] until `tokens` can be consumed. See
    /// [`retry_after_at`](Self::retry_after_at).
    pub fn retry_after(&mut self, tokens: u64) -> Duration {
        self.retry_after_at(tokens, MonotonicClock.now())
    }

    /// Refills the bucket up to `now` and returns how long from then until a consume of `tokens`
    /// succeeds, if nothing else is taken from the bucket meanwhile: zero when it would succeed
    /// now.
    ///
    /// The duration is exact, rounded up to the nanosecond: a consume at `now` plus the duration
    /// succeeds, one a nanosecond earlier fails. For a request larger than the bucket it is the
    /// time until the bucket is full. It saturates at [`Duration::MAX`].
    pub fn retry_after_at(&mut self, tokens: u64, now: u64) -> Duration {
        self.refill_at(now);
        let need = tokens.saturating_sub(self.one_time_burst);
        let size = self.size.get();
        if need <= self.budget || (need > size && self.is_full()) {
            return Duration::ZERO;
        }
        // A request larger than the bucket waits for a full bucket. Either way the target is
        // above the budget, or there is a debt to pay first.
        let target = need.min(size);
        let missing = self
            .deficit
            .saturating_add(target.saturating_sub(self.budget));
        self.time_to_refill(missing)
    }

    /// Gives back `tokens` taken for a request that did not happen: to the one-time burst while
    /// some of it is left, up to its configured size, and the rest to the bucket, where they pay
    /// a debt first and are lost past a full bucket.
    pub fn replenish(&mut self, tokens: u64) {
        let mut tokens = tokens;
        if self.one_time_burst > 0 {
            let room = self
                .initial_one_time_burst
                .saturating_sub(self.one_time_burst);
            let to_burst = tokens.min(room);
            self.one_time_burst = self.one_time_burst.saturating_add(to_burst);
            tokens = tokens.saturating_sub(to_burst);
        }
        self.add(tokens);
    }

    /// Counts the refill from the last update up to `now`, in nanoseconds of the bucket's clock.
    ///
    /// Looking at the bucket more or less often changes nothing: refilling up to `a` and then
    /// up to `b` leaves the same bucket as refilling up to `b`. A `now` before the last update
    /// counts as no time passed.
    pub fn refill_at(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.last_update);
        self.last_update = self.last_update.max(now);
        if self.is_full() {
            // What flows into a full bucket is lost, fractions included.
            self.fraction = 0;
            return;
        }
        if elapsed > 0 {
            let tokens = self.refilled_tokens(elapsed);
            self.add(tokens);
        }
    }

    /// Whether the bucket is full: no debt, and `size` tokens.
    fn is_full(&self) -> bool {
        self.deficit == 0 && self.budget >= self.size.get()
    }

    /// Adds the refill of `elapsed` nanoseconds to the fraction carried and returns the whole
    /// tokens it makes, saturating at `u64::MAX`.
    fn refilled_tokens(&mut self, elapsed: u64) -> u64 {
        // (2^64 - 1)^2 < 2^128: the product fits.
        let product = u128::from(elapsed).saturating_mul(u128::from(self.size.get()));
        let (whole, rest) = match (u64::try_from(product), self.period_ns_u64) {
            // The common case, with a 64-bit division.
            (Ok(product), Some(period)) => {
                (u128::from(product / period), u128::from(product % period))
            }
            _ => (product / self.period_ns, product % self.period_ns),
        };
        // Both terms are below the period, so the sum is below 2^85 and at most one token.
        let mut fraction = self.fraction.saturating_add(rest);
        let mut whole = whole;
        if fraction >= self.period_ns.get() {
            fraction = fraction.saturating_sub(self.period_ns.get());
            whole = whole.saturating_add(1);
        }
        self.fraction = fraction;
        u64::try_from(whole).unwrap_or(u64::MAX)
    }

    /// Adds `tokens` refilled or given back: they pay the debt, then fill the budget up to
    /// `size`.
    fn add(&mut self, tokens: u64) {
        let repaid = tokens.min(self.deficit);
        self.deficit = self.deficit.saturating_sub(repaid);
        let rest = tokens.saturating_sub(repaid);
        self.budget = self.budget.saturating_add(rest).min(self.size.get());
        if self.is_full() {
            self.fraction = 0;
        }
    }

    /// The time from the last update until the refill has made `missing` more whole tokens,
    /// rounded up to the nanosecond and saturating at [`Duration::MAX`].
    ///
    /// That is the least `t` with `t * size + fraction >= missing * period_ns`, or
    /// `ceil((missing * refill_time_ms * 10^6 - fraction) / size)`. The product of three factors
    /// can pass 2^128, so it is split: with `missing * refill_time_ms = q * size + r`, the time is
    /// `q * 10^6 + ceil((r * 10^6 - fraction) / size)`, where `r * 10^6` and `fraction` are both
    /// below 2^84 and the second term may be negative.
    fn time_to_refill(&self, missing: u64) -> Duration {
        if missing == 0 {
            return Duration::ZERO;
        }
        let size = NonZeroU128::from(self.size);
        let scaled = u128::from(missing).saturating_mul(u128::from(self.refill_time_ms.get()));
        let whole_ms = (scaled / size).saturating_mul(NS_PER_MS.get());
        let rest = (scaled % size).saturating_mul(NS_PER_MS.get());
        let ns = if rest >= self.fraction {
            whole_ms.saturating_add(rest.saturating_sub(self.fraction).div_ceil(size.get()))
        } else {
            // ceil(-x / size) is -floor(x / size); the total is at least 1 ns since `missing`
            // tokens take more than the fraction already refilled.
            whole_ms.saturating_sub(self.fraction.saturating_sub(rest) / size)
        };
        duration_from_ns(ns)
    }
}

/// The saved state of a [`TokenBucket`], as Firecracker's snapshots keep it: the settings, the
/// tokens left in the bucket and in the one-time burst, and, beyond Firecracker, the debt of
/// an over-consumption and the refilled fraction of the next token, so that the refill stays
/// exact across a snapshot.
///
/// The bucket is refilled up to the moment it is saved; the time a snapshot spends on disk
/// refills nothing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct TokenBucketState {
    /// How many tokens the bucket holds, and refills per `refill_time`.
    pub size: u64,
    /// Milliseconds the bucket takes to refill `size` tokens.
    pub refill_time: u64,
    /// The one-time burst the bucket was configured with.
    pub initial_one_time_burst: u64,
    /// What is left of the one-time burst.
    pub one_time_burst: u64,
    /// Tokens in the bucket.
    pub budget: u64,
    /// Tokens owed by an over-consumption.
    pub deficit: u64,
    /// The refilled fraction of the next token, in 1/(`refill_time` * 10^6) tokens.
    pub fraction: u128,
}

impl TokenBucket {
    /// The bucket's state, refilled up to `now` (in nanoseconds of the bucket's clock), to
    /// save.
    pub fn state_at(&self, now: u64) -> TokenBucketState {
        let mut bucket = self.clone();
        bucket.refill_at(now);
        TokenBucketState {
            size: bucket.size.get(),
            refill_time: bucket.refill_time_ms.get(),
            initial_one_time_burst: bucket.initial_one_time_burst,
            one_time_burst: bucket.one_time_burst,
            budget: bucket.budget,
            deficit: bucket.deficit,
            fraction: bucket.fraction,
        }
    }

    /// The bucket a saved `state` describes, refilling from `now` (in nanoseconds of the
    /// clock of all its times) on, after checking that the state is one a bucket can be in.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] when it is not: a size or refill time of 0, more tokens than the
    /// bucket holds, tokens and a debt at once, a debt larger than a request can leave, more
    /// burst left than configured, or a fraction of a token that is a whole one.
    pub fn from_state_at(state: &TokenBucketState, now: u64) -> Result<Self> {
        let invalid = |why: &str| Err(Error::InvalidState(why.to_string()));
        let Some(mut bucket) =
            TokenBucket::new(state.size, state.initial_one_time_burst, state.refill_time)
        else {
            return invalid("a bucket of size or refill time 0 sets no limit");
        };
        if state.budget > state.size {
            return invalid("the bucket holds more tokens than its size");
        }
        if state.deficit > 0 && state.budget > 0 {
            return invalid("the bucket holds tokens and owes some at once");
        }
        if state.deficit > u64::MAX - state.size {
            return invalid("the bucket owes more tokens than a request can leave it owing");
        }
        if state.one_time_burst > state.initial_one_time_burst {
            return invalid("more of the one-time burst is left than was configured");
        }
        if state.fraction >= bucket.period_ns.get() {
            return invalid("the refilled fraction of a token is a whole token or more");
        }
        bucket.one_time_burst = state.one_time_burst;
        bucket.budget = state.budget;
        bucket.deficit = state.deficit;
        bucket.fraction = state.fraction;
        bucket.last_update = now;
        Ok(bucket)
    }
}

/// The duration of `ns` nanoseconds, saturating at [`Duration::MAX`].
fn duration_from_ns(ns: u128) -> Duration {
    let Ok(secs) = u64::try_from(ns / NS_PER_SEC) else {
        return Duration::MAX;
    };
    // The remainder is below 10^9, which fits a u32.
    let nanos = u32::try_from(ns % NS_PER_SEC).unwrap_or(0);
    Duration::new(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(size, burst, refill_ms).expect("the size and refill time are set")
    }

    /// A small deterministic generator, so the property tests need no dependency.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let x = self.0;
            x ^ (x >> 29)
        }

        /// A value in `1..=max`.
        fn up_to(&mut self, max: u64) -> u64 {
            self.next() % max + 1
        }

        /// A value in `1..=2^k` for a `k` in `1..=bits`, so small and large values both come.
        fn spread(&mut self, bits: u64) -> u64 {
            let k = self.up_to(bits);
            self.up_to(1 << k)
        }
    }

    /// What an exact refill gives over `elapsed_ns`, computed independently in u128.
    fn exact_refill(size: u64, refill_ms: u64, elapsed_ns: u64) -> u128 {
        u128::from(elapsed_ns) * u128::from(size) / (u128::from(refill_ms) * 1_000_000)
    }

    #[test]
    fn zero_size_or_refill_time_means_no_limit() {
        assert!(TokenBucket::new(0, 10, 100).is_none());
        assert!(TokenBucket::new(10, 10, 0).is_none());
        assert!(TokenBucket::new(0, 0, 0).is_none());
        assert!(BucketConfig::default().bucket().is_none());
        let config = BucketConfig {
            size: 10,
            one_time_burst: 3,
            refill_time: 100,
        };
        assert_eq!(config.bucket().map(|b| b.config()), Some(config));
    }

    #[test]
    fn a_new_bucket_is_full() {
        let mut b = bucket(1000, 0, 1000);
        assert_eq!(b.budget(), 1000);
        assert_eq!(b.consume_at(1000, 5 * SEC), BucketReduction::Success);
        assert_eq!(b.consume_at(1, 5 * SEC), BucketReduction::Failure);
    }

    #[test]
    fn refill_is_proportional_to_elapsed_time() {
        let mut b = bucket(1000, 0, 1000);
        assert_eq!(b.consume_at(1000, 0), BucketReduction::Success);
        b.refill_at(250 * MS);
        assert_eq!(b.budget(), 250);
        b.refill_at(250 * MS + 999_999);
        assert_eq!(b.budget(), 250);
        b.refill_at(251 * MS);
        assert_eq!(b.budget(), 251);
        // Never past the size.
        b.refill_at(3600 * SEC);
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn a_failed_consume_takes_nothing() {
        let mut b = bucket(100, 10, 1000);
        assert_eq!(b.consume_at(105, 0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 5));
        let before = b.clone();
        assert_eq!(b.consume_at(6, 0), BucketReduction::Failure);
        assert_eq!(b, before);
    }

    #[test]
    fn the_refill_keeps_the_remainder() {
        // One token every 3 ms, looked at every millisecond: the thirds add up.
        let mut b = bucket(1, 0, 3);
        assert_eq!(b.consume_at(1, 0), BucketReduction::Success);
        let mut got = 0;
        for ms in 1..=3000 {
            if b.consume_at(1, ms * MS) == BucketReduction::Success {
                got += 1;
            }
        }
        assert_eq!(got, 1000);
    }

    #[test]
    fn the_refill_does_not_depend_on_how_often_the_bucket_is_looked_at() {
        let mut rng = Lcg(7);
        for _ in 0..200 {
            let size = rng.spread(63);
            let refill_ms = rng.spread(63);
            let mut once = bucket(size, 0, refill_ms);
            assert_eq!(once.consume_at(size, 0), BucketReduction::Success);
            let mut often = once.clone();
            let mut now = 0u64;
            for _ in 0..50 {
                now = now.saturating_add(rng.spread(40));
                often.refill_at(now);
            }
            once.refill_at(now);
            assert_eq!(
                once, often,
                "size {size}, refill {refill_ms} ms, at {now} ns"
            );
            let expected = exact_refill(size, refill_ms, now).min(u128::from(size));
            assert_eq!(u128::from(once.budget()), expected);
        }
    }

    #[test]
    fn no_drift_over_a_simulated_week() {
        // Awkward numbers on purpose: 1_000_003 tokens per 999_983 ms (both prime), so no step
        // refills a whole number of tokens. A million consumes, each of everything available,
        // one every 604.8 ms: a week.
        let (size, refill_ms) = (1_000_003, 999_983);
        let step = 604_800_000;
        let mut b = bucket(size, 0, refill_ms);
        let mut total = 0u128;
        let mut now = 0u64;
        for _ in 0..1_000_000 {
            b.refill_at(now);
            let available = b.budget();
            assert_eq!(b.consume_at(available, now), BucketReduction::Success);
            total += u128::from(available);
            now += step;
        }
        let last = now - step;
        assert_eq!(last, 7 * 24 * 3600 * SEC - step);
        // The bucket never filled up: everything refilled was consumed, to the token.
        assert_eq!(
            total,
            u128::from(size) + exact_refill(size, refill_ms, last)
        );
    }

    #[test]
    fn consumes_at_the_exact_rate_for_a_year() {
        // 12.5 MB/s (100 Mbit/s) with a bucket of a minute, and requests of an awkward size, each
        // made at the moment `retry_after` says it can go: over a simulated year, what went
        // through is exactly what the rate refilled.
        let (size, refill_ms, request) = (750_000_000, 60_000, 740_740_741);
        let mut b = bucket(size, 0, refill_ms);
        assert_eq!(b.consume_at(size, 0), BucketReduction::Success);
        let year = 365 * 24 * 3600 * SEC;
        let mut now = 0;
        let mut sent = 0u64;
        while now < year {
            let wait = b.retry_after_at(request, now);
            assert!(wait > Duration::ZERO);
            now += u64::try_from(wait.as_nanos()).unwrap();
            assert_eq!(b.consume_at(request, now), BucketReduction::Success);
            sent += request;
        }
        // Nothing was lost to a full bucket, so the refill is what was sent and what is left.
        let refilled = exact_refill(size, refill_ms, now);
        assert_eq!(u128::from(sent) + u128::from(b.budget()), refilled);
        // Each wait ends at the nanosecond the request's last token is complete.
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let mut b = bucket(100, 1000, 1000);
        assert_eq!(b.consume_at(600, 0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (400, 100));
        // The rest of the burst and part of the bucket.
        assert_eq!(b.consume_at(450, 0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        b.refill_at(100 * 24 * 3600 * SEC);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
        assert_eq!(b.initial_one_time_burst(), 1000);
    }

    #[test]
    fn a_bucket_is_full_while_burst_is_left() {
        // The burst is spent before the bucket, so while some is left the bucket is full and a
        // request larger than both goes through into debt rather than failing.
        let mut b = bucket(100, 50, 1000);
        assert_eq!(b.consume_at(30, 0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (20, 100));
        assert!(matches!(
            b.consume_at(200, 0),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!((b.one_time_burst(), b.budget(), b.deficit()), (0, 0, 80));
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_through_a_full_bucket_into_debt() {
        let mut b = bucket(100, 0, 1000);
        // 350 tokens: the 100 in the bucket and 250 owed, repaid in 2.5 s.
        assert_eq!(
            b.consume_at(350, 0),
            BucketReduction::OverConsumption(Duration::from_millis(2500))
        );
        assert_eq!((b.budget(), b.deficit()), (0, 250));
        b.refill_at(2 * SEC);
        assert_eq!((b.budget(), b.deficit()), (0, 50));
        assert_eq!(b.consume_at(1, 2 * SEC), BucketReduction::Failure);
        // The debt first, then the request: 50 + 10 tokens.
        assert_eq!(b.retry_after_at(10, 2 * SEC), Duration::from_millis(600));
        assert_eq!(b.consume_at(10, 2600 * MS - 1), BucketReduction::Failure);
        assert_eq!(b.consume_at(10, 2600 * MS), BucketReduction::Success);
    }

    #[test]
    fn a_large_request_waits_for_a_full_bucket_and_is_never_starved() {
        let mut b = bucket(100, 0, 1000);
        assert_eq!(b.consume_at(1, 0), BucketReduction::Success);
        assert_eq!(b.consume_at(1000, 0), BucketReduction::Failure);
        assert_eq!(b.retry_after_at(1000, 0), Duration::from_millis(10));
        assert_eq!(b.consume_at(1000, 10 * MS - 1), BucketReduction::Failure);
        assert!(matches!(
            b.consume_at(1000, 10 * MS),
            BucketReduction::OverConsumption(_)
        ));
        // The next one waits for the 900 owed and a full bucket again.
        assert_eq!(b.retry_after_at(1000, 10 * MS), Duration::from_secs(10));
    }

    #[test]
    fn large_requests_are_held_to_the_average_rate() {
        // 10 MiB requests against 1 MiB per 100 ms: each goes through when the bucket is full,
        // and a thousand of them take exactly the time their bytes take at 10 MiB/s.
        let mut b = bucket(1 << 20, 0, 100);
        let mut now = 0u64;
        for _ in 0..1000 {
            now += u64::try_from(b.retry_after_at(10 << 20, now).as_nanos()).unwrap();
            assert!(matches!(
                b.consume_at(10 << 20, now),
                BucketReduction::OverConsumption(_)
            ));
        }
        // The first found the bucket full; the 999 others waited 10 MiB each.
        assert_eq!(now, 999 * SEC);
    }

    #[test]
    fn retry_after_is_exact_to_the_nanosecond() {
        let mut rng = Lcg(42);
        for _ in 0..2000 {
            let size = rng.spread(40);
            let refill_ms = rng.spread(30);
            let burst = if rng.next() % 4 == 0 {
                rng.up_to(size)
            } else {
                0
            };
            let mut b = bucket(size, burst, refill_ms);
            // Some consumes at random times, some failing, some over-consuming.
            let mut now = 0u64;
            for _ in 0..3 {
                now += rng.spread(36);
                let _ = b.consume_at(rng.up_to(size.saturating_mul(3)), now);
            }
            let tokens = rng.up_to(size.saturating_mul(2));
            let wait = b.retry_after_at(tokens, now);
            let wait = u64::try_from(wait.as_nanos()).unwrap();
            if wait > 0 {
                let mut early = b.clone();
                let reduction = early.consume_at(tokens, now + wait - 1);
                assert_eq!(
                    reduction,
                    BucketReduction::Failure,
                    "{size}/{refill_ms} ms, {tokens}"
                );
            }
            let reduction = b.consume_at(tokens, now + wait);
            assert_ne!(
                reduction,
                BucketReduction::Failure,
                "{size}/{refill_ms} ms, {tokens}"
            );
        }
    }

    #[test]
    fn replenish_returns_tokens_to_the_burst_then_the_bucket() {
        let mut b = bucket(100, 50, 1000);
        assert_eq!(b.consume_at(30, 0), BucketReduction::Success);
        b.replenish(20);
        assert_eq!((b.one_time_burst(), b.budget()), (40, 100));
        // Past the burst's size, the rest goes to the bucket, here full already.
        b.replenish(50);
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
        assert_eq!(b.consume_at(120, 0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
        b.replenish(20);
        assert_eq!(b.budget(), 50);
        b.replenish(u64::MAX);
        assert_eq!(b.budget(), 100);
    }

    #[test]
    fn replenish_pays_the_debt_first() {
        let mut b = bucket(100, 0, 1000);
        assert!(matches!(
            b.consume_at(300, 0),
            BucketReduction::OverConsumption(_)
        ));
        b.replenish(150);
        assert_eq!((b.budget(), b.deficit()), (0, 50));
        b.replenish(80);
        assert_eq!((b.budget(), b.deficit()), (30, 0));
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = bucket(1000, 0, 1000);
        assert_eq!(b.consume_at(1000, 10 * SEC), BucketReduction::Success);
        b.refill_at(SEC);
        assert_eq!(b.budget(), 0);
        // Time counts again from the highest reading.
        b.refill_at(10 * SEC + 500 * MS);
        assert_eq!(b.budget(), 500);
    }

    #[test]
    fn zero_tokens_always_succeed() {
        let mut b = bucket(10, 0, 1000);
        assert!(matches!(
            b.consume_at(30, 0),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!(b.consume_at(0, 0), BucketReduction::Success);
        assert_eq!(b.retry_after_at(0, 0), Duration::ZERO);
    }

    #[test]
    fn extreme_sizes_and_refill_times_neither_overflow_nor_lose_tokens() {
        let max = u64::MAX;
        // The largest bucket, refilled over the longest time.
        let mut b = bucket(max, max, max);
        assert_eq!(b.consume_at(max, 0), BucketReduction::Success);
        assert_eq!(b.consume_at(max, 0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 0));
        // u64::MAX ns (584 years) of a u64::MAX ms period refill u64::MAX / 10^6 tokens.
        b.refill_at(max);
        assert_eq!(u128::from(b.budget()), exact_refill(max, max, max));
        assert_eq!(b.budget(), max / 1_000_000);
        // A millisecond per token, less the fraction refilled: u64::MAX ms is 584 million years,
        // which a Duration still holds.
        let missing = u128::from(max - max / 1_000_000);
        let fraction_ns = u128::from(max % 1_000_000);
        assert_eq!(
            b.retry_after_at(max, max),
            duration_from_ns(missing * 1_000_000 - fraction_ns)
        );

        // A bucket refilled u64::MAX tokens per millisecond fills in the first nanosecond.
        let mut b = bucket(max, 0, 1);
        assert_eq!(b.consume_at(max, 0), BucketReduction::Success);
        b.refill_at(1);
        assert_eq!(b.budget(), max / 1_000_000);
        assert_eq!(b.retry_after_at(max, 1), Duration::from_nanos(999_999));
        b.refill_at(max);
        assert_eq!(b.budget(), max);

        // The smallest bucket over the longest period: one token per u64::MAX ms.
        let mut b = bucket(1, 0, max);
        assert_eq!(b.consume_at(1, 0), BucketReduction::Success);
        assert_eq!(b.retry_after_at(1, 0), Duration::from_millis(max));
        b.refill_at(max);
        assert_eq!(b.budget(), 0);

        // The largest over-consumption: u64::MAX tokens from a bucket of one.
        let mut b = bucket(1, 0, max);
        assert_eq!(
            b.consume_at(max, 0),
            BucketReduction::OverConsumption(Duration::MAX)
        );
        assert_eq!(b.deficit(), max - 1);
        b.refill_at(max);
        assert_eq!(b.deficit(), max - 1);
        b.replenish(max);
        assert_eq!((b.deficit(), b.budget()), (0, 1));

        // And from the largest bucket.
        let mut b = bucket(max, 0, max);
        assert_eq!(b.consume_at(1, 0), BucketReduction::Success);
        assert_eq!(b.consume_at(max, 0), BucketReduction::Failure);
        b.refill_at(max);
        assert_eq!(b.budget(), max);
    }

    #[test]
    fn a_huge_refill_fills_the_bucket_and_pays_the_largest_debt() {
        // A bucket of u64::MAX - 1 tokens per ms, in debt by 1 after a u64::MAX request: the
        // whole debt plus a full bucket is u64::MAX tokens, refilled in about a millisecond.
        let max = u64::MAX;
        let mut b = bucket(max - 1, 0, 1);
        assert!(matches!(
            b.consume_at(max, 0),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!(b.deficit(), 1);
        let wait = b.retry_after_at(max - 1, 0);
        assert!(wait > Duration::from_millis(1) && wait < Duration::from_micros(1001));
        let wait = u64::try_from(wait.as_nanos()).unwrap();
        b.refill_at(wait);
        assert_eq!((b.deficit(), b.budget()), (0, max - 1));
        b.refill_at(max);
        assert_eq!((b.deficit(), b.budget()), (0, max - 1));
    }

    #[test]
    fn a_restored_bucket_refills_exactly_where_the_saved_one_left_off() {
        // 3 tokens per second: half a second refills a token and a half.
        let mut saved = bucket(3, 0, 1000);
        assert_eq!(saved.consume_at(3, 0), BucketReduction::Success);
        let state = saved.state_at(500 * MS);
        assert_eq!((state.budget, state.deficit), (1, 0));
        assert_eq!(state.fraction, 500 * u128::from(MS));
        // The new process's clock has another origin.
        let later = 7 * SEC;
        let mut restored = TokenBucket::from_state_at(&state, later).unwrap();
        assert_eq!(restored.budget(), 1);
        // The half token carried over: another half second fills the bucket.
        assert_eq!(
            restored.consume_at(3, later + 500 * MS - 1),
            BucketReduction::Failure
        );
        assert_eq!(
            restored.consume_at(3, later + 500 * MS),
            BucketReduction::Success
        );
    }

    #[test]
    fn a_saved_debt_and_burst_carry_over() {
        let mut saved = bucket(100, 50, 1000);
        assert_eq!(saved.consume_at(20, 0), BucketReduction::Success);
        let state = saved.state_at(0);
        assert_eq!(
            (state.one_time_burst, state.initial_one_time_burst),
            (30, 50)
        );
        let restored = TokenBucket::from_state_at(&state, 0).unwrap();
        assert_eq!(restored.one_time_burst(), 30);
        assert_eq!(restored.initial_one_time_burst(), 50);

        let mut saved = bucket(100, 0, 1000);
        assert!(matches!(
            saved.consume_at(250, 0),
            BucketReduction::OverConsumption(_)
        ));
        let state = saved.state_at(SEC);
        assert_eq!((state.budget, state.deficit), (0, 50));
        let mut restored = TokenBucket::from_state_at(&state, 0).unwrap();
        // The debt is paid first: half a second, then the tokens of the request.
        assert_eq!(restored.retry_after_at(100, 0), Duration::from_millis(1500));
    }

    #[test]
    fn states_no_bucket_can_be_in_are_refused() {
        let good = bucket(100, 10, 1000).state_at(0);
        type Edit = fn(&mut TokenBucketState);
        let edits: [Edit; 7] = [
            |s| s.size = 0,
            |s| s.refill_time = 0,
            |s| s.budget = 101,
            |s| {
                s.budget = 1;
                s.deficit = 1;
            },
            |s| {
                s.budget = 0;
                s.deficit = u64::MAX;
            },
            |s| s.one_time_burst = 11,
            |s| s.fraction = 1000 * u128::from(MS),
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let mut state = good.clone();
            edit(&mut state);
            assert!(
                matches!(
                    TokenBucket::from_state_at(&state, 0),
                    Err(Error::InvalidState(_))
                ),
                "edit {i}"
            );
        }
        assert!(TokenBucket::from_state_at(&good, 0).is_ok());
    }
}
