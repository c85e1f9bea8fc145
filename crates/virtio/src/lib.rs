//! Virtio devices for ember and other VMMs: the virtio-mmio transport, and block and network
//! devices on the hardened split virtqueue of [`ember_virtqueue`].
//!
//! - [`queue`], [`iov`] and [`guest`]: the split virtqueue of the
//!   [`ember_virtqueue`] crate, re-exported. A [`Queue`] reads the rings a guest driver laid out
//!   in guest memory: [`Queue::pop`] takes the next descriptor chain the driver made available,
//!   [`Queue::add_used`] hands it back.
//! - [`mmio`]: the virtio-mmio (version 2) register page through which the driver finds a device,
//!   negotiates features and sets up its queues; its device status follows an explicit table of
//!   transitions.
//! - [`device`]: what a device is to its transport ([`VirtioDevice`]), and the
//!   [`VirtioInterrupt`] it tells what happened ([`VirtioInterruptType`]: queue N used,
//!   configuration changed, needs reset); the MMIO transport's is an [`MmioInterrupt`] over an
//!   [`IrqTrigger`] (an irqfd in a KVM VMM), a PCI transport's may give each queue a vector.
//! - [`worker`]: where an active device's handler runs: an epoll thread of its own, or the
//!   VMM's event manager (feature `event-manager`).
//! - [`block`]: virtio-blk on a raw image file or a host block device.
//! - [`net`] and [`tap`]: virtio-net on a TAP interface (or any descriptor with datagram
//!   semantics), with checksum and segmentation offloads and merged receive buffers.
//!
//! Nothing here knows of KVM: queue notifications arrive on eventfds and interrupts leave through
//! a trait, so every piece runs in tests without `/dev/kvm`. Every value the guest wrote is
//! checked before use. Guest memory is any vm-memory
//! [`GuestAddressSpace`](vm_memory::GuestAddressSpace) (`Arc<GuestMemoryMmap>`, or a
//! `GuestMemoryAtomic` that memory hot-plug updates), of which a device takes a snapshot for
//! each batch of work; it is only reached through vm-memory's
//! [`GuestMemory`](vm_memory::GuestMemory) and [`Bytes`](vm_memory::Bytes) traits (or the
//! volatile slices of its regions), so the crate works over any vm-memory backend and never
//! holds a Rust reference into guest memory.
//!
//! With the `test-utils` feature, `mock::MockDriver` (from [`ember_virtqueue`]) plays the guest
//! driver and `mock::MockDevice` a device, for tests, fuzz targets and benches.

#![deny(missing_docs)]

pub mod block;
pub mod device;
pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod net;
pub mod tap;
pub mod worker;

pub use device::{
    ActivateError, ActivateParams, IrqTrigger, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
pub use ember_rate_limiter as rate_limiter;
pub use ember_virtqueue::{Descriptor, DescriptorChain, Error, Queue, Result, Ring};
pub use ember_virtqueue::{guest, iov, queue};
pub use mmio::MmioInterrupt;
pub use worker::{EventHandler, EventOps, Executor, Runner, Worker, WorkerGate, WorkerHook};
