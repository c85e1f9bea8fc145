//! The Unix-socket backend: a listener for host processes, the connections, and the epoll set
//! that watches their host sockets.
//!
//! Host processes connect to the listener at `uds_path` and write `CONNECT <port>\n` (at most
//! [`MAX_HANDSHAKE_LEN`] bytes); the backend then asks the guest for a connection to that
//! port from a host port of its own (counting up from 2^30), and the connection answers
//! `OK <host port>\n` once the guest accepts. A guest REQUEST to host port P connects, without
//! blocking, to the Unix socket at `<uds_path>_P`, and is refused with a RST when nothing
//! listens there or the listener's backlog is full.
//!
//! Every host socket is non-blocking and watched, level-triggered, by the backend's own epoll
//! set, whose descriptor is the backend's ([`AsRawFd`]): the device's loop watches it, and
//! [`VsockBackend::notify`] handles at most [`MAX_EVENTS_PER_NOTIFY`] of its events per call.
//! A timerfd in the same set fires when the nearest deadline (of a shutdown, or of a guest's
//! answer to a connection request) passes.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::super::backend::VsockBackend;
use super::super::metrics::{VsockMetrics, inc};
use super::super::packet::PacketHeader;
use super::super::{
    Error, MAX_CONNECTIONS, MAX_EVENTS_PER_NOTIFY, MAX_PENDING_RESETS, OP_REQUEST, OP_RST, Result,
    TYPE_STREAM, VSOCK_HOST_CID, check_cid,
};
use super::connection::Connection;

/// The longest `CONNECT <port>\n` line a host process may write, in bytes.
pub const MAX_HANDSHAKE_LEN: usize = 32;
/// The first host port given to connections the host opens.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// The epoll token of the listener.
const LISTENER_TOKEN: u64 = u64::MAX;
/// The epoll token of the shutdown timer.
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// The most host connections accepted in one event of the listener.
const ACCEPT_BUDGET: usize = 32;

/// A connection: its host-side port, and its guest-side port.
type ConnKey = (u32, u32);

/// A host connection still writing its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What a host socket's epoll token names.
#[derive(Clone, Copy, Debug)]
enum Target {
    Handshake,
    Conn(ConnKey),
}

/// Firecracker's hybrid vsock host side, over Unix sockets.
#[derive(Debug)]
pub struct VsockUnixBackend {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Host sockets by descriptor, which is their epoll token.
    targets: HashMap<RawFd, Target>,
    /// Connections with packets for the guest, each at most once.
    rxq: VecDeque<ConnKey>,
    /// Resets for packets that name no connection, at most [`MAX_PENDING_RESETS`].
    resets: VecDeque<ConnKey>,
    /// Connections with a deadline: at most one entry each, so at most [`MAX_CONNECTIONS`].
    killq: Vec<ConnKey>,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
}

