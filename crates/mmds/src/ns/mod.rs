//! The guest-facing network stack of the metadata service: just enough ARP, IPv4 and TCP for a
//! metadata client (busybox `wget`, curl) to reach the MMDS address over a virtio-net device.
//!
//! A VMM puts [`MmdsNetworkStack`] in front of an interface's backend. Every frame the guest
//! transmits goes to [`MmdsNetworkStack::detour_frame`] first: the frames for the MMDS address
//! (an ARP request for it, any IPv4 packet to it) are the stack's, and never reach the host's
//! network; the others go on unchanged. The stack's answers wait in it until the device has a
//! receive buffer for them: [`MmdsNetworkStack::has_frames`] says when there is one, and
//! [`MmdsNetworkStack::write_next_frame`] writes it.
//!
//! Frames here are bare Ethernet frames: a virtio-net header in front of them is the VMM's to
//! strip and add. So are offloads: a frame whose TCP checksum the guest left for the device to
//! fill in (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) must be completed before it is detoured, since the
//! stack checks every checksum it receives and computes every one it sends.
//!
//! TCP is what a metadata client needs: a passive open on port 80 with the maximum segment
//! size option, in-order data (a segment ahead of the next expected byte is dropped, and the
//! guest sends it again), acknowledgments, answers sent in segments within the guest's window
//! and maximum segment size, FIN both ways, and resets for segments that fit no connection or
//! go to another port. There is no retransmission timer: a frame waits in the stack until the
//! device delivers it, and virtio delivers every frame it is given, so nothing the stack sends
//! is lost on the way.
//!
//! What a guest can make the stack hold is bounded: at most [`MAX_CONNECTIONS`] connections
//! (a new one evicts the least recently active, which is reset), each with at most the request
//! limit of received bytes ([`DEFAULT_REQUEST_LIMIT`]; a request that passes it while the
//! handler still wants more resets the connection) and one answer, and at most
//! [`MAX_PENDING_FRAMES`] ARP replies and resets waiting to be sent.
//!
//! # Example
//!
//! ```
//! use std::net::Ipv4Addr;
//!
//! use ember_mmds::ns::MmdsNetworkStack;
//! use ember_mmds::{Handled, RequestHandler};
//!
//! struct Hello;
//!
//! impl RequestHandler for Hello {
//!     fn handle(&mut self, received: &[u8]) -> Handled {
//!         Handled::Response { consumed: received.len(), bytes: b"hello".to_vec(), close: true }
//!     }
//! }
//!
//! let mac = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
//! let mut stack = MmdsNetworkStack::new(mac, Ipv4Addr::new(169, 254, 169, 254), Box::new(Hello));
//!
//! // An ARP request for 169.254.169.254 from 10.0.0.2.
//! let mut frame = vec![0xff; 6];
//! frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
//! frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2]);
//! frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 169, 254, 169, 254]);
//! assert!(stack.detour_frame(&frame));
//!
//! let mut reply = [0u8; 1514];
//! let len = stack.write_next_frame(&mut reply).unwrap();
//! assert_eq!(len, 42);
//! assert_eq!(&reply[22..28], &mac, "the reply names the stack's MAC");
//! assert!(!stack.has_frames());
//!
//! // Anything else goes on to the host's network.
//! frame[38..42].copy_from_slice(&[10, 0, 0, 1]);
//! assert!(!stack.detour_frame(&frame));
//! ```

pub mod arp;
mod connection;
pub mod ethernet;
pub mod ipv4;
pub mod tcp;

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use connection::{Connection, Verdict};

use crate::RequestHandler;

/// The port the stack serves.
pub const HTTP_PORT: u16 = 80;
/// The most connections the stack keeps at once, as Firecracker's.
pub const MAX_CONNECTIONS: usize = 30;
/// The most ARP replies and resets waiting to be sent; past it, new ones are dropped (the
/// guest asks again).
pub const MAX_PENDING_FRAMES: usize = 100;
/// The most request bytes a connection holds by default ([`MmdsNetworkStack::with_request_limit`]).
pub const DEFAULT_REQUEST_LIMIT: usize = 8192;
/// How many of a frame's first bytes [`MmdsNetworkStack::may_detour`] needs: the Ethernet
/// header and an IPv4 header without options.
pub const DETOUR_HEAD_LEN: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN;
/// The most bytes of headers in front of a segment's data: Ethernet, IPv4, and TCP with the
/// maximum segment size option.
const HEADERS_LEN: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN + tcp::HEADER_LEN_WITH_MSS;

