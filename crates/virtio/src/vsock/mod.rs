//! The virtio socket device (virtio 1.2, section 5.10, device ID 19): stream sockets between
//! the guest and host processes, with Firecracker's hybrid Unix-socket host side.
//!
//! [`Vsock`] has three queues (receive, transmit, event) and an 8-byte configuration space,
//! the guest's context ID (`guest_cid`, at least 3). The guest transmits packets, each a
//! 44-byte header ([`PacketHeader`]) and up to 64 KiB of payload, and hands over buffers that
//! the device fills with the packets its host side has for it; the event queue carries
//! [`EVENT_TRANSPORT_RESET`] ([`Vsock::send_transport_reset`]). Only stream sockets
//! ([`TYPE_STREAM`]) exist.
//!
//! The host side is a [`VsockBackend`]: by default [`VsockUnixBackend`], Firecracker's design
//! (its `docs/vsock.md`). It listens on a Unix socket at `uds_path`:
//!
//! - a host process connects there and writes `CONNECT <port>\n`; the device asks the guest
//!   for a connection to `<port>` from a host port of its choosing, and once the guest accepts,
//!   writes `OK <host port>\n` to the host process; from then on bytes go both ways;
//! - a guest process that connects to host port P reaches a Unix socket listening at
//!   `<uds_path>_P`; when nothing listens there, the guest's connection is reset.
//!
//! Once activated, the device serves its queues with a [`VsockHandler`], run where the
//! [`Executor`](crate::Executor) says (a worker thread named `ember-vsock`, or the VMM's event
//! manager); the backend's descriptor (an epoll set over its host sockets) is watched there
//! alongside the queues' eventfds. [`VirtioDevice::reset`](crate::VirtioDevice::reset) stops
//! it, drops every connection (host streams are closed) and keeps the listener, so that the
//! device can be activated again.
//!
//! The source is split by role, with the same file names as [`crate::block`]'s and
//! [`crate::net`]'s: `packet.rs` the header and how it is read from a chain, `device.rs` the
//! device as its transport sees it ([`Vsock`]), `handler.rs` what serves the queues
//! ([`VsockHandler`]), `backend.rs` the trait of the host side ([`VsockBackend`]), `unix/` the
//! Unix-socket backend (`muxer.rs` its listener and connections, `connection.rs` one
//! connection's state machine and flow control) and `metrics.rs` the counters
//! ([`VsockMetrics`]).
//!
//! # Bounds
//!
//! The guest and the host peers are not trusted, and none of them can make the device use
//! memory or time without bound:
//!
//! - one packet carries at most [`MAX_PKT_BUF_SIZE`] (64 KiB) of payload; a header's `len` is
//!   trusted only as far as the chain holds it. A malformed packet resets its connection.
//! - each connection advertises a buffer of [`CONN_TX_BUF_SIZE`] (256 KiB) to the guest, and
//!   holds that much of the guest's data at most while the host peer does not read; a guest
//!   that sends more than that credit has its connection reset. Host data is read only as far
//!   as the guest's own credit goes, the rest waits in the host socket.
//! - at most [`MAX_CONNECTIONS`] (1023) connections exist at once, those whose host side has
//!   not finished its `CONNECT` line included: the guest data held is at most
//!   1023 x 256 KiB = 255.75 MiB in all, besides the device's one 64 KiB packet buffer.
//! - at most [`MAX_PENDING_RESETS`] resets for packets that name no connection wait for the
//!   guest's receive buffers; more are dropped.
//! - one event serves at most [`TX_BUDGET`] transmitted and [`RX_BUDGET`] received packets, and
//!   the backend at most [`MAX_EVENTS_PER_NOTIFY`] host socket events and 32 new host
//!   connections; the rest waits for the next turn of the loop.
//! - a connection that either side shut down completely is killed (reset) when the other side
//!   does not finish within [`CONN_SHUTDOWN_TIMEOUT`] (2 s), and one the host opened when the
//!   guest does not answer within [`CONN_REQUEST_TIMEOUT`] (10 s).
//!
//! # Half-closed host streams
//!
//! A host process that shuts down only its writing half (`shutdown(SHUT_WR)`) is told to the
//! guest as a SHUTDOWN with [`SHUTDOWN_SEND`] alone: the guest reads the end of the stream and
//! may still answer, which a request/response client that half-closes needs. Only a host
//! stream closed both ways becomes SHUTDOWN with both flags, after which the guest has
//! [`CONN_SHUTDOWN_TIMEOUT`] to answer with RST. Likewise a guest's SHUTDOWN with
//! [`SHUTDOWN_SEND`] shuts the host stream's writing half once the guest's data is written.
//!
//! # Snapshots
//!
//! Connections are not saved. A snapshot records the device's [`VsockState`]
//! ([`Vsock::save_state`]: the guest's context ID) and its queues
//! ([`VirtioDevice::save_queues`](crate::VirtioDevice::save_queues); the handler holds no chain
//! between two events, so they are saved as they stand). Its host side is the new process's:
//! it makes a new device ([`Vsock::from_state`] binds the Unix socket at the path it is given,
//! the configured one or another), and [`Vsock::restore_state`] arms a transport reset, as
//! Firecracker does: the restored device's first activation, with the saved queues, writes
//! [`EVENT_TRANSPORT_RESET`] into the event queue's first buffer at once, and the guest's
//! driver drops every socket it had (its peers see them reset) and reads its context ID again.
//! The host processes that were connected see their streams closed with the old process. New
//! connections, either way, work as before. The packets the guest had made available before
//! the snapshot are taken then too, and answered with resets, since their connections are
//! gone.
//!
//! # Example
//!
//! A host process connects through the device's Unix socket, serving the device without a
//! worker thread as tests and benches do:
//!
//! ```
//! use std::io::Write;
//! use std::os::unix::net::UnixStream;
//! use std::sync::Arc;
//!
//! use ember_virtio::MmioInterrupt;
//! use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
//! use ember_virtio::vsock::{self, PacketHeader, VsockBackend, VsockHandler, VsockUnixBackend};
//! use vm_memory::{Bytes, GuestAddress};
//! use vmm_sys_util::epoll::EventSet;
//! use vmm_sys_util::eventfd::EventFd;
//!
//! let dir = std::env::temp_dir().join(format!("vsock-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("v.sock");
//! let backend = VsockUnixBackend::new(3, &path).unwrap();
//!
//! let mem = Arc::new(guest_memory(0x10_0000).unwrap());
//! let mut rx = MockDriver::new(16, GuestAddress(0));
//! let tx = MockDriver::new(16, GuestAddress(0x4000));
//! let ev = MockDriver::new(16, GuestAddress(0x8000));
//! let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let mut handler = VsockHandler::new(
//!     3,
//!     backend,
//!     mem.clone(),
//!     [rx.queue(), tx.queue(), ev.queue()],
//!     [evt(), evt(), evt()],
//!     Arc::new(MmioInterrupt::new(irq)),
//! );
//!
//! // The host process asks for the guest's port 52.
//! let mut host = UnixStream::connect(&path).unwrap();
//! host.write_all(b"CONNECT 52\n").unwrap();
//! while !handler.backend().has_pending_rx() {
//!     handler.backend_event(EventSet::IN);
//! }
//! // The guest gets a connection request in its receive buffer.
//! rx.add_chain(&*mem, &[MockBuffer::writable(0x2_0000, 4096)]).unwrap();
//! assert_eq!(handler.process_rx().unwrap(), 1);
//! let mut bytes = [0u8; vsock::HDR_SIZE];
//! mem.read_slice(&mut bytes, GuestAddress(0x2_0000)).unwrap();
//! let request = PacketHeader::from_bytes(&bytes);
//! assert_eq!((request.op, request.dst_cid, request.dst_port), (vsock::OP_REQUEST, 3, 52));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

