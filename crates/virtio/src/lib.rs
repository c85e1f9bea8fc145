//! Virtio over MMIO for ember: a split virtqueue hardened against a malicious guest, the
//! virtio-mmio transport, and block and network devices.
//!
//! - [`queue`]: a [`Queue`] reads the rings a guest driver laid out in guest memory.
//!   [`Queue::pop`] takes the next descriptor chain the driver made available and returns it as a
//!   [`DescriptorChain`] of validated [`Descriptor`]s; [`Queue::add_used`] hands it back;
//!   [`Queue::needs_notification`] says whether the driver wants an interrupt for it.
//! - [`mmio`]: the virtio-mmio (version 2) register page through which the driver finds a device,
//!   negotiates features and sets up its queues; its device status follows an explicit table of
//!   transitions.
//! - [`device`]: what a device is to its transport ([`VirtioDevice`]), and the [`Interrupt`] it
//!   raises through an [`IrqTrigger`] (an irqfd in a KVM VMM).
//! - [`worker`]: the epoll thread an active device serves its queues on.
//! - [`block`]: virtio-blk on a raw image file or a host block device.
//! - [`net`] and [`tap`]: virtio-net on a TAP interface (or any descriptor with datagram
//!   semantics), with checksum and segmentation offloads and merged receive buffers.
//! - [`iov`] and [`guest`]: guest buffers as host iovecs, and guest memory accesses for the hot
//!   paths.
//!
//! Nothing here knows of KVM: queue notifications arrive on eventfds and interrupts leave through
//! a trait, so every piece runs in tests without `/dev/kvm`. Every value the guest wrote is
//! checked before use, and guest memory is only reached through vm-memory's
//! [`GuestMemory`](vm_memory::GuestMemory) and [`Bytes`](vm_memory::Bytes) traits (or the
//! volatile slices of its regions), so the crate works over any vm-memory backend and never
//! holds a Rust reference into guest memory.
//!
//! With the `test-utils` feature, `mock::MockDriver` plays the guest driver and
//! `mock::MockDevice` a device, for tests, fuzz targets and benches.
//!
//! # Example
//!
//! ```
//! use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = guest_memory(0x10000).unwrap();
//! let mut driver = MockDriver::new(16, GuestAddress(0));
//! let mut queue = driver.queue();
//! queue.validate(&mem).unwrap();
//!
//! // The driver offers a request to read and a buffer for the answer.
//! mem.write_slice(b"ping", GuestAddress(0x1000)).unwrap();
//! let head = driver
//!     .add_chain(&mem, &[MockBuffer::readable(0x1000, 4), MockBuffer::writable(0x2000, 4)])
//!     .unwrap();
//!
//! // The device takes the chain, reads the request and writes the answer.
//! let chain = queue.pop(&mem).unwrap().expect("a chain is available");
//! let mut request = [0u8; 4];
//! assert_eq!(chain.read_to(&mem, &mut request).unwrap(), 4);
//! assert_eq!(&request, b"ping");
//! let written = chain.write_from(&mem, b"pong").unwrap();
//! queue
//!     .add_used(&mem, chain.head_index(), u32::try_from(written).unwrap())
//!     .unwrap();
//!
//! // The driver sees the answer in the used ring.
//! assert_eq!(driver.used_idx(&mem).unwrap(), 1);
//! assert_eq!(driver.used_elem(&mem, 0).unwrap(), (u32::from(head), 4));
//! let mut answer = [0u8; 4];
//! mem.read_slice(&mut answer, GuestAddress(0x2000)).unwrap();
//! assert_eq!(&answer, b"pong");
//! assert!(queue.pop(&mem).unwrap().is_none());
//! ```

#![deny(missing_docs)]

pub mod block;
pub mod device;
pub mod guest;
pub mod iov;
pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod net;
pub mod queue;
pub mod tap;
pub mod worker;

pub use device::{ActivateError, ActivateParams, Interrupt, IrqTrigger, VirtioDevice};
pub use queue::{Descriptor, DescriptorChain, Error, Queue, Result, Ring};
pub use worker::{EventHandler, EventOps, Worker, WorkerGate, WorkerHook};
