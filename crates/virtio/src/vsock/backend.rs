//! What a vsock device's host side is to it: the [`VsockBackend`] trait, which a VMM implements
//! to bring its own (or takes [`VsockUnixBackend`](super::VsockUnixBackend), Firecracker's
//! hybrid Unix-socket design).
//!
//! The device's handler moves packets between the guest's queues and the backend: every
//! packet the guest transmits goes to [`VsockBackend::send_pkt`], and while
//! [`VsockBackend::has_pending_rx`] says so, the handler takes the guest's receive buffers one
//! at a time and asks [`VsockBackend::recv_pkt`] to fill them. The backend's descriptor
//! ([`AsRawFd`], typically an epoll instance over its host sockets) is watched by the loop that
//! runs the handler; when it is ready, the handler calls [`VsockBackend::notify`] and then
//! serves the receive queue.
//!
//! Packets reach the backend already checked for shape (a whole header, a payload the chain
//! holds, at most 64 KiB); everything else in them (context IDs, ports, the operation, credit)
//! is the guest's word, and the backend checks it.

use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::EventSet;

use super::packet::PacketHeader;

/// The host side of a vsock device.
///
/// Every method runs on the thread that serves the device and must not block.
pub trait VsockBackend: AsRawFd + Send + 'static {
    /// Takes a packet the guest transmitted: its `header` and its `payload` (`header.len`
    /// bytes). Whatever the guest says, this never fails: a packet the backend refuses is
    /// answered with a reset in a later [`recv_pkt`](Self::recv_pkt), or dropped.
    fn send_pkt(&mut self, header: &PacketHeader, payload: &[u8]);

    /// The guest transmitted a packet with `header` whose payload the chain does not hold (or
    /// is longer than a packet may be): the backend drops the connection it names, if any,
    /// and answers with a reset.
    fn reject(&mut self, header: &PacketHeader);

    /// Fills a packet for the guest: its header into `header`, its payload into the start of
    /// `payload` (never more than `payload.len()` bytes). Returns the payload's length, or
    /// `None` when there is nothing to send.
    fn recv_pkt(&mut self, header: &mut PacketHeader, payload: &mut [u8]) -> Option<usize>;

    /// Whether [`recv_pkt`](Self::recv_pkt) has a packet to give.
    fn has_pending_rx(&self) -> bool;

    /// The events the device's loop waits for on the backend's descriptor.
    fn interest(&self) -> EventSet {
        EventSet::IN
    }

    /// The backend's descriptor reported `events`: it does the host side's work that waits,
    /// a bounded amount of it per call.
    fn notify(&mut self, events: EventSet);

    /// The device was reset: drops every connection (host streams are closed) and anything
    /// waiting for the guest, so that the device starts afresh when activated again.
    fn reset(&mut self);
}
