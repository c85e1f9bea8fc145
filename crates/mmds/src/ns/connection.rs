//! One TCP connection of the stack, from the guest's SYN to the last FIN: a passive open on
//! the stack's port, in-order data, and answers sent within the guest's window and maximum
//! segment size.
//!
//! Nothing here retransmits: every segment the stack writes reaches the guest, since a frame
//! waits in the stack until the device has a receive buffer for it, and virtio does not lose
//! what it was given. A segment the guest drops anyway (its socket is gone) only leaves the
//! connection idle, and idle connections are evicted. The guest's own losses are the guest's
//! to recover: an out-of-order segment is dropped and answered with the acknowledgment the
//! stack expects, so that the guest sends again.

use std::net::Ipv4Addr;

use super::tcp::{ACK, FIN, Header, PSH, RST, SYN, Segment};
use crate::{Handled, RequestHandler};

/// The maximum segment size assumed when the guest's SYN carries none (RFC 9293).
const DEFAULT_MSS: u16 = 536;
/// The maximum segment size the stack advertises: an Ethernet MTU's worth.
pub(crate) const OUR_MSS: u16 = 1460;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The guest's SYN came and the stack's SYN-ACK is due or sent, not acknowledged yet.
    SynReceived,
    /// The handshake is over.
    Established,
}

/// What a received segment means for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The connection goes on.
    Keep,
    /// The guest reset the connection: it goes, and nothing is sent.
    Close,
    /// The connection goes, and the guest is told with a reset.
    Reset,
}

/// A TCP connection on the stack's port.
#[derive(Debug)]
pub(crate) struct Connection {
    /// The guest's MAC, address and port.
    pub(crate) remote_mac: [u8; 6],
    pub(crate) remote_ip: Ipv4Addr,
    pub(crate) remote_port: u16,
    state: State,
    /// The guest's initial sequence number.
    irs: u32,
    /// The stack's initial sequence number: its SYN.
    iss: u32,
    /// The oldest sequence number the guest has not acknowledged.
    snd_una: u32,
    /// The next sequence number the stack sends.
    snd_nxt: u32,
    /// The next sequence number the stack expects from the guest.
    rcv_nxt: u32,
    /// The window the guest last advertised.
    snd_wnd: u16,
    /// The guest's maximum segment size.
    mss: u16,
    /// The bytes received and not yet used by a request, oldest first.
    request: Vec<u8>,
    /// The most bytes `request` may hold.
    request_limit: usize,
    /// The answer being sent: its first byte has sequence number `snd_una`, and the first
    /// `snd_nxt - snd_una` bytes are sent.
    response: Vec<u8>,
    /// Whether the stack closes its side once `response` is sent.
    closing: bool,
    /// Whether the stack sent its FIN, and whether the guest acknowledged it.
    fin_sent: bool,
    fin_acked: bool,
    /// Whether the guest sent its FIN.
    fin_received: bool,
    /// Whether a SYN-ACK is due.
    syn_ack_due: bool,
    /// Whether an acknowledgment is due.
    ack_due: bool,
    /// When the guest last sent a segment for the connection, in the stack's ticks.
    pub(crate) last_active: u64,
}

impl Connection {
    /// A connection for the guest's `syn`, from `remote_mac`, `remote_ip`, with the stack's
    /// initial sequence number `iss`.
    pub(crate) fn new(
        remote_mac: [u8; 6],
        remote_ip: Ipv4Addr,
        syn: &Segment<'_>,
        iss: u32,
        request_limit: usize,
        now: u64,
    ) -> Self {
        let mss = match syn.mss() {
            Some(0) | None => DEFAULT_MSS,
            Some(mss) => mss,
        };
        Connection {
            remote_mac,
            remote_ip,
            remote_port: syn.source_port(),
            state: State::SynReceived,
            irs: syn.seq(),
            iss,
            snd_una: iss,
            snd_nxt: iss.wrapping_add(1),
            // Data in the SYN is not taken: the guest sends it again.
            rcv_nxt: syn.seq().wrapping_add(1),
            snd_wnd: syn.window(),
            mss,
            request: Vec::new(),
            request_limit,
            response: Vec::new(),
            closing: false,
            fin_sent: false,
            fin_acked: false,
            fin_received: false,
            syn_ack_due: true,
            ack_due: false,
            last_active: now,
        }
    }