/// The stack's counters, as in Firecracker's `mmds` metrics group. They only grow.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct StackMetrics {
    /// Frames the stack took (detoured): ARP for its address, IPv4 to it.
    pub rx_accepted: AtomicU64,
    /// Frames taken and dropped as malformed: a bad IPv4 header, a bad TCP segment or checksum.
    pub rx_accepted_err: AtomicU64,
    /// Frames taken that the stack does not serve: ARP other than requests, fragments, IPv4
    /// other than TCP, TCP to another port.
    pub rx_accepted_unusual: AtomicU64,
    /// Frames too short for an Ethernet header.
    pub rx_bad_eth: AtomicU64,
    /// Frames the stack looked at.
    pub rx_count: AtomicU64,
    /// Bytes of the frames the stack wrote.
    pub tx_bytes: AtomicU64,
    /// Segments the stack wrote that carry answer bytes.
    pub tx_count: AtomicU64,
    /// Frames the stack could not send: its pending queue was full, or the buffer it was given
    /// was too small.
    pub tx_errors: AtomicU64,
    /// Frames the stack wrote.
    pub tx_frames: AtomicU64,
    /// Connections opened.
    pub connections_created: AtomicU64,
    /// Connections closed, reset or evicted.
    pub connections_destroyed: AtomicU64,
}

impl StackMetrics {
    /// How many counters [`StackMetrics::values`] gives.
    pub const LEN: usize = 11;

    /// Every counter by its name in Firecracker's `mmds` group, in a fixed order.
    pub fn values(&self) -> [(&'static str, u64); Self::LEN] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("rx_accepted", get(&self.rx_accepted)),
            ("rx_accepted_err", get(&self.rx_accepted_err)),
            ("rx_accepted_unusual", get(&self.rx_accepted_unusual)),
            ("rx_bad_eth", get(&self.rx_bad_eth)),
            ("rx_count", get(&self.rx_count)),
            ("tx_bytes", get(&self.tx_bytes)),
            ("tx_count", get(&self.tx_count)),
            ("tx_errors", get(&self.tx_errors)),
            ("tx_frames", get(&self.tx_frames)),
            ("connections_created", get(&self.connections_created)),
            ("connections_destroyed", get(&self.connections_destroyed)),
        ]
    }
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A frame the stack owes the guest that belongs to no connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// The ARP reply to a request from `mac`, `ip`.
    ArpReply { mac: [u8; 6], ip: Ipv4Addr },
    /// A reset.
    Reset {
        mac: [u8; 6],
        ip: Ipv4Addr,
        local_port: u16,
        remote_port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
}

/// ARP, IPv4 and TCP for the MMDS address: see the [module documentation](self).
pub struct MmdsNetworkStack {
    mac: [u8; 6],
    ipv4: Ipv4Addr,
    handler: Box<dyn RequestHandler>,
    connections: Vec<Connection>,
    /// The connection whose segment comes next, so that each gets its turn.
    next_connection: usize,
    pending: VecDeque<Control>,
    request_limit: usize,
    /// Counts the segments received, to tell which connection was active last.
    ticks: u64,
    /// The IPv4 identification of the next packet.
    ip_id: u16,
    /// Keys the initial sequence numbers, so that the guest cannot predict them.
    isn_key: RandomState,
    isn_count: u64,
    metrics: Arc<StackMetrics>,
}

impl fmt::Debug for MmdsNetworkStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmdsNetworkStack")
            .field("mac", &self.mac)
            .field("ipv4", &self.ipv4)
            .field("connections", &self.connections.len())
            .field("pending", &self.pending.len())
            .field("request_limit", &self.request_limit)
            .finish_non_exhaustive()
    }
}