impl VsockUnixBackend {
    /// The host side of a guest with context ID `guest_cid`, listening at `uds_path` at once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCid`] for a reserved CID, [`Error::Bind`] when the socket cannot be
    /// made there (a path that exists is an error), [`Error::Backend`] when the epoll set or
    /// the timer cannot.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Self> {
        let guest_cid = check_cid(guest_cid)?;
        let uds_path = uds_path.into();
        let bind = |path: &Path| {
            let listener = UnixListener::bind(path)?;
            listener.set_nonblocking(true)?;
            Ok::<_, io::Error>(listener)
        };
        let listener = bind(&uds_path).map_err(|source| Error::Bind {
            path: uds_path.clone(),
            source,
        })?;
        let setup = || {
            let epoll = Epoll::new()?;
            let timer = TimerFd::new()?;
            epoll.ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )?;
            epoll.ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )?;
            Ok::<_, io::Error>((epoll, timer))
        };
        let (epoll, timer) = match setup() {
            Ok(parts) => parts,
            Err(err) => {
                let _ = std::fs::remove_file(&uds_path);
                return Err(Error::Backend(err));
            }
        };
        Ok(VsockUnixBackend {
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            targets: HashMap::new(),
            rxq: VecDeque::new(),
            resets: VecDeque::new(),
            killq: Vec::new(),
            armed: None,
            next_local_port: FIRST_LOCAL_PORT,
            metrics: Arc::default(),
        })
    }

    /// Counts into `metrics`, a device's counters, from now on.
    pub fn with_metrics(mut self, metrics: Arc<VsockMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The path of the listener.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The connections open, and host connections still writing their `CONNECT` line.
    pub fn connections(&self) -> usize {
        self.conns.len().saturating_add(self.handshakes.len())
    }

    /// The guest data held for host peers that have not taken it yet, in bytes.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(Connection::buffered).sum()
    }

    /// Queues a RST for the guest's `(local, peer)` ports, unless too many wait.
    fn queue_reset(&mut self, key: ConnKey) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(key);
        } else {
            inc(&self.metrics.conn_event_fails);
        }
    }

    /// Brings the muxer's view of the connection `key` up to date after it changed: removes
    /// it when done, waits for the host socket events it needs, queues it for the guest and
    /// for its deadline.
    fn after_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_done() {
            self.remove(key);
            return;
        }
        let fd = conn.stream().as_raw_fd();
        let want = conn.interest();
        if want != conn.registered {
            let result = match (conn.registered, want) {
                (None, Some(events)) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(events, token(fd)),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (_, Some(events)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(events, token(fd)),
                ),
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(err) => {
                    log::warn!("vsock: cannot watch a host stream: {err}");
                    inc(&self.metrics.conn_event_fails);
                    conn.kill(&self.metrics);
                }
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(key);
        }
        if let Some(deadline) = conn.deadline() {
            if !conn.in_killq {
                conn.in_killq = true;
                self.killq.push(key);
            }
            if self.armed.is_none_or(|armed| deadline < armed) {
                self.arm_timer();
            }
        }
    }

    /// Removes the connection `key`, closing its host stream.
    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream().as_raw_fd();
            self.targets.remove(&fd);
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            inc(&self.metrics.conns_removed);
        }
    }

    /// Arms the timer for the nearest deadline, or disarms it.
    fn arm_timer(&mut self) {
        let nearest = self
            .killq
            .iter()
            .filter_map(|key| self.conns.get(key).and_then(Connection::deadline))
            .min();
        let result = match nearest {
            Some(deadline) => {
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .max(std::time::Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        self.armed = nearest;
        if let Err(err) = result {
            log::error!("vsock: cannot arm the shutdown timer: {err}");
            inc(&self.metrics.muxer_event_fails);
        }
    }

    /// Kills the connections whose deadline passed, and forgets those that no longer have
    /// one.
    fn sweep_killq(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let conns = &mut self.conns;
        self.killq.retain(|key| {
            let Some(conn) = conns.get_mut(key) else {
                return false;
            };
            match conn.deadline() {
                Some(deadline) if deadline > now => true,
                Some(_) => {
                    conn.in_killq = false;
                    expired.push(*key);
                    false
                }
                None => {
                    conn.in_killq = false;
                    false
                }
            }
        });
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                log::debug!("vsock: a connection timed out: {key:?}");
                conn.kill(&self.metrics);
                self.after_conn(key);
            }
        }
        self.arm_timer();
    }

    /// Accepts the host connections waiting on the listener, as many as the cap allows.
    fn accept(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::warn!("vsock: cannot accept a host connection: {err}");
                    inc(&self.metrics.muxer_event_fails);
                    return;
                }
            };
            if self.connections() >= MAX_CONNECTIONS {
                log::warn!("vsock: refused a host connection: {MAX_CONNECTIONS} are open");
                inc(&self.metrics.muxer_event_fails);
                continue;
            }
            let fd = stream.as_raw_fd();
            let watched = stream.set_nonblocking(true).and_then(|()| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token(fd)),
                )
            });
            if let Err(err) = watched {
                log::warn!("vsock: cannot watch a host connection: {err}");
                inc(&self.metrics.muxer_event_fails);
                continue;
            }
            self.targets.insert(fd, Target::Handshake);
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Reads the `CONNECT` line of the host connection `fd`, as far as it came.
    fn handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // A byte at a time, so that nothing past the line is taken from the stream.
        let port = loop {
            match handshake.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&handshake.line),
                Ok(1) if handshake.line.len() < MAX_HANDSHAKE_LEN => {
                    handshake.line.push(byte[0]);
                }
                // Too long, or the end of the stream.
                Ok(_) => break None,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        self.targets.remove(&fd);
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            log::debug!("vsock: a host connection did not send a CONNECT line");
            inc(&self.metrics.conn_event_fails);
            return;
        };
        let Some(local_port) = self.allocate_port(peer_port) else {
            inc(&self.metrics.conn_event_fails);
            return;
        };
        let key = (local_port, peer_port);
        let mut conn =
            Connection::new_local(handshake.stream, self.guest_cid, local_port, peer_port);
        conn.registered = Some(EventSet::IN);
        self.targets.insert(fd, Target::Conn(key));
        self.conns.insert(key, conn);
        inc(&self.metrics.conns_added);
        self.after_conn(key);
    }

    /// A host port for a connection to the guest's `peer_port` that no connection uses.
    fn allocate_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(next) if next < u32::MAX => next,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    /// The guest asks for host port `header.dst_port`: connects to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, header: &PacketHeader) {
        let key = (header.dst_port, header.src_port);
        if self.connections() >= MAX_CONNECTIONS {
            log::debug!("vsock: refused a guest connection: {MAX_CONNECTIONS} are open");
            self.queue_reset(key);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", header.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(err) => {
                log::debug!(
                    "vsock: the guest's connection to {} is refused: {err}",
                    Path::new(&path).display()
                );
                self.queue_reset(key);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        self.targets.insert(fd, Target::Conn(key));
        self.conns
            .insert(key, Connection::new_peer(stream, self.guest_cid, header));
        inc(&self.metrics.conns_added);
        self.after_conn(key);
    }
}

