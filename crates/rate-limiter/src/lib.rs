#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod bucket;
pub mod clock;
pub mod limiter;

pub use bucket::{BucketConfig, BucketReduction, TokenBucket, TokenBucketState};
#[cfg(any(test, feature = "test-utils"))]
pub use clock::ManualClock;
pub use clock::{Clock, MonotonicClock};
pub use limiter::{BucketUpdate, Error, RateLimiter, RateLimiterState, Result, TokenType};
