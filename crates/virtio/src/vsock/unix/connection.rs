//! One connection between a guest socket and a host Unix stream: its state machine, its
//! credit-based flow control both ways, and its shutdown.
//!
//! A connection is opened from the host (`LocalInit`: the device sends the guest a REQUEST and
//! waits for its RESPONSE) or from the guest (`PeerInit`: the device reached the host listener
//! and sends the guest a RESPONSE), and is then `Established`. Each side may shut down its
//! sending or receiving half (SHUTDOWN with its flags; a host stream's end of file, and a host
//! stream closed altogether); a side that is done with both halves ends the connection with a
//! RST, which the other side also may send at any time.
//!
//! Flow control: the device tells the guest, in every packet, of the buffer it keeps for the
//! guest's data ([`CONN_TX_BUF_SIZE`]) and of what the host peer took out of it (`fwd_cnt`).
//! Guest data the host stream does not take at once waits in that buffer; a guest that sends
//! more than it holds broke the protocol, and the connection is reset. The other way, the
//! device reads from the host stream only as much as the guest's credit (its `buf_alloc`
//! less what it has not yet consumed) allows, and asks for more credit when it runs out.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::super::metrics::{VsockMetrics, inc};
use super::super::packet::PacketHeader;
use super::super::{
    CONN_CREDIT_UPDATE_THRESHOLD, CONN_REQUEST_TIMEOUT, CONN_SHUTDOWN_TIMEOUT, CONN_TX_BUF_SIZE,
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VSOCK_HOST_CID,
};

/// Writes `buf` to `stream` as `write` would, but without raising SIGPIPE when the host peer
/// closed its end: the error comes back instead, whatever the process does with the signal.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call, and the
    // descriptor is the stream's, open while it is borrowed.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Opened by the host: the guest has been (or is to be) asked, and has not answered.
    LocalInit,
    /// Opened by the guest: the host listener took it, and the guest is to be told.
    PeerInit,
    /// Both sides are connected.
    Established,
    /// The host side is gone: the guest was told (SHUTDOWN with both flags) and has until the
    /// connection's deadline to answer with RST.
    LocalClosing,
    /// The connection is reset: a RST is (or was) on its way to the guest.
    Killed,
    /// Nothing more to do: the connection is to be removed.
    Done,
}

/// What a connection has to tell the guest, in the order it is sent.
mod pending {
    pub const RST: u8 = 1;
    pub const REQUEST: u8 = 1 << 1;
    pub const RESPONSE: u8 = 1 << 2;
    pub const CREDIT_UPDATE: u8 = 1 << 3;
    pub const RW: u8 = 1 << 4;
    pub const CREDIT_REQUEST: u8 = 1 << 5;
    pub const SHUTDOWN: u8 = 1 << 6;
}