impl Drop for VsockUnixBackend {
    fn drop(&mut self) {
        // The listener's path goes with it, so that a new device can bind it again.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl AsRawFd for VsockUnixBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl VsockBackend for VsockUnixBackend {
    fn send_pkt(&mut self, header: &PacketHeader, payload: &[u8]) {
        if header.src_cid != self.guest_cid || header.dst_cid != VSOCK_HOST_CID {
            log::debug!(
                "vsock: dropped a packet from CID {} to CID {}",
                header.src_cid,
                header.dst_cid
            );
            inc(&self.metrics.conn_event_fails);
            return;
        }
        let key = (header.dst_port, header.src_port);
        if header.type_ != TYPE_STREAM {
            inc(&self.metrics.conn_event_fails);
            if header.op != OP_RST {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.kill(&self.metrics);
                    self.after_conn(key);
                } else {
                    self.queue_reset(key);
                }
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.send_pkt(header, payload, &self.metrics);
            self.after_conn(key);
            return;
        }
        match header.op {
            OP_REQUEST => self.connect_to_host(header),
            OP_RST => {}
            _ => self.queue_reset(key),
        }
    }

    fn reject(&mut self, header: &PacketHeader) {
        if header.src_cid != self.guest_cid || header.dst_cid != VSOCK_HOST_CID {
            return;
        }
        let key = (header.dst_port, header.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.kill(&self.metrics);
            self.after_conn(key);
        } else if header.op != OP_RST {
            self.queue_reset(key);
        }
    }

    fn recv_pkt(&mut self, header: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
        if let Some((local_port, peer_port)) = self.resets.pop_front() {
            *header = PacketHeader {
                src_cid: VSOCK_HOST_CID,
                dst_cid: self.guest_cid,
                src_port: local_port,
                dst_port: peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..PacketHeader::default()
            };
            return Some(0);
        }
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let packet = conn.recv_pkt(header, payload, &self.metrics);
            self.after_conn(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rxq.is_empty()
    }

    fn notify(&mut self, _events: EventSet) {
        let mut events = [EpollEvent::default(); MAX_EVENTS_PER_NOTIFY];
        let count = match self.epoll.wait(0, &mut events) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => 0,
            Err(err) => {
                log::error!("vsock: cannot read the backend's epoll set: {err}");
                inc(&self.metrics.muxer_event_fails);
                return;
            }
        };
        for event in events.iter().take(count) {
            match event.data() {
                LISTENER_TOKEN => self.accept(),
                TIMER_TOKEN => self.sweep_killq(),
                data => {
                    let Ok(fd) = RawFd::try_from(data) else {
                        continue;
                    };
                    match self.targets.get(&fd).copied() {
                        Some(Target::Handshake) => self.handshake(fd),
                        Some(Target::Conn(key)) => {
                            if let Some(conn) = self.conns.get_mut(&key) {
                                conn.notify(event.event_set(), &self.metrics);
                                self.after_conn(key);
                            }
                        }
                        None => {}
                    }
                }
            }
        }
    }

    fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            if conn.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            inc(&self.metrics.conns_removed);
        }
        for (fd, _) in self.handshakes.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.targets.clear();
        self.rxq.clear();
        self.resets.clear();
        self.killq.clear();
        self.arm_timer();
    }
}