    /// Whether the connection is over: both FINs sent and acknowledged, nothing left to send.
    pub(crate) fn is_done(&self) -> bool {
        self.fin_sent && self.fin_acked && self.fin_received && !self.ack_due
    }

    /// The reset that ends the connection from the stack's side: its sequence number and
    /// acknowledgment.
    pub(crate) fn reset_numbers(&self) -> (u32, u32) {
        (self.snd_nxt, self.rcv_nxt)
    }

    /// Takes a segment the guest sent on the connection, and serves the requests it completes
    /// with `handler`.
    pub(crate) fn receive(
        &mut self,
        seg: &Segment<'_>,
        handler: &mut dyn RequestHandler,
        now: u64,
    ) -> Verdict {
        self.last_active = now;
        if seg.has(RST) {
            // Only a reset at the sequence number expected, or within the window, counts: a
            // blind one is ignored.
            let offset = seg.seq().wrapping_sub(self.rcv_nxt);
            return if offset <= u32::from(self.window()) {
                Verdict::Close
            } else {
                Verdict::Keep
            };
        }
        if seg.has(SYN) {
            if self.state == State::SynReceived && !seg.has(ACK) && seg.seq() == self.irs {
                // The guest sent its SYN again.
                self.syn_ack_due = true;
                return Verdict::Keep;
            }
            return Verdict::Reset;
        }
        if !seg.has(ACK) {
            return Verdict::Keep;
        }
        if !self.take_ack(seg) {
            return if self.state == State::SynReceived {
                Verdict::Reset
            } else {
                self.ack_due = true;
                Verdict::Keep
            };
        }
        if self.state == State::SynReceived {
            return Verdict::Keep;
        }
        self.take_data(seg);
        // Also after an acknowledgment alone: the answer it completes may let the next
        // request in.
        self.serve(handler)
    }

    /// Takes the acknowledgment and window of `seg`; false when it acknowledges what was not
    /// sent, or in SYN-RECEIVED, not the SYN.
    fn take_ack(&mut self, seg: &Segment<'_>) -> bool {
        let acked = seg.ack().wrapping_sub(self.snd_una);
        let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
        if acked > in_flight {
            // An old duplicate (behind `snd_una`) is harmless; one ahead of what was sent is
            // not acceptable.
            return self.state == State::Established
                && self.snd_una.wrapping_sub(seg.ack()) < 1 << 31;
        }
        if self.state == State::SynReceived {
            if acked == 0 {
                return false;
            }
            // The SYN is acknowledged, and it is all that was sent.
            self.state = State::Established;
            self.snd_una = seg.ack();
            self.snd_wnd = seg.window();
            return true;
        }
        let fin_in_flight = u32::from(self.fin_sent && !self.fin_acked);
        let data_acked = acked.min(in_flight.saturating_sub(fin_in_flight));
        let data_acked = usize::try_from(data_acked)
            .unwrap_or(usize::MAX)
            .min(self.response.len());
        self.response.drain(..data_acked);
        if self.fin_sent && seg.ack() == self.snd_nxt {
            self.fin_acked = true;
        }
        self.snd_una = seg.ack();
        self.snd_wnd = seg.window();
        true
    }

    /// Takes the data and FIN of `seg` that come in order.
    fn take_data(&mut self, seg: &Segment<'_>) {
        let payload = seg.payload();
        if payload.is_empty() && !seg.has(FIN) {
            return;
        }
        if self.fin_received {
            // Nothing comes after the guest's FIN: a retransmission, acknowledged again.
            self.ack_due = true;
            return;
        }
        // How far into the segment the next expected byte lies; a segment ahead of it (an
        // offset past 2^31) is out of order.
        let offset = usize::try_from(self.rcv_nxt.wrapping_sub(seg.seq())).unwrap_or(usize::MAX);
        if offset > payload.len() || (offset == payload.len() && !seg.has(FIN)) {
            // Out of order, or all of it seen already: the guest learns what is expected.
            self.ack_due = true;
            return;
        }
        let fresh = payload.get(offset..).unwrap_or_default();
        let room = self.request_limit.saturating_sub(self.request.len());
        let taken = fresh.len().min(room);
        if !self.closing {
            self.request
                .extend_from_slice(fresh.get(..taken).unwrap_or_default());
        }
        // At most a segment's length.
        self.rcv_nxt = self
            .rcv_nxt
            .wrapping_add(u32::try_from(taken).unwrap_or(u32::MAX));
        if taken == fresh.len() && seg.has(FIN) {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.fin_received = true;
        }
        self.ack_due = true;
    }

