#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod guest;
pub mod iov;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod queue;

pub use iov::GuestIoVecs;
pub use queue::{
    Descriptor, DescriptorChain, Error, Pieces, Queue, QueueState, Result, Ring, Rings,
};