impl MmdsNetworkStack {
    /// A stack that answers for `ipv4` with `mac`, and hands each connection's bytes to
    /// `handler`.
    pub fn new(mac: [u8; 6], ipv4: Ipv4Addr, handler: Box<dyn RequestHandler>) -> Self {
        MmdsNetworkStack {
            mac,
            ipv4,
            handler,
            connections: Vec::new(),
            next_connection: 0,
            pending: VecDeque::new(),
            request_limit: DEFAULT_REQUEST_LIMIT,
            ticks: 0,
            ip_id: 0,
            isn_key: RandomState::new(),
            isn_count: 0,
            metrics: Arc::default(),
        }
    }

    /// Lets each connection hold at most `limit` received bytes (at least 1) that no answer
    /// used yet; past them, while the handler still wants more, the connection is reset. It
    /// should be at least the longest request the handler answers.
    pub fn with_request_limit(mut self, limit: usize) -> Self {
        self.request_limit = limit.max(1);
        self
    }

    /// Counts into `metrics` from now on, so that several stacks may share counters.
    pub fn with_metrics(mut self, metrics: Arc<StackMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The counters the stack updates.
    pub fn metrics(&self) -> &Arc<StackMetrics> {
        &self.metrics
    }

    /// The MAC address the stack answers with.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The IPv4 address the stack answers for.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// How many connections are open.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Whether a frame that begins with `head` may be the stack's: an ARP packet, or an IPv4
    /// packet to the stack's address. Given the frame's first [`DETOUR_HEAD_LEN`] bytes (or all
    /// of a shorter frame), it is true for every frame [`MmdsNetworkStack::detour_frame`] takes,
    /// so that a VMM may copy only those frames whole; it looks at nothing else and counts
    /// nothing.
    pub fn may_detour(&self, head: &[u8]) -> bool {
        match ethernet::u16_at(head, 12) {
            ethernet::ETHERTYPE_ARP => true,
            ethernet::ETHERTYPE_IPV4 => {
                ipv4::destination_of(head.get(ethernet::HEADER_LEN..).unwrap_or_default())
                    == Some(self.ipv4)
            }
            _ => false,
        }
    }

    /// Takes `frame`, an Ethernet frame the guest sent, if it is the stack's: an ARP packet
    /// about the stack's address, or an IPv4 packet to it. Returns whether it took it; a frame
    /// it did not take must go on to the host's network unchanged, and one it took must not.
    ///
    /// Taken frames that are malformed or not served are dropped and counted; the others are
    /// answered with frames that [`MmdsNetworkStack::write_next_frame`] writes.
    pub fn detour_frame(&mut self, frame: &[u8]) -> bool {
        inc(&self.metrics.rx_count);
        let Ok(eth) = ethernet::Frame::parse(frame) else {
            inc(&self.metrics.rx_bad_eth);
            return false;
        };
        match eth.ethertype() {
            ethernet::ETHERTYPE_ARP => self.detour_arp(eth.payload()),
            ethernet::ETHERTYPE_IPV4 => self.detour_ipv4(eth.source(), eth.payload()),
            _ => false,
        }
    }

    fn detour_arp(&mut self, bytes: &[u8]) -> bool {
        let Ok(packet) = arp::Packet::parse(bytes) else {
            return false;
        };
        if packet.target_ip() != self.ipv4 {
            return false;
        }
        inc(&self.metrics.rx_accepted);
        if packet.operation() == arp::OPER_REQUEST {
            self.push(Control::ArpReply {
                mac: packet.sender_mac(),
                ip: packet.sender_ip(),
            });
        } else {
            inc(&self.metrics.rx_accepted_unusual);
        }
        true
    }

    fn detour_ipv4(&mut self, remote_mac: [u8; 6], bytes: &[u8]) -> bool {
        if ipv4::destination_of(bytes) != Some(self.ipv4) {
            return false;
        }
        inc(&self.metrics.rx_accepted);
        let Ok(packet) = ipv4::Packet::parse(bytes) else {
            inc(&self.metrics.rx_accepted_err);
            return true;
        };
        if packet.is_fragment() || packet.protocol() != ipv4::PROTOCOL_TCP {
            inc(&self.metrics.rx_accepted_unusual);
            return true;
        }
        let remote_ip = packet.source();
        let Ok(segment) = tcp::Segment::parse(packet.payload(), remote_ip, self.ipv4) else {
            inc(&self.metrics.rx_accepted_err);
            return true;
        };
        self.ticks = self.ticks.wrapping_add(1);
        self.receive_segment(remote_mac, remote_ip, &segment);
        true
    }

    /// Hands `seg` to its connection, opens one for a SYN to the stack's port, and resets
    /// anything else.
    fn receive_segment(
        &mut self,
        remote_mac: [u8; 6],
        remote_ip: Ipv4Addr,
        seg: &tcp::Segment<'_>,
    ) {
        if seg.destination_port() != HTTP_PORT {
            inc(&self.metrics.rx_accepted_unusual);
            self.reset_unknown(remote_mac, remote_ip, seg);
            return;
        }
        let found = self
            .connections
            .iter()
            .position(|c| c.remote_ip == remote_ip && c.remote_port == seg.source_port());
        let Some(index) = found else {
            if seg.has(tcp::SYN) && !seg.has(tcp::ACK) && !seg.has(tcp::RST) {
                self.open(remote_mac, remote_ip, seg);
            } else {
                self.reset_unknown(remote_mac, remote_ip, seg);
            }
            return;
        };
        let now = self.ticks;
        let Some(connection) = self.connections.get_mut(index) else {
            return;
        };
        match connection.receive(seg, self.handler.as_mut(), now) {
            Verdict::Keep if connection.is_done() => self.remove(index, false),
            Verdict::Keep => {}
            Verdict::Close => self.remove(index, false),
            Verdict::Reset => self.remove(index, true),
        }
    }

    /// Opens a connection for the guest's SYN, evicting the least recently active one when
    /// there are [`MAX_CONNECTIONS`].
    fn open(&mut self, remote_mac: [u8; 6], remote_ip: Ipv4Addr, syn: &tcp::Segment<'_>) {
        if self.connections.len() >= MAX_CONNECTIONS {
            let idlest = self
                .connections
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.last_active)
                .map(|(index, _)| index);
            if let Some(index) = idlest {
                self.remove(index, true);
            }
        }
        self.isn_count = self.isn_count.wrapping_add(1);
        let hash = self
            .isn_key
            .hash_one((remote_ip, syn.source_port(), syn.seq(), self.isn_count));
        // The low half of the hash.
        let iss = u32::try_from(hash & u64::from(u32::MAX)).unwrap_or_default();
        self.connections.push(Connection::new(
            remote_mac,
            remote_ip,
            syn,
            iss,
            self.request_limit,
            self.ticks,
        ));
        inc(&self.metrics.connections_created);
    }