    /// Answers the requests received while no answer is being sent, one at a time, so that
    /// one connection holds at most one answer.
    pub(crate) fn serve(&mut self, handler: &mut dyn RequestHandler) -> Verdict {
        // Whether what is left of the request can make no answer now.
        let mut exhausted = true;
        while self.response.is_empty() && !self.closing && !self.request.is_empty() {
            match handler.handle(&self.request) {
                Handled::Incomplete => {
                    if self.request.len() >= self.request_limit {
                        return Verdict::Reset;
                    }
                    break;
                }
                Handled::Response {
                    consumed,
                    bytes,
                    close,
                } => {
                    let consumed = consumed.min(self.request.len());
                    self.request.drain(..consumed);
                    self.response = bytes;
                    self.closing |= close;
                    if consumed == 0 && self.response.is_empty() {
                        break;
                    }
                }
            }
        }
        if !self.response.is_empty() && !self.request.is_empty() {
            // Another request may wait behind this answer.
            exhausted = false;
        }
        if self.fin_received && exhausted {
            // Nothing more can come: the stack closes once its answer is sent.
            self.closing = true;
        }
        Verdict::Keep
    }

    /// The window the stack advertises: the room left for the request.
    fn window(&self) -> u16 {
        let room = self.request_limit.saturating_sub(self.request.len());
        u16::try_from(room).unwrap_or(u16::MAX)
    }

    /// How many bytes of the answer are sent and not acknowledged.
    fn in_flight(&self) -> usize {
        let flight = self.snd_nxt.wrapping_sub(self.snd_una);
        let flight = flight.saturating_sub(u32::from(self.fin_sent && !self.fin_acked));
        usize::try_from(flight).unwrap_or(usize::MAX)
    }

    /// How many answer bytes the next segment may carry: those unsent, within the guest's
    /// window and maximum segment size.
    fn sendable(&self) -> usize {
        if self.state != State::Established || self.fin_sent {
            return 0;
        }
        let in_flight = self.in_flight();
        let unsent = self.response.len().saturating_sub(in_flight);
        let window = usize::from(self.snd_wnd).saturating_sub(in_flight);
        unsent.min(window).min(usize::from(self.mss))
    }

    /// Whether the stack's FIN is due: the connection closes and the whole answer is sent.
    fn fin_due(&self) -> bool {
        self.state == State::Established
            && self.closing
            && !self.fin_sent
            && self.in_flight() >= self.response.len()
    }

    /// Whether the connection has a segment to send.
    pub(crate) fn has_segment(&self) -> bool {
        self.syn_ack_due || self.sendable() > 0 || self.fin_due() || self.ack_due
    }

    /// The next segment to send, with at most `room` bytes of data: its header and data.
    pub(crate) fn next_segment(&mut self, local_port: u16, room: usize) -> Option<(Header, &[u8])> {
        let mut header = Header {
            source_port: local_port,
            destination_port: self.remote_port,
            seq: self.snd_nxt,
            ack: self.rcv_nxt,
            flags: ACK,
            window: self.window(),
            mss: None,
        };
        if self.syn_ack_due {
            self.syn_ack_due = false;
            header.seq = self.iss;
            header.flags = SYN | ACK;
            header.mss = Some(OUR_MSS);
            return Some((header, &[]));
        }
        let len = self.sendable().min(room);
        if len > 0 {
            let start = self.in_flight();
            let end = start.saturating_add(len);
            if end >= self.response.len() {
                header.flags |= PSH;
            }
            // At most a u16's worth.
            self.snd_nxt = self
                .snd_nxt
                .wrapping_add(u32::try_from(len).unwrap_or(u32::MAX));
            self.ack_due = false;
            let data = self.response.get(start..end).unwrap_or_default();
            return Some((header, data));
        }
        if self.fin_due() {
            header.flags |= FIN;
            self.snd_nxt = self.snd_nxt.wrapping_add(1);
            self.fin_sent = true;
            self.ack_due = false;
            return Some((header, &[]));
        }
        if self.ack_due {
            self.ack_due = false;
            return Some((header, &[]));
        }
        None
    }
}
