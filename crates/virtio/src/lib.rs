#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod balloon;
pub mod block;
pub mod device;
mod error;
pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;
pub mod worker;

pub use device::{
    ActivateError, ActivateParams, IrqTrigger, StateError, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
pub use ember_rate_limiter as rate_limiter;
pub use ember_virtqueue::{Descriptor, DescriptorChain, Error, Queue, Result, Ring, Rings};
pub use ember_virtqueue::{guest, iov, queue};
pub use mmio::MmioInterrupt;
pub use worker::{EventHandler, EventOps, Executor, Runner, Worker, WorkerGate, WorkerHook};