    /// Removes the connection at `index`, telling the guest with a reset if `reset`.
    fn remove(&mut self, index: usize, reset: bool) {
        if index >= self.connections.len() {
            return;
        }
        let connection = self.connections.swap_remove(index);
        inc(&self.metrics.connections_destroyed);
        if reset {
            let (seq, ack) = connection.reset_numbers();
            self.push(Control::Reset {
                mac: connection.remote_mac,
                ip: connection.remote_ip,
                local_port: HTTP_PORT,
                remote_port: connection.remote_port,
                seq,
                ack,
                flags: tcp::RST | tcp::ACK,
            });
        }
    }

    /// Answers a segment that fits no connection with a reset (RFC 9293, 3.10.7.1), unless it
    /// is one.
    fn reset_unknown(&mut self, mac: [u8; 6], ip: Ipv4Addr, seg: &tcp::Segment<'_>) {
        if seg.has(tcp::RST) {
            return;
        }
        let (seq, ack, flags) = if seg.has(tcp::ACK) {
            (seg.ack(), 0, tcp::RST)
        } else {
            (
                0,
                seg.seq().wrapping_add(seg.seq_len()),
                tcp::RST | tcp::ACK,
            )
        };
        self.push(Control::Reset {
            mac,
            ip,
            local_port: seg.destination_port(),
            remote_port: seg.source_port(),
            seq,
            ack,
            flags,
        });
    }

    /// Queues `control`, or drops it when [`MAX_PENDING_FRAMES`] wait already.
    fn push(&mut self, control: Control) {
        if self.pending.len() >= MAX_PENDING_FRAMES {
            inc(&self.metrics.tx_errors);
            return;
        }
        self.pending.push_back(control);
    }

    /// Whether the stack has a frame for the guest.
    pub fn has_frames(&self) -> bool {
        !self.pending.is_empty() || self.connections.iter().any(Connection::has_segment)
    }