mod backend;
mod device;
mod handler;
pub mod metrics;
pub mod packet;
mod unix;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

pub use backend::VsockBackend;
pub use device::{THREAD_NAME, Vsock};
pub use handler::{
    BACKEND_TOKEN, EV_QUEUE_TOKEN, RX_BUDGET, RX_QUEUE_TOKEN, TX_BUDGET, TX_QUEUE_TOKEN,
    VsockHandler,
};
pub use metrics::VsockMetrics;
pub use packet::{HDR_SIZE, MAX_PKT_BUF_SIZE, PacketHeader};
pub use unix::VsockUnixBackend;

use crate::queue;

/// The number of queues: receive, transmit and event.
pub const NUM_QUEUES: usize = 3;
/// The largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// The index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// The index of the event queue.
pub const EV_QUEUE: usize = 2;
/// The features the device offers.
pub const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// The host's context ID, the other end of every guest packet.
pub const VSOCK_HOST_CID: u64 = 2;
/// The smallest context ID a guest may have: 0 to 2 are the hypervisor's, the host's and
/// reserved.
pub const MIN_GUEST_CID: u64 = 3;

/// The socket type of stream sockets, the only one.
pub const TYPE_STREAM: u16 = 1;
/// Operation: asks for a connection.
pub const OP_REQUEST: u16 = 1;
/// Operation: accepts a connection.
pub const OP_RESPONSE: u16 = 2;
/// Operation: resets a connection, or refuses one.
pub const OP_RST: u16 = 3;
/// Operation: the sender will no longer receive ([`SHUTDOWN_RCV`]) or send
/// ([`SHUTDOWN_SEND`]) on the connection.
pub const OP_SHUTDOWN: u16 = 4;
/// Operation: carries data.
pub const OP_RW: u16 = 5;
/// Operation: tells the other side of the sender's buffer and what it consumed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Operation: asks the other side for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// The event that tells the guest its connections are gone (after a snapshot restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The buffer each connection advertises to the guest (`buf_alloc`), and the most guest data
/// it holds for a host peer that does not read: 256 KiB.
pub const CONN_TX_BUF_SIZE: u32 = 256 << 10;
/// The bytes the host peer takes, after which the guest is told of its new credit without
/// asking: half the connection's buffer.
pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 2;
/// The most connections at once, those whose host side has not finished its `CONNECT` line
/// included (as Firecracker).
pub const MAX_CONNECTIONS: usize = 1023;
/// How long a side that shut a connection down completely waits for the other to finish
/// before the connection is reset (as Firecracker).
pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection the host opened waits for the guest to accept or refuse it before
/// it is reset and its host stream closed.
pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most resets for packets that name no connection that wait for the guest's buffers.
pub const MAX_PENDING_RESETS: usize = 256;
/// The most host socket events the Unix backend handles in one call.
pub const MAX_EVENTS_PER_NOTIFY: usize = 64;

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// Errors of a vsock device: those of making one ([`Error::InvalidCid`], [`Error::Bind`],
/// [`Error::Backend`]), those of an active device, each of which stops it until the driver
/// resets it ([`Error::Queue`]), and that of reaching its handler ([`Error::Worker`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest's context ID is one of the reserved ones (0 to 2) or does not fit in 32 bits
    /// as Linux needs.
    #[error("Invalid guest CID {0}: it must be at least 3 and at most 0xffff_fffe")]
    InvalidCid(u64),
    /// The Unix socket of the host side cannot be made at its path (which must not exist).
    #[error("Cannot bind the vsock Unix socket at {}", .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The backend's epoll set or timer cannot be made.
    #[error("Cannot set up the vsock backend")]
    Backend(#[source] io::Error),
    /// The driver broke the virtqueue protocol.
    #[error("The driver broke the protocol of the vsock device's queues")]
    Queue(#[source] queue::Error),
    /// The thread serving the active device (its worker, or the VMM's event manager) did not
    /// answer.
    #[error("Cannot reach the thread that serves the vsock device")]
    Worker(#[source] io::Error),
    /// A saved state does not fit the device.
    #[error("Cannot restore the vsock device's saved state")]
    State(#[source] crate::StateError),
}

/// What a snapshot records of a vsock device ([`Vsock::save_state`]), and what
/// [`Vsock::restore_state`] checks a new one against. Connections are not part of it: a
/// restored device tells the guest they are gone with a transport reset.
///
/// Read from a snapshot file, it is the operator's input: [`Vsock::restore_state`] checks that
/// it fits the device it is given to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context ID, which its configuration space holds.
    pub guest_cid: u64,
}

/// Result of the device's steps.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks a guest context ID: at least [`MIN_GUEST_CID`], and below `u32::MAX` (Linux's
/// `VMADDR_CID_ANY`), since Linux keeps CIDs in 32 bits.
pub(crate) fn check_cid(cid: u64) -> Result<u64> {
    if (MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid) {
        Ok(cid)
    } else {
        Err(Error::InvalidCid(cid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_oversized_cids_are_refused() {
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(check_cid(cid), Err(Error::InvalidCid(c)) if c == cid));
        }
        assert_eq!(check_cid(3).unwrap(), 3);
        assert_eq!(check_cid(0xffff_fffe).unwrap(), 0xffff_fffe);
    }
}