/// One connection.
#[derive(Debug)]
pub(super) struct Connection {
    stream: UnixStream,
    state: State,
    guest_cid: u64,
    /// The host-side port.
    local_port: u32,
    /// The guest-side port.
    peer_port: u32,
    /// Guest data the host stream has not taken yet; at most [`CONN_TX_BUF_SIZE`] bytes.
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are the device's (the `OK` line), not the guest's.
    control_bytes: usize,
    /// Guest bytes the host stream took.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest was last told of.
    last_fwd_cnt_to_peer: Wrapping<u32>,
    /// Host bytes handed to the guest.
    rx_cnt: Wrapping<u32>,
    /// The guest's buffer for this connection, as it last said.
    peer_buf_alloc: u32,
    /// The bytes the guest consumed from it, as it last said.
    peer_fwd_cnt: Wrapping<u32>,
    /// What is to be sent to the guest ([`pending`]).
    pending: u8,
    /// The SHUTDOWN flags to send.
    shutdown_flags: u32,
    /// Whether a CREDIT_REQUEST went to the guest since its last credit news.
    credit_requested: bool,
    /// The host stream reported a hang-up: it is no longer watched, and is read until its end.
    hup: bool,
    /// The host stream reached its end of file (the guest was, or is to be, told).
    host_eof: bool,
    /// The guest said it receives no more.
    peer_shut_rcv: bool,
    /// The guest said it sends no more.
    peer_shut_send: bool,
    /// The host stream's write half was shut down.
    host_write_shut: bool,
    /// When the connection is killed if its shutdown is not complete.
    deadline: Option<Instant>,
    /// The events the muxer's epoll set waits for on the stream, if it watches it.
    pub(super) registered: Option<EventSet>,
    /// Whether the connection is in the muxer's queue of connections with packets to send.
    pub(super) queued: bool,
    /// Whether the connection is in the muxer's kill queue.
    pub(super) in_killq: bool,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state: State::LocalInit,
            guest_cid,
            local_port,
            peer_port,
            tx_buf: VecDeque::new(),
            control_bytes: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            pending: 0,
            shutdown_flags: 0,
            credit_requested: false,
            hup: false,
            host_eof: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_write_shut: false,
            deadline: None,
            registered: None,
            queued: false,
            in_killq: false,
        }
    }

    /// A connection the host opened to the guest's `peer_port` from `local_port`: a REQUEST
    /// is to be sent.
    pub(super) fn new_local(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut conn = Connection::new(stream, guest_cid, local_port, peer_port);
        conn.pending = pending::REQUEST;
        // A guest that never answers does not hold the connection for ever.
        conn.start_deadline(CONN_REQUEST_TIMEOUT);
        conn
    }

    /// A connection the guest opened with `request`, which the host listener took: a
    /// RESPONSE is to be sent.
    pub(super) fn new_peer(stream: UnixStream, guest_cid: u64, request: &PacketHeader) -> Self {
        let mut conn = Connection::new(stream, guest_cid, request.dst_port, request.src_port);
        conn.state = State::PeerInit;
        conn.pending = pending::RESPONSE;
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn
    }

    /// The host stream.
    pub(super) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether the connection is to be removed.
    pub(super) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// When the connection is to be killed, if it is waiting on a shutdown.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the connection has packets for the guest.
    pub(super) fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// The bytes the guest holds held by this connection's buffer, for its bound.
    pub(super) fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The host bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data is to be read for the guest.
    fn wants_to_read(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.peer_shut_rcv
    }

    /// The events to wait for on the host stream, if it is to be watched at all: until it
    /// hangs up, it is, for its hang-up if nothing else.
    pub(super) fn interest(&self) -> Option<EventSet> {
        if self.hup || matches!(self.state, State::Killed | State::Done) {
            return None;
        }
        let mut events = EventSet::empty();
        if self.wants_to_read() && self.pending & pending::RW == 0 && self.peer_credit() > 0 {
            events |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        Some(events)
    }

    /// Resets the connection: a RST goes to the guest, nothing else, and the host stream is
    /// closed once it has.
    pub(super) fn kill(&mut self, metrics: &VsockMetrics) {
        if matches!(self.state, State::Killed | State::Done) {
            return;
        }
        inc(&metrics.conns_killed);
        self.end_with_rst();
    }

    /// Ends the connection with a RST to the guest, as the protocol would.
    fn end_with_rst(&mut self) {
        self.state = State::Killed;
        self.pending = pending::RST;
        self.tx_buf = VecDeque::new();
        self.deadline = None;
    }

    /// Starts the clock on a shutdown the other side is to complete.
    fn start_deadline(&mut self, timeout: Duration) {
        if self.deadline.is_none() {
            self.deadline = Instant::now().checked_add(timeout);
        }
    }

    /// Takes a packet the guest sent on this connection (its context IDs and type checked).
    pub(super) fn send_pkt(&mut self, header: &PacketHeader, payload: &[u8], m: &VsockMetrics) {
        if header.op == OP_RST {
            // The guest is done with the connection: nothing goes back.
            self.state = State::Done;
            self.pending = 0;
            return;
        }
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        self.credit_requested = false;
        match (self.state, header.op) {
            (State::Killed | State::Done, _) => {}
            (State::LocalInit, OP_RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.tx_buf.extend(line.as_bytes());
                self.control_bytes = line.len();
                self.flush(m);
            }
            (State::Established, OP_RW) => self.guest_data(payload, m),
            (State::PeerInit | State::Established | State::LocalClosing, OP_CREDIT_UPDATE) => {}
            (State::PeerInit | State::Established | State::LocalClosing, OP_CREDIT_REQUEST) => {
                self.pending |= pending::CREDIT_UPDATE;
            }
            (State::Established, OP_SHUTDOWN) => self.guest_shutdown(header.flags),
            // The host side is gone: the guest's data has nowhere to go.
            (State::LocalClosing, OP_RW) => {}
            // Both sides are done: the RST the guest waits for.
            (State::LocalClosing, OP_SHUTDOWN) => self.end_with_rst(),
            // Anything else breaks the protocol: a second REQUEST or RESPONSE, data before
            // the connection is up or after the guest said it sends no more, an unknown op.
            _ => {
                inc(&m.conn_event_fails);
                self.kill(m);
            }
        }
        self.read_unwatched();
    }

    /// A stream that hung up is no longer watched: it is read, while the guest has credit,
    /// until its end.
    fn read_unwatched(&mut self) {
        if self.hup && self.wants_to_read() && self.peer_credit() > 0 {
            self.pending |= pending::RW;
        }
    }

    /// The guest sent `payload` on an established connection.
    fn guest_data(&mut self, payload: &[u8], m: &VsockMetrics) {
        if self.peer_shut_send {
            inc(&m.conn_event_fails);
            self.kill(m);
            return;
        }
        if payload.is_empty() {
            return;
        }
        let mut rest = payload;
        if self.tx_buf.is_empty() {
            match send(&self.stream, payload) {
                Ok(written) => {
                    self.forwarded(written);
                    rest = payload.get(written..).unwrap_or_default();
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    log::debug!(
                        "vsock: cannot write to host port {}: {err}",
                        self.local_port
                    );
                    inc(&m.tx_write_fails);
                    self.kill(m);
                    return;
                }
            }
        }
        if rest.is_empty() {
            return;
        }
        let limit = usize::try_from(CONN_TX_BUF_SIZE).unwrap_or(usize::MAX);
        let guest_held = self.tx_buf.len().saturating_sub(self.control_bytes);
        if guest_held.saturating_add(rest.len()) > limit {
            // More than the credit the guest was given.
            log::debug!(
                "vsock: the guest overran its credit on host port {}",
                self.local_port
            );
            inc(&m.tx_write_fails);
            self.kill(m);
            return;
        }
        self.tx_buf.extend(rest);
    }

    /// Counts `written` bytes the host stream took, the device's own first.
    fn forwarded(&mut self, written: usize) {
        let control = written.min(self.control_bytes);
        self.control_bytes = self.control_bytes.saturating_sub(control);
        let guest = u32::try_from(written.saturating_sub(control)).unwrap_or(u32::MAX);
        self.fwd_cnt += guest;
        if (self.fwd_cnt - self.last_fwd_cnt_to_peer).0 >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// Writes what the guest's buffer holds to the host stream, as far as it takes it.
    fn flush(&mut self, m: &VsockMetrics) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send(&self.stream, front) {
                Ok(0) => break,
                Ok(written) => {
                    self.tx_buf.drain(..written.min(front.len()));
                    self.forwarded(written);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    log::debug!(
                        "vsock: cannot flush to host port {}: {err}",
                        self.local_port
                    );
                    inc(&m.tx_flush_fails);
                    self.kill(m);
                    return;
                }
            }
        }
        if self.tx_buf.is_empty() {
            self.tx_buf = VecDeque::new();
            self.after_flush();
        }
    }

    /// The guest's buffer is empty: a half the guest shut down is shut on the host stream.
    fn after_flush(&mut self) {
        if self.peer_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.peer_shut_send && self.peer_shut_rcv {
            // The guest is done both ways and has its data delivered: the RST it waits for.
            self.end_with_rst();
        }
    }

    /// The guest shut down the halves in `flags`.
    fn guest_shutdown(&mut self, flags: u32) {
        self.peer_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        if self.peer_shut_rcv {
            self.pending &= !(pending::RW | pending::CREDIT_REQUEST);
        }
        if self.peer_shut_send && self.peer_shut_rcv {
            self.start_deadline(CONN_SHUTDOWN_TIMEOUT);
        }
        if self.tx_buf.is_empty() {
            self.after_flush();
        }
    }

    /// The host stream reported `events`.
    pub(super) fn notify(&mut self, events: EventSet, m: &VsockMetrics) {
        if matches!(self.state, State::Killed | State::Done) {
            return;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.hup = true;
        }
        if events.contains(EventSet::OUT) || (self.hup && !self.tx_buf.is_empty()) {
            self.flush(m);
        }
        if matches!(self.state, State::Killed | State::Done) {
            return;
        }
        if self.wants_to_read() && (events.contains(EventSet::IN) || self.hup) {
            self.pending |= pending::RW;
        } else if self.hup {
            // Closed both ways, with nothing more the guest will take from it.
            self.host_gone();
        }
    }

    /// The host stream ended: the guest is told its peer sends no more, and when the stream
    /// is closed altogether, that it receives no more either.
    fn host_end(&mut self) {
        self.host_eof = true;
        self.pending &= !(pending::RW | pending::CREDIT_REQUEST);
        if self.hup {
            self.host_gone();
        } else {
            self.shutdown_flags = SHUTDOWN_SEND;
            self.pending |= pending::SHUTDOWN;
        }
    }

    /// The host stream is closed: the guest is told to finish, and has a deadline.
    fn host_gone(&mut self) {
        if self.state != State::Established {
            return;
        }
        self.state = State::LocalClosing;
        self.shutdown_flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        self.pending |= pending::SHUTDOWN;
        self.tx_buf = VecDeque::new();
        self.start_deadline(CONN_SHUTDOWN_TIMEOUT);
    }

    /// The header of a packet from this connection's host side to the guest.
    fn header(&mut self, op: u16) -> PacketHeader {
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Fills the next packet for the guest, its payload in the start of `payload`; returns
    /// its length, or `None` when there is nothing to send.
    pub(super) fn recv_pkt(
        &mut self,
        header: &mut PacketHeader,
        payload: &mut [u8],
        m: &VsockMetrics,
    ) -> Option<usize> {
        loop {
            let next = self.pending & self.pending.wrapping_neg();
            if next == 0 {
                return None;
            }
            self.pending &= !next;
            match next {
                pending::RST => {
                    *header = self.header(OP_RST);
                    self.state = State::Done;
                    self.pending = 0;
                    return Some(0);
                }
                pending::REQUEST => {
                    *header = self.header(OP_REQUEST);
                    return Some(0);
                }
                pending::RESPONSE => {
                    *header = self.header(OP_RESPONSE);
                    self.state = State::Established;
                    self.read_unwatched();
                    return Some(0);
                }
                pending::CREDIT_UPDATE => {
                    *header = self.header(OP_CREDIT_UPDATE);
                    return Some(0);
                }
                pending::CREDIT_REQUEST => {
                    *header = self.header(OP_CREDIT_REQUEST);
                    return Some(0);
                }
                pending::SHUTDOWN => {
                    *header = self.header(OP_SHUTDOWN);
                    header.flags = self.shutdown_flags;
                    return Some(0);
                }
                pending::RW => {
                    if let Some(len) = self.read_host(header, payload, m) {
                        return Some(len);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Reads host data for the guest, within its credit.
    fn read_host(
        &mut self,
        header: &mut PacketHeader,
        payload: &mut [u8],
        m: &VsockMetrics,
    ) -> Option<usize> {
        if !self.wants_to_read() {
            return None;
        }
        let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                *header = self.header(OP_CREDIT_REQUEST);
                return Some(0);
            }
            return None;
        }
        let want = credit.min(payload.len());
        let buf = payload.get_mut(..want)?;
        match self.stream.read(buf) {
            Ok(0) => {
                self.host_end();
                None
            }
            Ok(read) => {
                // More may wait: the stream is read again until it would block.
                self.pending |= pending::RW;
                *header = self.header(OP_RW);
                header.len = u32::try_from(read).unwrap_or(0);
                self.rx_cnt += header.len;
                Some(read.min(want))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if self.hup {
                    // A closed stream with nothing more: its end.
                    self.host_end();
                }
                None
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {
                self.pending |= pending::RW;
                None
            }
            Err(err) => {
                log::debug!("vsock: cannot read host port {}: {err}", self.local_port);
                inc(&m.rx_read_fails);
                // The RST goes next.
                self.kill(m);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    const LOCAL: u32 = 1 << 30;

    fn guest(op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port: 52,
            dst_port: LOCAL,
            type_: TYPE_STREAM,
            op,
            buf_alloc: CONN_TX_BUF_SIZE,
            ..PacketHeader::default()
        }
    }

    /// The ops of every packet the connection has for the guest.
    fn ops(conn: &mut Connection, m: &VsockMetrics) -> Vec<u16> {
        let mut ops = Vec::new();
        let mut header = PacketHeader::default();
        let mut buf = [0u8; 256];
        while conn.recv_pkt(&mut header, &mut buf, m).is_some() {
            ops.push(header.op);
        }
        ops
    }

    /// A connection the host opened and the guest accepted, and the host's end of it, which
    /// has read its `OK` line.
    fn established(m: &VsockMetrics) -> (Connection, UnixStream) {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::new_local(ours, 3, LOCAL, 52);
        assert_eq!(ops(&mut conn, m), [OP_REQUEST]);
        conn.send_pkt(&guest(OP_RESPONSE), &[], m);
        let line = format!("OK {LOCAL}\n");
        let mut got = vec![0u8; line.len()];
        host.read_exact(&mut got).unwrap();
        assert_eq!(got, line.as_bytes());
        host.set_nonblocking(true).unwrap();
        (conn, host)
    }

    fn nothing_to_read(host: &mut UnixStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(host.read(&mut buf), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn a_credit_request_is_answered_with_a_credit_update() {
        let m = VsockMetrics::default();
        let (mut conn, _host) = established(&m);
        let mut request = guest(OP_CREDIT_REQUEST);
        request.buf_alloc = 1000;
        conn.send_pkt(&request, &[], &m);
        let mut header = PacketHeader::default();
        let mut buf = [0u8; 16];
        assert_eq!(conn.recv_pkt(&mut header, &mut buf, &m), Some(0));
        assert_eq!(header.op, OP_CREDIT_UPDATE);
        assert_eq!(header.buf_alloc, CONN_TX_BUF_SIZE);
        assert_eq!((header.src_port, header.dst_port), (LOCAL, 52));
        assert_eq!(conn.peer_buf_alloc, 1000, "the guest's own credit is taken");
        assert_eq!(conn.recv_pkt(&mut header, &mut buf, &m), None);
    }

    #[test]
    fn an_empty_data_packet_writes_nothing() {
        let m = VsockMetrics::default();
        let (mut conn, mut host) = established(&m);
        conn.send_pkt(&guest(OP_RW), &[], &m);
        assert!(nothing_to_read(&mut host));
        assert_eq!(conn.fwd_cnt.0, 0);
        assert!(ops(&mut conn, &m).is_empty());
        assert_eq!(conn.state, State::Established);
    }

    #[test]
    fn data_after_the_guest_shut_its_send_half_kills_the_connection_once() {
        let m = VsockMetrics::default();
        let (mut conn, mut host) = established(&m);
        let mut shutdown = guest(OP_SHUTDOWN);
        shutdown.flags = SHUTDOWN_SEND;
        conn.send_pkt(&shutdown, &[], &m);
        conn.send_pkt(&guest(OP_RW), b"late", &m);
        assert_eq!(m.conn_event_fails.load(Ordering::SeqCst), 1);
        assert_eq!(m.conns_killed.load(Ordering::SeqCst), 1);
        // Killed: whatever else the guest sends is dropped, a second kill counts nothing.
        conn.send_pkt(&guest(OP_RW), b"later", &m);
        conn.kill(&m);
        assert_eq!(m.conn_event_fails.load(Ordering::SeqCst), 1);
        assert_eq!(m.conns_killed.load(Ordering::SeqCst), 1);
        assert_eq!(ops(&mut conn, &m), [OP_RST]);
        assert!(conn.is_done());
        // The host saw the end of the stream and none of the late data.
        let mut rest = Vec::new();
        host.set_nonblocking(false).unwrap();
        drop(conn);
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[test]
    fn a_write_the_host_stream_refuses_resets_the_connection() {
        let m = VsockMetrics::default();
        let (mut conn, host) = established(&m);
        // The host takes nothing more: the write fails (EPIPE), it does not block.
        host.shutdown(Shutdown::Read).unwrap();
        conn.send_pkt(&guest(OP_RW), b"data", &m);
        assert_eq!(m.tx_write_fails.load(Ordering::SeqCst), 1);
        assert_eq!(m.conns_killed.load(Ordering::SeqCst), 1);
        assert_eq!(
            conn.buffered(),
            0,
            "nothing is held for a stream that refuses it"
        );
        assert_eq!(ops(&mut conn, &m), [OP_RST]);
    }

    #[test]
    fn after_the_host_closed_guest_data_is_dropped_and_its_shutdown_answered_with_rst() {
        let m = VsockMetrics::default();
        let (mut conn, host) = established(&m);
        drop(host);
        conn.notify(EventSet::IN | EventSet::HANG_UP, &m);
        let mut header = PacketHeader::default();
        let mut buf = [0u8; 16];
        assert_eq!(conn.recv_pkt(&mut header, &mut buf, &m), Some(0));
        assert_eq!(header.op, OP_SHUTDOWN);
        assert_eq!(header.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(conn.state, State::LocalClosing);
        assert!(conn.deadline().is_some());
        // Data still in flight from the guest has nowhere to go: dropped, not a violation.
        conn.send_pkt(&guest(OP_RW), b"in flight", &m);
        assert_eq!(conn.state, State::LocalClosing);
        assert_eq!(m.conn_event_fails.load(Ordering::SeqCst), 0);
        assert_eq!(m.tx_write_fails.load(Ordering::SeqCst), 0);
        assert!(ops(&mut conn, &m).is_empty());
        // The guest's own shutdown completes it: the RST it waits for, and no deadline.
        let mut shutdown = guest(OP_SHUTDOWN);
        shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        conn.send_pkt(&shutdown, &[], &m);
        assert_eq!(conn.deadline(), None);
        assert_eq!(ops(&mut conn, &m), [OP_RST]);
        assert!(conn.is_done());
        assert_eq!(m.conns_killed.load(Ordering::SeqCst), 0, "an orderly end");
    }
}