    /// Writes the next frame for the guest into `buf` and returns its length, or `None` when
    /// there is none. ARP replies and resets come first, then each connection's next segment in
    /// turn: SYN-ACK, answer data within the guest's window and maximum segment size (and the
    /// room in `buf`), FIN, acknowledgment.
    ///
    /// A buffer too small for a frame's headers (58 bytes are always enough) loses that frame,
    /// which is counted in [`StackMetrics::tx_errors`].
    pub fn write_next_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        while let Some(control) = self.pending.pop_front() {
            match self.write_control(buf, control) {
                Some(len) => return Some(self.sent(len)),
                None => inc(&self.metrics.tx_errors),
            }
        }
        let count = self.connections.len();
        for turn in 0..count {
            let index = self.next_connection.wrapping_add(turn) % count;
            let room = buf.len().saturating_sub(HEADERS_LEN);
            let (mac, ipv4, ip_id) = (self.mac, self.ipv4, self.ip_id);
            let Some(connection) = self.connections.get_mut(index) else {
                continue;
            };
            let (remote_mac, remote_ip) = (connection.remote_mac, connection.remote_ip);
            let Some((header, data)) = connection.next_segment(HTTP_PORT, room) else {
                continue;
            };
            let carries_data = !data.is_empty();
            let written =
                write_tcp_frame(buf, mac, ipv4, remote_mac, remote_ip, ip_id, &header, data);
            let done = connection.is_done();
            self.next_connection = index.wrapping_add(1);
            if done {
                self.remove(index, false);
            }
            match written {
                Some(len) => {
                    if carries_data {
                        inc(&self.metrics.tx_count);
                    }
                    return Some(self.sent(len));
                }
                None => inc(&self.metrics.tx_errors),
            }
        }
        None
    }

    /// Counts a frame of `len` bytes as sent, and returns `len`.
    fn sent(&mut self, len: usize) -> usize {
        self.ip_id = self.ip_id.wrapping_add(1);
        inc(&self.metrics.tx_frames);
        self.metrics
            .tx_bytes
            .fetch_add(u64::try_from(len).unwrap_or(u64::MAX), Ordering::Relaxed);
        len
    }

    fn write_control(&self, buf: &mut [u8], control: Control) -> Option<usize> {
        match control {
            Control::ArpReply { mac, ip } => {
                let eth =
                    ethernet::write_header(buf, mac, self.mac, ethernet::ETHERTYPE_ARP).ok()?;
                let arp =
                    arp::write_reply(buf.get_mut(eth..)?, self.mac, self.ipv4, mac, ip).ok()?;
                eth.checked_add(arp)
            }
            Control::Reset {
                mac,
                ip,
                local_port,
                remote_port,
                seq,
                ack,
                flags,
            } => {
                let header = tcp::Header {
                    source_port: local_port,
                    destination_port: remote_port,
                    seq,
                    ack,
                    flags,
                    window: 0,
                    mss: None,
                };
                write_tcp_frame(buf, self.mac, self.ipv4, mac, ip, self.ip_id, &header, &[])
            }
        }
    }
}

/// Writes into `buf` the Ethernet frame that carries the segment with `header` and `data` from
/// the stack to the guest, and returns its length.
#[allow(clippy::too_many_arguments)]
fn write_tcp_frame(
    buf: &mut [u8],
    mac: [u8; 6],
    ipv4: Ipv4Addr,
    remote_mac: [u8; 6],
    remote_ip: Ipv4Addr,
    ip_id: u16,
    header: &tcp::Header,
    data: &[u8],
) -> Option<usize> {
    let eth = ethernet::write_header(buf, remote_mac, mac, ethernet::ETHERTYPE_IPV4).ok()?;
    let rest = buf.get_mut(eth..)?;
    let (ip_header, segment) = rest.split_at_mut_checked(ipv4::HEADER_LEN)?;
    let tcp_len = tcp::write_segment(segment, ipv4, remote_ip, header, data).ok()?;
    let ip_len = ipv4::write_header(
        ip_header,
        ipv4,
        remote_ip,
        ipv4::PROTOCOL_TCP,
        ip_id,
        tcp_len,
    )
    .ok()?;
    eth.checked_add(ip_len)?.checked_add(tcp_len)
}

#[cfg(test)]
mod tests;
