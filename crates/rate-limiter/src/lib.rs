//! Token-bucket rate limiting for ember's devices, configured as Firecracker users configure it.
//!
//! - [`TokenBucket`]: `size` tokens per `refill_time` milliseconds, refilled continuously, with
//!   an optional one-time burst spent first. The arithmetic is exact integer arithmetic: no
//!   floating point, no drift over days or years, no overflow for any `u64` settings.
//! - [`RateLimiter`]: a bandwidth bucket ([`TokenType::Bytes`]) and an operations bucket
//!   ([`TokenType::Ops`]), either optional, and a non-blocking timerfd on `CLOCK_MONOTONIC`.
//!   When a request cannot go, the limiter blocks and arms the timerfd for the exact moment its
//!   tokens are back; the device's event loop watches the timerfd and resumes on its event.
//!   Buckets can be changed at run time with [`RateLimiter::update_buckets`].
//! - [`Clock`]: where the time comes from, [`MonotonicClock`] in production. With the
//!   `test-utils` feature, `ManualClock` is moved by hand, so tests of hours or years of refill do
//!   not sleep.
//!
//! Nothing here knows about KVM or virtio: any crate can limit anything with it.
//!
//! # Example
//!
//! A device loop: it works its queue while the limiter lets requests through and, when one is
//! refused, waits on its epoll for the limiter's timerfd before going on.
//!
//! ```
//! use std::collections::VecDeque;
//! use std::os::fd::AsRawFd;
//!
//! use ember_rate_limiter::{BucketConfig, RateLimiter, TokenType};
//! use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
//!
//! // 64 KiB every 10 ms, and at most 1000 requests a second.
//! let bandwidth = BucketConfig { size: 64 << 10, one_time_burst: 0, refill_time: 10 };
//! let ops = BucketConfig { size: 1000, one_time_burst: 0, refill_time: 1000 };
//! let mut limiter = RateLimiter::new(Some(bandwidth), Some(ops))?;
//!
//! const RATE_LIMITER_EVENT: u64 = 1;
//! let epoll = Epoll::new()?;
//! epoll.ctl(
//!     ControlOperation::Add,
//!     limiter.as_raw_fd(),
//!     EpollEvent::new(EventSet::IN, RATE_LIMITER_EVENT),
//! )?;
//!
//! // Three 40 KB requests: the first fits in the full bucket, the others wait for the refill.
//! let mut queue: VecDeque<u64> = VecDeque::from([40_000, 40_000, 40_000]);
//! let mut done = 0;
//! let mut events = [EpollEvent::default(); 4];
//! while let Some(&len) = queue.front() {
//!     if limiter.consume(1, TokenType::Ops) {
//!         if limiter.consume(len, TokenType::Bytes) {
//!             queue.pop_front();
//!             done += len;
//!             continue;
//!         }
//!         // The operation did not happen: give its token back.
//!         limiter.replenish(1, TokenType::Ops);
//!     }
//!     // Refused: the timer is armed for when the bytes are back, a few milliseconds here.
//!     assert!(limiter.is_blocked());
//!     assert!(limiter.retry_after().is_some());
//!     let ready = epoll.wait(-1, &mut events)?;
//!     for event in &events[..ready] {
//!         if event.data() == RATE_LIMITER_EVENT {
//!             limiter.event_handler()?;
//!         }
//!     }
//! }
//! assert_eq!(done, 120_000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod bucket;
pub mod clock;
pub mod limiter;

pub use bucket::{BucketConfig, BucketReduction, TokenBucket};
#[cfg(any(test, feature = "test-utils"))]
pub use clock::ManualClock;
pub use clock::{Clock, MonotonicClock};
pub use limiter::{BucketUpdate, Error, RateLimiter, Result, TokenType};
