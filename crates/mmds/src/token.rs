//! MMDS V2 session tokens.
//!
//! A guest asks for a token with `PUT /latest/api/token` and a time to live of 1 to 21600
//! seconds, then shows it in the `X-metadata-token` header of each `GET`. A token is 32 bytes
//! from the kernel's `getrandom`, written as 64 hex digits: it cannot be guessed, so the
//! [`TokenAuthority`] keeps the live ones and compares. How many it keeps is bounded
//! ([`MAX_LIVE_TOKENS`]): a new token evicts the expired ones first and then, when the authority
//! is still full, the oldest, so a guest that asks for tokens in a loop costs a fixed amount of
//! host memory.
//!
//! Expiry is measured on a [`Clock`]: [`MonotonicClock`] in a VMM, a [`ManualClock`] that a
//! test moves by hand.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The shortest time to live a token may be given, in seconds.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// The longest time to live a token may be given, in seconds (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21600;
/// The most tokens alive at once; a new one evicts the oldest beyond this.
pub const MAX_LIVE_TOKENS: usize = 128;
/// The length of a token's text: 32 random bytes in hex.
pub const TOKEN_LEN: usize = 64;

/// Errors of the token authority.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The time to live is out of range.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    /// The kernel gave no random bytes.
    #[error("Failed to generate token.")]
    Random(#[source] std::io::Error),
}

/// The module's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A monotonic time source for token expiry.
///
/// Only differences between two readings matter; readings must never decrease.
pub trait Clock: Send + Sync + Debug {
    /// The time elapsed since an origin of the clock's choosing.
    fn now(&self) -> Duration;
}

/// The system's monotonic clock, read through [`Instant`]: time since its first reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that stands still until it is told to move; clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the time forward by `by`, stopping at `u64::MAX` nanoseconds.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let now = self.0.load(Ordering::Relaxed);
        self.0.store(now.saturating_add(by), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// The live session tokens and the clock they expire on.
#[derive(Debug)]
pub struct TokenAuthority {
    /// Live tokens with their expiry, oldest first.
    tokens: VecDeque<([u8; TOKEN_LEN], Duration)>,
    clock: Box<dyn Clock>,
}

impl Default for TokenAuthority {
    fn default() -> Self {
        Self::new(Box::new(MonotonicClock))
    }
}

impl TokenAuthority {
    /// An authority with no tokens, whose tokens expire on `clock`.
    pub fn new(clock: Box<dyn Clock>) -> Self {
        TokenAuthority {
            tokens: VecDeque::new(),
            clock,
        }
    }

    /// Makes a token that is valid for `ttl_seconds` seconds from now.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`] unless `ttl_seconds` is within 1..=21600; [`Error::Random`] when
    /// the kernel gives no random bytes.
    pub fn generate(&mut self, ttl_seconds: u32) -> Result<String> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(Error::InvalidTtl(ttl_seconds));
        }
        let mut random = [0u8; TOKEN_LEN / 2];
        fill_random(&mut random).map_err(Error::Random)?;
        let mut token = [0u8; TOKEN_LEN];
        for (pair, byte) in token.chunks_exact_mut(2).zip(random) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
        let now = self.clock.now();
        self.tokens.retain(|(_, expiry)| *expiry > now);
        while self.tokens.len() >= MAX_LIVE_TOKENS {
            self.tokens.pop_front();
        }
        let expiry = now.saturating_add(Duration::from_secs(u64::from(ttl_seconds)));
        self.tokens.push_back((token, expiry));
        // The text is hex digits only.
        Ok(token.iter().map(|&b| char::from(b)).collect())
    }

    /// Whether `token` is a live token: made here and not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        let Ok(token) = <[u8; TOKEN_LEN]>::try_from(token.as_bytes()) else {
            return false;
        };
        let now = self.clock.now();
        // Every live token is compared whole, so the time taken says nothing of how much of
        // a guess matched.
        self.tokens.iter().fold(false, |found, (live, expiry)| {
            let same = live
                .iter()
                .zip(token.iter())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
            found | (same & (*expiry > now))
        })
    }

    /// How many tokens are held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

const HEX: [u8; 16] = *b"0123456789abcdef";

/// Fills `buf` from the kernel's random pool (`getrandom(2)`, blocking only until the pool is
/// first initialised).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, a live, writable
        // buffer of that length.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let got = usize::try_from(ret).unwrap_or(0);
        filled = filled.saturating_add(got).min(buf.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> (TokenAuthority, ManualClock) {
        let clock = ManualClock::new();
        (TokenAuthority::new(Box::new(clock.clone())), clock)
    }

    #[test]
    fn a_token_is_64_hex_digits_and_each_is_different() {
        let (mut ta, _) = authority();
        let a = ta.generate(60).unwrap();
        let b = ta.generate(60).unwrap();
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(ta.is_valid(&a) && ta.is_valid(&b));
    }

    #[test]
    fn the_ttl_must_be_1_to_21600_seconds() {
        let (mut ta, _) = authority();
        for bad in [0, 21601, u32::MAX] {
            let err = ta.generate(bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "Invalid time to live value provided for token: {bad}. Please provide a \
                     value between 1 and 21600."
                )
            );
        }
        assert!(ta.generate(1).is_ok());
        assert!(ta.generate(21600).is_ok());
        assert_eq!(ta.len(), 2);
    }

    #[test]
    fn a_token_expires_after_its_ttl() {
        let (mut ta, clock) = authority();
        let token = ta.generate(2).unwrap();
        clock.advance(Duration::from_millis(1999));
        assert!(ta.is_valid(&token));
        clock.advance(Duration::from_millis(1));
        assert!(!ta.is_valid(&token));
    }

    #[test]
    fn unknown_or_malformed_tokens_are_refused() {
        let (mut ta, _) = authority();
        let token = ta.generate(60).unwrap();
        assert!(!ta.is_valid(""));
        assert!(!ta.is_valid(&token[1..]));
        assert!(!ta.is_valid(&format!("{token}0")));
        assert!(!ta.is_valid(&"0".repeat(TOKEN_LEN)));
        assert!(!ta.is_valid(&token.to_uppercase()));
        assert!(!ta.is_valid(&"é".repeat(TOKEN_LEN / 2)));
    }

    #[test]
    fn the_live_tokens_are_bounded_and_the_oldest_is_evicted_first() {
        let (mut ta, _) = authority();
        let first = ta.generate(60).unwrap();
        let second = ta.generate(60).unwrap();
        for _ in 0..MAX_LIVE_TOKENS * 3 {
            ta.generate(21600).unwrap();
            assert!(ta.len() <= MAX_LIVE_TOKENS);
        }
        assert_eq!(ta.len(), MAX_LIVE_TOKENS);
        assert!(!ta.is_valid(&first));
        assert!(!ta.is_valid(&second));
    }

    #[test]
    fn expired_tokens_are_dropped_before_live_ones_are_evicted() {
        let (mut ta, clock) = authority();
        let long = ta.generate(21600).unwrap();
        for _ in 1..MAX_LIVE_TOKENS {
            ta.generate(1).unwrap();
        }
        assert_eq!(ta.len(), MAX_LIVE_TOKENS);
        clock.advance(Duration::from_secs(2));
        let new = ta.generate(60).unwrap();
        assert_eq!(ta.len(), 2);
        assert!(ta.is_valid(&long) && ta.is_valid(&new));
    }

    #[test]
    fn the_monotonic_clock_does_not_go_back() {
        let a = MonotonicClock.now();
        let b = MonotonicClock.now();
        assert!(b >= a);
    }
}