/// The epoll token of a host socket: its descriptor.
fn token(fd: RawFd) -> u64 {
    u64::try_from(fd).unwrap_or(u64::MAX)
}

/// The port of a `CONNECT <port>` line (its newline taken off).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to the Unix stream socket at `path` without blocking: a listener whose backlog is
/// full refuses at once (`EAGAIN`) instead of keeping the device's thread waiting.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?;
    // One byte stays for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket() has no memory preconditions; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just made and owns alone; the stream takes it
    // over and closes it when dropped.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?;
    // SAFETY: `addr` is a valid sockaddr_un that lives for the call, and `len` is its size.
    let result = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use std::os::unix::ffi::OsStringExt;

    use super::super::super::{CONN_TX_BUF_SIZE, OP_RESPONSE, OP_RW, OP_SHUTDOWN};
    use super::*;

    const CID: u64 = 3;

    /// A fresh directory for a test's sockets, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("ember-mux-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn backend() -> (VsockUnixBackend, TempDir) {
        let dir = TempDir::new();
        let backend = VsockUnixBackend::new(CID, dir.0.join("v.sock")).unwrap();
        (backend, dir)
    }

    fn guest_header(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: CONN_TX_BUF_SIZE,
            ..PacketHeader::default()
        }
    }

    /// Lets the backend handle its host sockets' events, a few rounds.
    fn pump(backend: &mut VsockUnixBackend) {
        for _ in 0..4 {
            backend.notify(EventSet::IN);
        }
    }

    /// Every packet the backend has for the guest, headers only.
    fn drain(backend: &mut VsockUnixBackend) -> Vec<PacketHeader> {
        let mut packets = Vec::new();
        let mut buf = vec![0u8; 4096];
        while backend.has_pending_rx() {
            let mut header = PacketHeader::default();
            match backend.recv_pkt(&mut header, &mut buf) {
                Some(_) => packets.push(header),
                None => break,
            }
        }
        packets
    }

    /// A host process connects to the guest's `port`: its stream, once the backend queued
    /// the request.
    fn host_connect(backend: &mut VsockUnixBackend, port: u32) -> (UnixStream, PacketHeader) {
        let mut host = UnixStream::connect(backend.uds_path()).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        pump(backend);
        let request = drain(backend)
            .into_iter()
            .find(|h| h.op == OP_REQUEST && h.dst_port == port)
            .expect("a connection request");
        (host, request)
    }

    fn closed(stream: &mut UnixStream) -> bool {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        match stream.read(&mut buf) {
            Ok(read) => read == 0,
            Err(err) => err.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    /// Reads the `OK <port>` line the backend writes once the guest accepted.
    fn read_ok_line(host: &mut UnixStream) -> Vec<u8> {
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            host.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        line
    }

    #[test]
    fn a_host_stream_reset_with_data_unread_kills_the_connection() {
        let (mut backend, _dir) = backend();
        let (host, request) = host_connect(&mut backend, 52);
        let local = request.src_port;
        backend.send_pkt(&guest_header(OP_RESPONSE, 52, local), &[]);
        // Closed with the OK line unread: the backend's read fails with a reset.
        drop(host);
        pump(&mut backend);
        let packets = drain(&mut backend);
        assert!(
            packets
                .iter()
                .any(|h| h.op == OP_RST && h.src_port == local),
            "{packets:?}"
        );
        assert!(backend.conns.is_empty());
        assert_eq!(
            backend
                .metrics
                .rx_read_fails
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!(
            backend
                .metrics
                .conns_killed
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }

    #[test]
    fn the_backend_names_its_listener_path_and_guest_cid() {
        let (backend, dir) = backend();
        assert_eq!(backend.uds_path(), dir.0.join("v.sock"));
        assert_eq!(backend.guest_cid(), CID);
    }

    #[test]
    fn a_connect_line_split_across_writes_waits_for_its_end() {
        let (mut backend, _dir) = backend();
        let mut host = UnixStream::connect(backend.uds_path()).unwrap();
        host.write_all(b"CONNECT 5").unwrap();
        pump(&mut backend);
        assert_eq!(backend.handshakes.len(), 1, "still reading its line");
        assert!(backend.conns.is_empty());
        assert!(!backend.has_pending_rx());
        host.write_all(b"2\n").unwrap();
        pump(&mut backend);
        assert!(backend.handshakes.is_empty());
        let packets = drain(&mut backend);
        assert_eq!(packets.len(), 1);
        assert_eq!((packets[0].op, packets[0].dst_port), (OP_REQUEST, 52));
        assert_eq!(
            backend
                .metrics
                .conns_added
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }

    #[test]
    fn a_reset_closes_host_connections_still_writing_their_connect_line() {
        let (mut backend, _dir) = backend();
        let mut host = UnixStream::connect(backend.uds_path()).unwrap();
        host.write_all(b"CONN").unwrap();
        pump(&mut backend);
        assert_eq!(backend.connections(), 1);
        backend.reset();
        assert_eq!(backend.connections(), 0);
        assert!(backend.targets.is_empty());
        assert!(closed(&mut host), "the host stream is closed");
        // The rest of its line reaches nothing.
        let _ = host.write_all(b"ECT 52\n");
        pump(&mut backend);
        assert!(!backend.has_pending_rx());
    }

    #[test]
    fn local_ports_wrap_around_before_u32_max() {
        let (mut backend, _dir) = backend();
        backend.next_local_port = u32::MAX - 1;
        let (_a, first) = host_connect(&mut backend, 52);
        let (_b, second) = host_connect(&mut backend, 52);
        assert_eq!(first.src_port, u32::MAX - 1);
        assert_eq!(
            second.src_port, FIRST_LOCAL_PORT,
            "u32::MAX itself is never used"
        );
        // A port in use for the same guest port is skipped.
        backend.next_local_port = u32::MAX - 1;
        let (_c, third) = host_connect(&mut backend, 52);
        assert_eq!(third.src_port, FIRST_LOCAL_PORT + 1);
    }

    #[test]
    fn a_rejected_packet_from_another_cid_is_ignored_and_one_for_no_connection_is_reset() {
        let (mut backend, _dir) = backend();
        let mut foreign = guest_header(OP_RW, 5000, 80);
        foreign.src_cid = CID + 1;
        backend.reject(&foreign);
        assert!(!backend.has_pending_rx());
        backend.reject(&guest_header(OP_RST, 5000, 80));
        assert!(!backend.has_pending_rx(), "a RST is never answered");
        backend.reject(&guest_header(OP_RW, 5000, 80));
        let packets = drain(&mut backend);
        assert_eq!(packets.len(), 1);
        let rst = &packets[0];
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 80, 5000));
    }

    #[test]
    fn a_packet_of_another_type_on_a_live_connection_kills_it() {
        let (mut backend, _dir) = backend();
        let (mut host, request) = host_connect(&mut backend, 52);
        let local = request.src_port;
        backend.send_pkt(&guest_header(OP_RESPONSE, 52, local), &[]);
        assert_eq!(backend.conns.len(), 1);
        let mut dgram = guest_header(OP_RW, 52, local);
        dgram.type_ = 2;
        backend.send_pkt(&dgram, b"x");
        let packets = drain(&mut backend);
        assert!(
            packets
                .iter()
                .any(|h| h.op == OP_RST && h.src_port == local),
            "{packets:?}"
        );
        assert!(backend.conns.is_empty());
        assert_eq!(
            backend
                .metrics
                .conn_event_fails
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        let mut ok = [0u8; 32];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = host.read(&mut ok).unwrap();
        assert!(ok[..n].starts_with(b"OK "));
        assert!(closed(&mut host));
    }

    #[test]
    fn a_guest_connection_to_a_path_too_long_for_a_socket_is_reset() {
        let dir = TempDir::new();
        // The listener's path fits; with `_<port>` after it, it does not.
        let base = dir.0.join("v").into_os_string().into_vec();
        let pad = 104usize.saturating_sub(base.len());
        let mut name = base;
        name.extend(std::iter::repeat_n(b'x', pad));
        let path = PathBuf::from(std::ffi::OsString::from_vec(name));
        let mut backend = VsockUnixBackend::new(CID, &path).unwrap();
        backend.send_pkt(&guest_header(OP_REQUEST, 5000, 1_000_000), &[]);
        let packets = drain(&mut backend);
        assert_eq!(packets.len(), 1);
        assert_eq!((packets[0].op, packets[0].src_port), (OP_RST, 1_000_000));
        assert_eq!(backend.connections(), 0);
        assert!(
            connect_nonblocking(Path::new("a\0b")).is_err(),
            "a NUL in a path is refused"
        );
    }

    #[test]
    fn a_connection_the_guest_reset_before_reading_its_request_sends_nothing() {
        let (mut backend, _dir) = backend();
        let mut host = UnixStream::connect(backend.uds_path()).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        pump(&mut backend);
        let local = backend.conns.keys().next().unwrap().0;
        assert!(backend.has_pending_rx());
        backend.send_pkt(&guest_header(OP_RST, 52, local), &[]);
        assert!(backend.conns.is_empty());
        let mut header = PacketHeader::default();
        let mut buf = [0u8; 64];
        assert_eq!(backend.recv_pkt(&mut header, &mut buf), None);
        assert!(!backend.has_pending_rx());
        assert!(closed(&mut host));
    }

    #[test]
    fn a_deadline_of_a_connection_already_gone_is_forgotten() {
        let (mut backend, _dir) = backend();
        let (host, request) = host_connect(&mut backend, 52);
        let local = request.src_port;
        backend.send_pkt(&guest_header(OP_RESPONSE, 52, local), &[]);
        // The host reads its OK line and closes: the guest is told, and the connection waits
        // for its RST.
        let mut host = host;
        read_ok_line(&mut host);
        drop(host);
        pump(&mut backend);
        assert!(drain(&mut backend).iter().any(|h| h.op == OP_SHUTDOWN));
        assert_eq!(backend.killq.len(), 1);
        assert!(backend.armed.is_some());
        backend.send_pkt(&guest_header(OP_RST, 52, local), &[]);
        assert!(backend.conns.is_empty());
        backend.sweep_killq();
        assert!(backend.killq.is_empty());
        assert_eq!(backend.armed, None, "the timer is disarmed");
        assert_eq!(
            backend
                .metrics
                .conns_killed
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
    }

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"connect 52",
            b"CONNECT 5 2",
            b"\xff",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
