//! The API server: one thread that serves the HTTP API on a Unix socket and hands each request
//! to the VMM.
//!
//! [`ApiServer::spawn`] binds the socket and starts the `ember_api` thread. That thread runs an
//! epoll loop over the listener and every connection, all non-blocking: it reads what clients
//! send, parses requests with [`http::parse_request`] and routes them with [`routes::parse`]. A
//! request that does not parse or route is answered on the spot. One that routes is sent to the
//! VMM as an ([`ApiRequest`], [`Responder`]) pair through [`ApiRequests`], whose event fd the VMM
//! watches in its own epoll loop; the thread then waits for the answer before it serves anything
//! else, so requests are carried out one at a time and in order, as in Firecracker.
//!
//! The VMM side:
//!
//! ```ignore
//! let (server, requests) = ApiServer::spawn("/run/ember.sock")?;
//! epoll.ctl(ControlOperation::Add, requests.as_raw_fd(), EpollEvent::new(EventSet::IN, API))?;
//! // When `API` is readable:
//! while let Some((request, responder)) = requests.try_recv() {
//!     responder.send(vmm.handle(request));
//! }
//! ```
//!
//! What a client can do is bounded: a connection buffers at most one request of
//! [`http::MAX_REQUEST_LEN`] bytes and the answers to the requests it has not read, and the server
//! holds at most [`MAX_CONNECTIONS`] of them (another one is answered 503 and closed). A
//! malformed request is answered with its error and the connection is closed; a client that goes
//! away mid-request is dropped. A request the VMM drops without answering is a 500.
//!
//! Nor can a client hold a connection for ever ([`Timeouts`]): the head of a request must arrive
//! within [`Timeouts::header`] of its first byte, its body within [`Timeouts::body`] of its head,
//! or the connection is answered 408 and closed; a connection with no request in progress (or whose
//! client does not read its answers) is closed after [`Timeouts::idle`]. The request is parsed as
//! it arrives ([`http::RequestParser`]), so a client that sends a byte at a time costs work in
//! proportion to what it sends.
//!
//! The socket is created with mode 0600 whatever the umask: only its owner (and root) can connect.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::http::{self, StatusCode};
use super::routes::{self, ApiRequest, ApiResponse};

/// The name of the API thread.
pub const THREAD_NAME: &str = "ember_api";

/// The most client connections open at once, as Firecracker's `micro_http` allows.
pub const MAX_CONNECTIONS: usize = 10;

/// The mode of the socket file: read and write (connect) for its owner alone.
pub const SOCKET_MODE: u32 = 0o600;

/// The backlog of the listening socket: connections the kernel holds until they are accepted.
const LISTEN_BACKLOG: i32 = 128;

/// How often the API thread, waiting for the VMM's answer, checks whether it should stop.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long the API thread pauses when it cannot accept a connection, such as when ember is out
/// of file descriptors.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The epoll token of the listening socket.
const LISTENER_TOKEN: u64 = 0;
/// The epoll token of the stop event.
const STOP_TOKEN: u64 = 1;
/// The epoll token of the first connection; each new one takes the next.
const FIRST_CONNECTION_TOKEN: u64 = 2;

/// The most events handled per `epoll_wait`.
const EVENT_BATCH: usize = 32;

/// The most bytes read from a connection per readiness event: a page. API requests are small,
/// a larger body takes a few more events, and the buffer is on the API thread's stack, which
/// keeps resident every page it once touched.
const READ_CHUNK: usize = 4 * 1024;

/// Why the API server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something other than a dead socket exists at the socket path: it is refused rather than
    /// removed, since it may be another instance's socket. The message is Firecracker's.
    #[error("Failed to open the API socket at: {}. Check that it is not already used.", .0.display())]
    SocketPathExists(PathBuf),
    /// The socket could not be bound.
    #[error("Cannot bind the API socket at {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket could not be set up.
    #[error("Cannot set up the API socket")]
    Socket(#[source] io::Error),
    /// An event fd could not be created.
    #[error("Cannot create an event fd for the API server")]
    EventFd(#[source] io::Error),
    /// The epoll instance could not be created or set up.
    #[error("Cannot set up the epoll instance of the API server")]
    Epoll(#[source] io::Error),
    /// The thread could not be started.
    #[error("Cannot start the API server thread")]
    Spawn(#[source] io::Error),
    /// The thread's start hook failed; the thread ended without serving.
    #[error("The API server thread's start hook failed")]
    ThreadHook(#[source] io::Error),
}

/// Code the API thread runs first, before it accepts a connection: a seccomp filter, CPU
/// pinning. An error stops the thread and makes [`ApiServer::spawn_with`] fail.
pub type ThreadHook = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// The result of starting the API server.
pub type Result<T> = std::result::Result<T, ServerError>;

/// How long a connection may take over each part of its life before it is closed.
///
/// Firecracker's API server has no such limits; ember has them so that a client that opens
/// connections and sends nothing, or a byte now and then, cannot hold the [`MAX_CONNECTIONS`]
/// slots for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its head (request line and headers); past
    /// it the client gets a 408 and the connection closes.
    pub header: Duration,
    /// From the end of a request's head to the end of its body; past it, a 408 and a close.
    pub body: Duration,
    /// How long a connection may stay open with no request in progress, or with answers its
    /// client does not read; past it the connection closes without an answer, as HTTP lets a
    /// server close an idle persistent connection.
    pub idle: Duration,
}

impl Default for Timeouts {
    /// 5 s for a head, 5 s for a body (at most [`http::MAX_BODY_LEN`] bytes on a local socket),
    /// 30 s idle.
    fn default() -> Timeouts {
        Timeouts {
            header: Duration::from_secs(5),
            body: Duration::from_secs(5),
            idle: Duration::from_secs(30),
        }
    }
}

/// Where the API thread reads the time its [`Timeouts`] are measured against.
pub trait Clock: Send + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Instant;
}

/// The monotonic clock of the system, [`Instant::now`].
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Answers one request; sent with it to the VMM.
///
/// Dropped without [`Responder::send`], the client gets a 500.
#[derive(Debug)]
pub struct Responder {
    reply: SyncSender<ApiResponse>,
}

impl Responder {
    /// Sends the answer to the API thread, which writes it to the client.
    pub fn send(self, response: ApiResponse) {
        // The API thread is gone only when the server stops; then nobody waits for the answer.
        let _ = self.reply.send(response);
    }
}

/// The VMM's end: the requests that routed, and the event fd written when one is waiting.
#[derive(Debug)]
pub struct ApiRequests {
    requests: Receiver<(ApiRequest, Responder)>,
    event: EventFd,
}

impl ApiRequests {
    /// The next request waiting, if any, with the responder that answers it.
    ///
    /// Call it until it gives `None` each time the event fd is readable: it also clears the event
    /// fd, before looking for a request, so a request sent after that look wakes the VMM again.
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        // Non-blocking: an error is EAGAIN, nothing to clear.
        let _ = self.event.read();
        self.requests.try_recv().ok()
    }
}

impl AsRawFd for ApiRequests {
    /// The event fd, readable when a request may be waiting: register it for `EPOLLIN`.
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

/// The running API server. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    socket_path: PathBuf,
    /// Device and inode of the socket file, so that only the file this server created is removed.
    socket_id: Option<(u64, u64)>,
    /// Whether stopping removes the socket file: only while [`ApiServer::spawn_with_limit`]
    /// has not succeeded. A server that started leaves its socket file when it stops, as
    /// Firecracker does.
    remove_on_stop: bool,
    stop_flag: Arc<AtomicBool>,
    stop_event: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds a Unix socket at `path` and starts the API thread that serves it.
    ///
    /// # Returns
    ///
    /// The server, which stops when dropped, and the [`ApiRequests`] the VMM serves.
    ///
    /// # Errors
    ///
    /// [`ServerError::SocketPathExists`] when `path` exists and is not a dead socket (one that
    /// refuses connections, as a killed instance leaves it, which is replaced); another
    /// [`ServerError`] when the socket, the epoll instance, an event fd or the thread cannot be
    /// set up.
    pub fn spawn(path: impl AsRef<Path>) -> Result<(ApiServer, ApiRequests)> {
        ApiServer::spawn_with(path, Timeouts::default(), Box::new(MonotonicClock), None)
    }

    /// [`ApiServer::spawn`], with the given timeouts measured against `clock`; the API thread
    /// first runs `hook` (when given), and this waits for it.
    ///
    /// # Errors
    ///
    /// As [`ApiServer::spawn`]; [`ServerError::ThreadHook`] when the hook fails.
    pub fn spawn_with(
        path: impl AsRef<Path>,
        timeouts: Timeouts,
        clock: Box<dyn Clock>,
        hook: Option<ThreadHook>,
    ) -> Result<(ApiServer, ApiRequests)> {
        ApiServer::spawn_with_limit(path, timeouts, clock, hook, http::MAX_BODY_LEN)
    }

    /// [`ApiServer::spawn_with`], serving request bodies of at most `max_payload` bytes
    /// (Firecracker's `--http-api-max-payload-size`): a request that announces a larger one
    /// is answered 400 with Firecracker's message and its connection closed.
    ///
    /// # Errors
    ///
    /// As [`ApiServer::spawn_with`].
    pub fn spawn_with_limit(
        path: impl AsRef<Path>,
        timeouts: Timeouts,
        clock: Box<dyn Clock>,
        hook: Option<ThreadHook>,
        max_payload: usize,
    ) -> Result<(ApiServer, ApiRequests)> {
        let socket_path = path.as_ref().to_path_buf();
        if socket_path.symlink_metadata().is_ok() && !remove_dead_socket(&socket_path) {
            return Err(ServerError::SocketPathExists(socket_path));
        }
        let listener = bind_private(&socket_path).map_err(|source| ServerError::Bind {
            path: socket_path.clone(),
            source,
        })?;
        let socket_id = socket_path
            .symlink_metadata()
            .ok()
            .filter(|meta| meta.file_type().is_socket())
            .map(|meta| (meta.dev(), meta.ino()));
        // From here on, the server removes the socket file when it fails to start.
        let mut server = ApiServer {
            socket_path,
            socket_id,
            remove_on_stop: true,
            stop_flag: Arc::new(AtomicBool::new(false)),
            stop_event: EventFd::new(EFD_NONBLOCK).map_err(ServerError::EventFd)?,
            thread: None,
        };
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Socket)?;

        let vmm_event = EventFd::new(EFD_NONBLOCK).map_err(ServerError::EventFd)?;
        let (to_vmm, requests) = mpsc::channel();
        let event_loop = EventLoop::new(
            listener,
            server
                .stop_event
                .try_clone()
                .map_err(ServerError::EventFd)?,
            Arc::clone(&server.stop_flag),
            to_vmm,
            vmm_event.try_clone().map_err(ServerError::EventFd)?,
            timeouts,
            clock,
            max_payload,
        )?;
        let (started, hook_result) = mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || {
                let result = hook.map_or(Ok(()), |hook| hook());
                let failed = result.is_err();
                // `spawn_with` waits for this.
                let _ = started.send(result);
                if !failed {
                    event_loop.run();
                }
            })
            .map_err(ServerError::Spawn)?;
        server.thread = Some(thread);
        hook_result
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the API thread panicked")))
            .map_err(ServerError::ThreadHook)?;
        server.remove_on_stop = false;
        log::debug!("API server listening on {}", server.socket_path.display());
        Ok((
            server,
            ApiRequests {
                requests,
                event: vmm_event,
            },
        ))
    }

    /// The path of the socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops the API thread and waits for it. Doing it again does nothing.
    ///
    /// The socket file stays, as Firecracker leaves it: client libraries remove it themselves
    /// once the process has ended, and one of them fails when it is already gone. Nobody
    /// listens on it any more, so a new instance may start on the same path (see
    /// [`ApiServer::spawn`]). A request the VMM has not answered yet is answered 503.
    pub fn stop(&mut self) {
        self.stop_flag.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if let Err(err) = self.stop_event.write(1) {
                log::error!("Cannot signal the API thread to stop: {err}");
            }
            if thread.join().is_err() {
                log::error!("The API thread panicked");
            }
        }
        if self.remove_on_stop {
            self.remove_socket_file();
        }
    }

    fn remove_socket_file(&mut self) {
        let Some(created) = self.socket_id.take() else {
            return;
        };
        let ours = self
            .socket_path
            .symlink_metadata()
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == created);
        if !ours {
            return;
        }
        if let Err(err) = std::fs::remove_file(&self.socket_path) {
            log::warn!(
                "Cannot remove the API socket {}: {err}",
                self.socket_path.display()
            );
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates a listening Unix socket at `path` whose file has mode [`SOCKET_MODE`], whatever the
/// umask.
///
/// Removes `path` when it is a socket that nobody listens on (a connection to it is refused),
/// as an instance killed before it could remove its socket leaves it, so that a new instance
/// (in a jail, with the same ID) can start; anything else is left alone. Returns whether it
/// removed the path.
fn remove_dead_socket(path: &Path) -> bool {
    let is_socket = path
        .symlink_metadata()
        .is_ok_and(|meta| meta.file_type().is_socket());
    let dead = is_socket
        && std::os::unix::net::UnixStream::connect(path)
            .is_err_and(|err| err.kind() == io::ErrorKind::ConnectionRefused);
    if dead && std::fs::remove_file(path).is_ok() {
        log::info!(
            "Removed the dead API socket {} a stopped instance left",
            path.display()
        );
        return true;
    }
    false
}

/// The file is created by `bind` with the umask applied and changed to [`SOCKET_MODE`] before
/// `listen`: until `listen`, a `connect` to it is refused, so no client can connect while the
/// mode is still the umask's. Setting the umask around `bind` instead would change it for the
/// whole process, and a file another thread created meanwhile (a log or metrics file) would get
/// the restrictive umask, or this socket the permissive one. The directory the socket is in is
/// the operator's: whoever can write there could as well replace the socket after it is made.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: a plain system call with constant arguments; its result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: `sockaddr_un` is plain data, for which all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = path.as_os_str().as_bytes();
    // The path and its terminating NUL must fit.
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is longer than 107 bytes or holds a NUL",
        ));
    }
    for (slot, &byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = libc::c_char::from_ne_bytes([byte]);
    }
    let length = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `address` is a valid `sockaddr_un` of `length` bytes, `socket` a valid socket.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&address).cast::<libc::sockaddr>(),
            length,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    let listen = || {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        // SAFETY: `socket` is a valid, bound socket.
        if unsafe { libc::listen(socket.as_raw_fd(), LISTEN_BACKLOG) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(err) = listen() {
        // The file is the one bound above: nobody could connect to it yet.
        let _ = std::fs::remove_file(path);
        return Err(err);
    }
    Ok(UnixListener::from(socket))
}

/// The state of the API thread.
struct EventLoop {
    epoll: Epoll,
    listener: UnixListener,
    /// Kept open so that its fd, registered in `epoll`, stays valid.
    _stop_event: EventFd,
    stop_flag: Arc<AtomicBool>,
    to_vmm: Sender<(ApiRequest, Responder)>,
    vmm_event: EventFd,
    connections: HashMap<u64, Connection>,
    next_token: u64,
    timeouts: Timeouts,
    clock: Box<dyn Clock>,
    /// The largest request body served.
    max_payload: usize,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    fn new(
        listener: UnixListener,
        stop_event: EventFd,
        stop_flag: Arc<AtomicBool>,
        to_vmm: Sender<(ApiRequest, Responder)>,
        vmm_event: EventFd,
        timeouts: Timeouts,
        clock: Box<dyn Clock>,
        max_payload: usize,
    ) -> Result<EventLoop> {
        let epoll = Epoll::new().map_err(ServerError::Epoll)?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER_TOKEN),
            (stop_event.as_raw_fd(), STOP_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ServerError::Epoll)?;
        }
        Ok(EventLoop {
            epoll,
            listener,
            _stop_event: stop_event,
            stop_flag,
            to_vmm,
            vmm_event,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION_TOKEN,
            timeouts,
            clock,
            max_payload,
        })
    }

    fn stopping(&self) -> bool {
        self.stop_flag.load(Ordering::SeqCst)
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); EVENT_BATCH];
        while !self.stopping() {
            let timeout = self.wait_timeout();
            if !self.turn(&mut events, timeout) {
                return;
            }
        }
    }

    /// Waits up to `timeout_ms` (-1: without end) for events, handles them, then closes the
    /// connections past their deadlines. Returns whether the loop goes on.
    fn turn(&mut self, events: &mut [EpollEvent], timeout_ms: i32) -> bool {
        let count = match self.epoll.wait(timeout_ms, events) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => 0,
            Err(err) => {
                log::error!("The API server stops: cannot wait for events: {err}");
                return false;
            }
        };
        for event in events.iter().take(count) {
            match event.data() {
                STOP_TOKEN => return false,
                LISTENER_TOKEN => self.accept(),
                token => self.serve_connection(token, event.event_set()),
            }
            if self.stopping() {
                return false;
            }
        }
        self.expire();
        true
    }

    /// How long `epoll_wait` may wait: until the earliest deadline of a connection, in
    /// milliseconds rounded up, or -1 when no connection has one.
    fn wait_timeout(&self) -> i32 {
        let now = self.clock.now();
        self.connections
            .values()
            .filter_map(|connection| connection.deadline(&self.timeouts))
            .min()
            .map_or(-1, |deadline| {
                let left = deadline.saturating_duration_since(now);
                let millis = left.as_nanos().div_ceil(1_000_000);
                i32::try_from(millis).unwrap_or(i32::MAX)
            })
    }

    /// Closes every connection past its deadline: a request in progress is answered 408 first.
    ///
    /// What a client sent while the thread was busy (waiting for the VMM's answer to another
    /// request) is read and served first: a request that arrived in time is not refused because
    /// the thread looked late.
    fn expire(&mut self) {
        let now = self.clock.now();
        let expired: Vec<u64> = self.past_deadline(now);
        for token in expired {
            self.serve_connection(token, EventSet::IN);
            let now = self.clock.now();
            if !self.past_deadline(now).contains(&token) {
                continue;
            }
            let Some(mut connection) = self.connections.remove(&token) else {
                continue;
            };
            if !connection.in_request() {
                log::debug!("The API server closes an idle connection");
                continue;
            }
            log::debug!("The API server closes a connection whose request did not arrive in time");
            let response = ApiResponse::fault(
                StatusCode::RequestTimeout,
                "The request did not arrive in time.",
            );
            connection.incoming.clear();
            connection.parser.reset();
            connection.discard_input();
            connection.outgoing.clear();
            connection.queue(&response.to_http(), false);
            connection.closing = true;
            if connection.flush() && !connection.done() {
                // The 408 waits for the client to read it, within the idle timeout.
                connection.touch(now);
                self.keep(token, connection);
            }
        }
    }

    /// The connections whose deadline is at or before `now`.
    fn past_deadline(&self, now: Instant) -> Vec<u64> {
        self.connections
            .iter()
            .filter(|(_, connection)| {
                connection
                    .deadline(&self.timeouts)
                    .is_some_and(|deadline| deadline <= now)
            })
            .map(|(&token, _)| token)
            .collect()
    }

    /// Accepts every pending connection.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Such as EMFILE: the connection waits in the backlog for a later try. The
                    // listener stays readable, so pause rather than spin and log in a loop.
                    log::warn!("The API server cannot accept a connection: {err}");
                    thread::sleep(ACCEPT_RETRY_DELAY);
                    return;
                }
            };
            if let Err(err) = self.add_connection(stream) {
                log::warn!("The API server drops a new connection: {err}");
            }
        }
    }

    fn add_connection(&mut self, mut stream: UnixStream) -> io::Result<()> {
        if self.connections.len() >= MAX_CONNECTIONS {
            let response = ApiResponse::fault(
                StatusCode::ServiceUnavailable,
                "Too many open connections to the API socket.",
            );
            // Best effort: the client is told why before the connection closes.
            stream.set_nonblocking(true)?;
            let _ = stream.write(&response.to_http().encode(false));
            return Ok(());
        }
        stream.set_nonblocking(true)?;
        let token = self.next_token;
        self.next_token = self
            .next_token
            .checked_add(1)
            .unwrap_or(FIRST_CONNECTION_TOKEN);
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        let now = self.clock.now();
        self.connections
            .insert(token, Connection::new(stream, now, self.max_payload));
        Ok(())
    }

    /// Handles readiness of a connection: reads, serves what it can and writes.
    fn serve_connection(&mut self, token: u64, events: EventSet) {
        let Some(mut connection) = self.connections.remove(&token) else {
            return;
        };
        let mut alive = true;
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
            && connection.reading()
        {
            alive = connection.read();
        }
        if alive && events.contains(EventSet::OUT) {
            alive = connection.flush();
        }
        if alive {
            alive = self.serve_requests(&mut connection);
        }
        if !alive || connection.done() {
            // Closing the fd removes it from the epoll instance.
            return;
        }
        let now = self.clock.now();
        connection.touch(now);
        self.keep(token, connection);
    }

    /// Keeps `connection`, registered for the events it now waits for.
    fn keep(&mut self, token: u64, mut connection: Connection) {
        let wanted = connection.interest();
        if wanted != connection.registered {
            if let Err(err) = self.epoll.ctl(
                ControlOperation::Modify,
                connection.stream.as_raw_fd(),
                EpollEvent::new(wanted, token),
            ) {
                log::warn!("The API server drops a connection it cannot watch: {err}");
                return;
            }
            connection.registered = wanted;
        }
        self.connections.insert(token, connection);
    }

    /// Serves the complete requests buffered on `connection` while its answers are written out.
    ///
    /// Returns whether the connection is still usable.
    fn serve_requests(&mut self, connection: &mut Connection) -> bool {
        while connection.outgoing.is_empty() && !connection.closing {
            match connection.parser.parse(&connection.incoming) {
                Ok(Some((request, used))) => {
                    connection
                        .incoming
                        .drain(..used.min(connection.incoming.len()));
                    connection.parser.reset();
                    // The clock of what comes next starts now, not with this request.
                    connection.phase = None;
                    connection.continue_sent = false;
                    let response = self.serve(&request);
                    connection.queue(&response.to_http(), request.keep_alive);
                    if !request.keep_alive {
                        connection.closing = true;
                    }
                }
                Ok(None) => {
                    if connection.peer_closed {
                        // What is left is an incomplete request nobody will finish.
                        connection.closing = true;
                    } else if !connection.continue_sent {
                        let wants_continue = connection
                            .parser
                            .head()
                            .is_some_and(|head| head.expect_continue && head.content_length > 0);
                        if wants_continue {
                            connection
                                .outgoing
                                .extend_from_slice(http::CONTINUE_RESPONSE);
                            connection.continue_sent = true;
                        }
                    }
                    break;
                }
                Err(err) => {
                    log::debug!("The API server refuses a malformed request: {err}");
                    let response = ApiResponse::fault(err.status(), err.to_string());
                    connection.queue(&response.to_http(), false);
                    connection.closing = true;
                    connection.incoming.clear();
                    connection.parser.reset();
                }
            }
            if !connection.flush() {
                return false;
            }
        }
        // The 100 Continue, if one was queued.
        connection.flush()
    }

    /// The answer to one request: routed and served by the VMM, or refused here.
    fn serve(&self, request: &http::Request) -> ApiResponse {
        match routes::parse(&request.method, &request.path, &request.body) {
            Ok(api_request) => {
                log::debug!(
                    "The API server received {} {}",
                    request.method,
                    request.path
                );
                self.forward(api_request)
            }
            Err(err) => {
                log::debug!(
                    "The API server refuses {} {}: {err}",
                    request.method,
                    request.path
                );
                err.into()
            }
        }
    }

    /// Sends a request to the VMM and waits for its answer.
    fn forward(&self, request: ApiRequest) -> ApiResponse {
        let (reply, answer) = mpsc::sync_channel(1);
        if self.to_vmm.send((request, Responder { reply })).is_err() {
            return ApiResponse::internal_error("The VMM no longer serves API requests.");
        }
        if let Err(err) = self.vmm_event.write(1) {
            // The request is queued all the same; the VMM finds it at its next look.
            log::error!("Cannot wake the VMM for an API request: {err}");
        }
        loop {
            match answer.recv_timeout(STOP_POLL_INTERVAL) {
                Ok(response) => return response,
                Err(RecvTimeoutError::Timeout) if self.stopping() => {
                    return ApiResponse::fault(
                        StatusCode::ServiceUnavailable,
                        "The API server is stopping.",
                    );
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return ApiResponse::internal_error(
                        "The VMM dropped the request without answering it.",
                    );
                }
            }
        }
    }
}

/// What a connection is doing, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in progress and no answer to write.
    Idle,
    /// Part of a request's head arrived.
    Head,
    /// A request's head arrived, and part of its body.
    Body,
    /// Answers wait for the client to read them.
    Answering,
}

/// One client connection.
struct Connection {
    stream: UnixStream,
    /// Bytes read and not yet parsed, at most [`http::MAX_HEAD_LEN`] and the body limit.
    incoming: Vec<u8>,
    /// Where the parse of the request at the start of `incoming` stands.
    parser: http::RequestParser,
    /// What the connection was doing when last looked at; `None` once a request was served,
    /// so that the clock restarts.
    phase: Option<Phase>,
    /// When it started doing it.
    since: Instant,
    /// Bytes of answers not yet written.
    outgoing: Vec<u8>,
    /// Whether the current request was answered `100 Continue`.
    continue_sent: bool,
    /// Whether the connection closes once `outgoing` is written.
    closing: bool,
    /// Whether the client shut down its side: nothing more will be read.
    peer_closed: bool,
    /// The events the connection is registered for.
    registered: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, now: Instant, max_payload: usize) -> Connection {
        Connection {
            stream,
            incoming: Vec::new(),
            parser: http::RequestParser::with_body_limit(max_payload),
            phase: Some(Phase::Idle),
            since: now,
            outgoing: Vec::new(),
            continue_sent: false,
            closing: false,
            peer_closed: false,
            registered: EventSet::IN,
        }
    }

    /// What the connection is doing now.
    fn current_phase(&self) -> Phase {
        if !self.incoming.is_empty() && !self.closing {
            if self.parser.head().is_some() {
                Phase::Body
            } else {
                Phase::Head
            }
        } else if self.outgoing.is_empty() {
            Phase::Idle
        } else {
            Phase::Answering
        }
    }

    /// Notes, at `now`, what the connection is doing: its clock restarts when that changed.
    fn touch(&mut self, now: Instant) {
        let phase = Some(self.current_phase());
        if phase != self.phase {
            self.phase = phase;
            self.since = now;
        }
    }

    /// Whether a request is in progress: one the client is sending.
    fn in_request(&self) -> bool {
        matches!(self.phase, Some(Phase::Head | Phase::Body))
    }

    /// When the connection closes unless it does something else first.
    fn deadline(&self, timeouts: &Timeouts) -> Option<Instant> {
        let limit = match self.phase.unwrap_or(Phase::Idle) {
            Phase::Idle | Phase::Answering => timeouts.idle,
            Phase::Head => timeouts.header,
            Phase::Body => timeouts.body,
        };
        // Past the end of `Instant`: never.
        self.since.checked_add(limit)
    }

    /// Whether bytes from the client are still wanted.
    fn reading(&self) -> bool {
        !self.closing && !self.peer_closed
    }

    /// Whether the connection has nothing left to do.
    fn done(&self) -> bool {
        self.closing && self.outgoing.is_empty()
    }

    /// The events to wait for: writable while answers are pending, else readable.
    fn interest(&self) -> EventSet {
        if self.outgoing.is_empty() {
            EventSet::IN
        } else {
            EventSet::OUT
        }
    }

    /// Reads what the client sent, up to the buffer's cap. Returns whether the connection is
    /// still usable.
    fn read(&mut self) -> bool {
        let room = http::MAX_HEAD_LEN
            .saturating_add(self.parser.body_limit())
            .saturating_sub(self.incoming.len());
        if room == 0 {
            // Cannot happen: a full buffer always holds a complete request or an error, both
            // served before the next read. Refuse to grow all the same.
            return true;
        }
        let mut chunk = [0u8; READ_CHUNK];
        let want = room.min(chunk.len());
        let Some(buf) = chunk.get_mut(..want) else {
            return false;
        };
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    self.peer_closed = true;
                    return true;
                }
                Ok(count) => {
                    let Some(bytes) = buf.get(..count) else {
                        return false;
                    };
                    self.incoming.extend_from_slice(bytes);
                    return true;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Reads and drops what the client sent and was not read yet, up to [`READ_CHUNK`] bytes.
    ///
    /// Closing a Unix socket that holds unread bytes makes the client's next read fail with
    /// ECONNRESET, which some clients report before the answer they were sent; this makes that
    /// less likely without reading without end.
    fn discard_input(&mut self) {
        let mut chunk = [0u8; READ_CHUNK];
        let _ = self.stream.read(&mut chunk);
    }

    /// Queues the bytes of an answer.
    fn queue(&mut self, response: &http::Response, keep_alive: bool) {
        self.outgoing
            .extend_from_slice(&response.encode(keep_alive));
    }

    /// Writes as much of `outgoing` as the socket takes. Returns whether the connection is still
    /// usable.
    ///
    /// Writing to a connection the client closed fails with EPIPE rather than killing ember:
    /// Rust programs start with SIGPIPE ignored.
    fn flush(&mut self) -> bool {
        while !self.outgoing.is_empty() {
            match self.stream.write(&self.outgoing) {
                Ok(0) => return false,
                Ok(count) => {
                    self.outgoing.drain(..count.min(self.outgoing.len()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::time::Instant;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::api::model::MachineConfiguration;

    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Fixture {
        _dir: TempDir,
        path: PathBuf,
        server: ApiServer,
        requests: ApiRequests,
    }

    fn start() -> Fixture {
        let dir = TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let path = dir.as_path().join("api.sock");
        let (server, requests) = ApiServer::spawn(&path).unwrap();
        Fixture {
            _dir: dir,
            path,
            server,
            requests,
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream
    }

    /// Waits for the next request the server hands to the VMM.
    fn next_request(requests: &ApiRequests) -> (ApiRequest, Responder) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(pair) = requests.try_recv() {
                return pair;
            }
            assert!(Instant::now() < deadline, "no request reached the VMM");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads one response: its head and the Content-Length bytes after it.
    fn read_response(stream: &mut UnixStream) -> String {
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(0) => panic!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&bytes)
                ),
                Ok(_) => bytes.push(byte[0]),
                Err(err) => panic!("{err} after {:?}", String::from_utf8_lossy(&bytes)),
            }
        }
        let head = String::from_utf8(bytes.clone()).unwrap();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .map_or(0, |len| len.parse::<usize>().unwrap());
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
        bytes.extend_from_slice(&body);
        String::from_utf8(bytes).unwrap()
    }

    /// Whether the server closed the connection: a read gives EOF or a reset.
    fn is_closed(stream: &mut UnixStream) -> bool {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => true,
            Err(err) => err.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    const MACHINE_CONFIG_RESPONSE: &str = "HTTP/1.1 200 OK\r\nServer: Firecracker API\r\n\
        Connection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 93\r\n\r\n\
        {\"vcpu_count\":1,\"mem_size_mib\":128,\"smt\":false,\"track_dirty_pages\":false,\"huge_pages\":\"None\"}";

    #[test]
    fn a_request_is_routed_to_the_vmm_and_its_answer_written() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetMachineConfig);
        responder.send(ApiResponse::ok_json(&MachineConfiguration::default()));
        assert_eq!(read_response(&mut client), MACHINE_CONFIG_RESPONSE);

        // The connection stays open for the next request.
        client
            .write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"action_type\":\"InstanceStart\"}  ")
            .unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(
            request,
            ApiRequest::Action(crate::api::model::ActionType::InstanceStart)
        );
        responder.send(ApiResponse::no_content());
        assert_eq!(
            read_response(&mut client),
            "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn the_event_fd_wakes_the_vmm() {
        let fixture = start();
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                fixture.requests.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 7),
            )
            .unwrap();
        let mut client = connect(&fixture.path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let mut events = [EpollEvent::default(); 1];
        let count = epoll.wait(10_000, &mut events).unwrap();
        assert_eq!(count, 1);
        assert_eq!(events[0].data(), 7);
        let (request, responder) = fixture.requests.try_recv().unwrap();
        assert_eq!(request, ApiRequest::GetVersion);
        // Drained: the event fd is clear until the next request.
        assert!(fixture.requests.try_recv().is_none());
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 0);
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn refused_requests_are_answered_without_the_vmm() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(b"PUT /foo HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        let body = r#"{"fault_message":"Invalid request method and/or path: PUT foo."}"#;
        assert_eq!(
            read_response(&mut client),
            format!(
                "HTTP/1.1 400 Bad Request\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        );
        assert!(fixture.requests.try_recv().is_none());
        // Still open.
        client
            .write_all(b"GET /vm/config HTTP/1.1\r\n\r\n")
            .unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetVmConfig);
        responder.send(ApiResponse::bad_request("no"));
        assert!(read_response(&mut client).ends_with(r#"{"fault_message":"no"}"#));
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(
                b"GET /version HTTP/1.1\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            )
            .unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetVersion);
        responder.send(ApiResponse::bad_request("first"));
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetInstanceInfo);
        responder.send(ApiResponse::bad_request("third"));
        assert!(read_response(&mut client).ends_with(r#""first"}"#));
        assert!(read_response(&mut client).contains("GET nowhere."));
        assert!(read_response(&mut client).ends_with(r#""third"}"#));
    }

    #[test]
    fn a_request_sent_byte_by_byte_is_served() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        let request = b"PUT /machine-config HTTP/1.1\r\nContent-Length: 35\r\n\r\n\
                        {\"vcpu_count\":2,\"mem_size_mib\":256}";
        for byte in request {
            client.write_all(&[*byte]).unwrap();
            thread::sleep(Duration::from_micros(200));
        }
        let (request, responder) = next_request(&fixture.requests);
        let ApiRequest::PutMachineConfig(config) = request else {
            panic!("{request:?}");
        };
        assert_eq!((config.vcpu_count, config.mem_size_mib), (2, 256));
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn expect_100_continue_is_answered_before_the_body() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(
                b"PUT /boot-source HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 26\r\n\r\n",
            )
            .unwrap();
        let mut interim = [0u8; http::CONTINUE_RESPONSE.len()];
        client.read_exact(&mut interim).unwrap();
        assert_eq!(&interim[..], http::CONTINUE_RESPONSE);
        client.write_all(br#"{"kernel_image_path":"/k"}"#).unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert!(matches!(request, ApiRequest::PutBootSource(_)));
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn two_clients_are_served() {
        let fixture = start();
        let mut first = connect(&fixture.path);
        let mut second = connect(&fixture.path);
        second.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetVersion);
        // The first client, idle so far, is not in the way.
        first
            .write_all(b"GET /machine-config HTTP/1.1\r\n\r\n")
            .unwrap();
        responder.send(ApiResponse::bad_request("second"));
        assert!(read_response(&mut second).ends_with(r#""second"}"#));
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetMachineConfig);
        responder.send(ApiResponse::ok_json(&MachineConfiguration::default()));
        assert_eq!(read_response(&mut first), MACHINE_CONFIG_RESPONSE);
    }

    #[test]
    fn many_clients_at_once_are_served() {
        let fixture = start();
        let mut clients: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| connect(&fixture.path))
            .collect();
        for client in &mut clients {
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        }
        for _ in 0..clients.len() {
            let (request, responder) = next_request(&fixture.requests);
            assert_eq!(request, ApiRequest::GetInstanceInfo);
            responder.send(ApiResponse::no_content());
        }
        for client in &mut clients {
            assert!(read_response(client).starts_with("HTTP/1.1 204"));
        }
    }

    #[test]
    fn a_client_that_leaves_mid_request_does_not_stop_the_server() {
        let fixture = start();
        let mut leaving = connect(&fixture.path);
        leaving
            .write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kern")
            .unwrap();
        drop(leaving);
        let mut half = connect(&fixture.path);
        half.write_all(b"GET /machine-con").unwrap();
        half.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(is_closed(&mut half));

        let mut client = connect(&fixture.path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let (request, responder) = next_request(&fixture.requests);
        assert_eq!(request, ApiRequest::GetVersion);
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn a_client_that_leaves_while_the_vmm_works_does_not_stop_the_server() {
        let fixture = start();
        let mut leaving = connect(&fixture.path);
        leaving.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let (_, responder) = next_request(&fixture.requests);
        drop(leaving);
        responder.send(ApiResponse::no_content());

        let mut client = connect(&fixture.path);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let (_, responder) = next_request(&fixture.requests);
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn requests_of_a_half_closed_client_are_still_answered() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (_, responder) = next_request(&fixture.requests);
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
        assert!(is_closed(&mut client));
    }

    #[test]
    fn garbage_gets_a_400_and_the_connection_closes() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n")
            .unwrap();
        let response = read_response(&mut client);
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );
        assert!(response.contains("Connection: close\r\n"));
        assert!(response.contains("fault_message"));
        assert!(is_closed(&mut client));
        assert!(fixture.requests.try_recv().is_none());
    }

    #[test]
    fn a_body_over_the_limit_gets_firecrackers_400() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(b"PUT /mmds HTTP/1.1\r\nContent-Length: 51201\r\n\r\naaaa")
            .unwrap();
        let body = r#"{"fault_message":"Request payload with size 51201 is larger than the limit of 51200 allowed by server."}"#;
        assert_eq!(
            read_response(&mut client),
            format!(
                "HTTP/1.1 400 Bad Request\r\nServer: Firecracker API\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        );
        assert!(is_closed(&mut client));
    }

    #[test]
    fn a_body_at_the_limit_is_served() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        let prefix = br#"{"kernel_image_path":"/k","boot_args":""#;
        let mut body = prefix.to_vec();
        body.resize(http::MAX_BODY_LEN - 2, b'a');
        body.extend_from_slice(b"\"}");
        let head = format!(
            "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        client.write_all(head.as_bytes()).unwrap();
        client.write_all(&body).unwrap();
        let (request, responder) = next_request(&fixture.requests);
        let ApiRequest::PutBootSource(boot) = request else {
            panic!("{request:?}");
        };
        assert_eq!(
            boot.boot_args.map(|args| args.len()),
            Some(http::MAX_BODY_LEN - prefix.len() - 2)
        );
        responder.send(ApiResponse::no_content());
        assert!(read_response(&mut client).starts_with("HTTP/1.1 204"));
    }

    #[test]
    fn connection_close_is_honoured() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client
            .write_all(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .unwrap();
        let (_, responder) = next_request(&fixture.requests);
        responder.send(ApiResponse::no_content());
        assert_eq!(
            read_response(&mut client),
            "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nConnection: close\r\n\r\n"
        );
        assert!(is_closed(&mut client));
        // The request after the close was never served.
        thread::sleep(Duration::from_millis(50));
        assert!(fixture.requests.try_recv().is_none());
    }

    #[test]
    fn a_dropped_responder_is_a_500() {
        let fixture = start();
        let mut client = connect(&fixture.path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let (_, responder) = next_request(&fixture.requests);
        drop(responder);
        let response = read_response(&mut client);
        assert!(
            response.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{response}"
        );
        assert!(
            response.ends_with(
                r#"{"fault_message":"The VMM dropped the request without answering it."}"#
            )
        );
    }

    #[test]
    fn a_vmm_that_is_gone_is_a_500() {
        let Fixture {
            _dir,
            path,
            server,
            requests,
        } = start();
        drop(requests);
        let mut client = connect(&path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let response = read_response(&mut client);
        assert!(response.starts_with("HTTP/1.1 500"), "{response}");
        drop(server);
    }

    #[test]
    fn connections_over_the_limit_get_a_503() {
        let fixture = start();
        let mut clients: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| connect(&fixture.path))
            .collect();
        // Every connection is accepted before the next one is made.
        for client in &mut clients {
            client.write_all(b"GET /nowhere HTTP/1.1\r\n\r\n").unwrap();
            assert!(read_response(client).starts_with("HTTP/1.1 400"));
        }
        let mut extra = connect(&fixture.path);
        let response = read_response(&mut extra);
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(is_closed(&mut extra));
        drop(clients);
        // Room again once they are gone.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut client = connect(&fixture.path);
            client.write_all(b"GET /nowhere HTTP/1.1\r\n\r\n").unwrap();
            if read_response(&mut client).starts_with("HTTP/1.1 400") {
                break;
            }
            assert!(Instant::now() < deadline);
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_existing_path_is_refused() {
        let dir = TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let path = dir.as_path().join("taken");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = ApiServer::spawn(&path).unwrap_err();
        assert!(matches!(err, ServerError::SocketPathExists(_)));
        assert_eq!(
            err.to_string(),
            format!(
                "Failed to open the API socket at: {}. Check that it is not already used.",
                path.display()
            )
        );
        // Left as it was.
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");

        // A live socket too.
        let fixture = start();
        assert!(matches!(
            ApiServer::spawn(&fixture.path),
            Err(ServerError::SocketPathExists(_))
        ));
    }

    #[test]
    fn a_dead_socket_left_at_the_path_is_replaced() {
        let dir = TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let path = dir.as_path().join("dead.sock");
        // Bound, then closed: the file stays and nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (mut server, _requests) = ApiServer::spawn(&path).unwrap();
        let mut client = connect(&path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        server.stop();
    }

    #[test]
    fn stopping_leaves_the_socket_file_and_ends_the_thread() {
        let mut fixture = start();
        assert!(fixture.path.exists());
        assert_eq!(fixture.server.socket_path(), fixture.path);
        fixture.server.stop();
        assert!(
            fixture.path.exists(),
            "the socket file stays, as Firecracker's does"
        );
        assert_eq!(
            UnixStream::connect(&fixture.path).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        // Again: nothing happens.
        fixture.server.stop();
        // The VMM's end sees no more requests.
        assert!(fixture.requests.try_recv().is_none());
    }

    #[test]
    fn stopping_while_the_vmm_holds_a_request_answers_503() {
        let mut fixture = start();
        let mut client = connect(&fixture.path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        let (_request, _responder) = next_request(&fixture.requests);
        fixture.server.stop();
        let response = read_response(&mut client);
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    }

    #[test]
    fn dropping_the_server_leaves_the_socket_file_for_the_next_instance() {
        let fixture = start();
        let path = fixture.path.clone();
        let Fixture { _dir, server, .. } = fixture;
        drop(server);
        assert!(path.exists());
        // The next instance on the same path replaces the dead socket.
        let (mut server, _requests) = ApiServer::spawn(&path).unwrap();
        let mut client = connect(&path);
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        server.stop();
    }

    #[test]
    fn a_socket_replaced_by_someone_else_is_left_alone() {
        let mut fixture = start();
        std::fs::remove_file(&fixture.path).unwrap();
        std::fs::write(&fixture.path, b"someone else's").unwrap();
        fixture.server.stop();
        assert_eq!(std::fs::read(&fixture.path).unwrap(), b"someone else's");
    }

    #[test]
    fn the_thread_is_named() {
        let fixture = start();
        let name = fixture
            .server
            .thread
            .as_ref()
            .and_then(|thread| thread.thread().name().map(str::to_string));
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
    }

    /// A clock that moves only when told to.
    #[derive(Debug, Clone)]
    struct ManualClock(Arc<std::sync::Mutex<Instant>>);

    impl ManualClock {
        fn advance(&self, by: Duration) {
            let mut now = self.0.lock().unwrap();
            *now += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    const SHORT: Timeouts = Timeouts {
        header: Duration::from_secs(2),
        body: Duration::from_secs(3),
        idle: Duration::from_secs(10),
    };
    const TICK: Duration = Duration::from_millis(1);

    /// An event loop run by the test, one turn at a time, on a manual clock.
    struct Stepped {
        _dir: TempDir,
        path: PathBuf,
        event_loop: EventLoop,
        clock: ManualClock,
        events: Vec<EpollEvent>,
    }

    impl Stepped {
        fn new() -> Stepped {
            let dir = TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
            let path = dir.as_path().join("api.sock");
            let clock = ManualClock(Arc::new(std::sync::Mutex::new(Instant::now())));
            let (to_vmm, _) = mpsc::channel();
            let event_loop = EventLoop::new(
                bind_private(&path).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
                Arc::new(AtomicBool::new(false)),
                to_vmm,
                EventFd::new(EFD_NONBLOCK).unwrap(),
                SHORT,
                Box::new(clock.clone()),
                http::MAX_BODY_LEN,
            )
            .unwrap();
            Stepped {
                _dir: dir,
                path,
                event_loop,
                clock,
                events: vec![EpollEvent::default(); EVENT_BATCH],
            }
        }

        /// Runs the loop until it has nothing left to do now.
        fn settle(&mut self) {
            for _ in 0..4 {
                assert!(self.event_loop.turn(&mut self.events, 0));
            }
        }

        fn connect(&mut self) -> UnixStream {
            let client = connect(&self.path);
            self.settle();
            client
        }

        /// Moves the clock on by `by` and lets the loop see it.
        fn advance(&mut self, by: Duration) {
            self.clock.advance(by);
            self.settle();
        }

        fn open_connections(&self) -> usize {
            self.event_loop.connections.len()
        }
    }

    fn send(stepped: &mut Stepped, client: &mut UnixStream, bytes: &[u8]) {
        client.write_all(bytes).unwrap();
        stepped.settle();
    }

    #[test]
    fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let mut stepped = Stepped::new();
        let mut client = stepped.connect();
        stepped.advance(SHORT.idle - TICK);
        assert_eq!(stepped.open_connections(), 1);
        stepped.advance(TICK);
        assert_eq!(stepped.open_connections(), 0);
        // Closed without an answer: no request was in progress.
        assert!(is_closed(&mut client));
    }

    #[test]
    fn a_served_request_restarts_the_idle_clock() {
        let mut stepped = Stepped::new();
        let mut client = stepped.connect();
        stepped.advance(SHORT.idle - TICK);
        send(&mut stepped, &mut client, b"GET /nowhere HTTP/1.1\r\n\r\n");
        assert!(read_response(&mut client).starts_with("HTTP/1.1 400"));
        stepped.advance(SHORT.idle - TICK);
        assert_eq!(stepped.open_connections(), 1);
        stepped.advance(TICK);
        assert_eq!(stepped.open_connections(), 0);
    }

    #[test]
    fn a_head_that_does_not_arrive_in_time_gets_a_408() {
        let mut stepped = Stepped::new();
        let mut client = stepped.connect();
        // The header clock starts at the first byte, not at the connection.
        stepped.advance(SHORT.idle - TICK);
        send(&mut stepped, &mut client, b"G");
        // A slow client: a byte now and then does not restart the clock.
        let rest = b"ET /machine-config HTTP/1.1\r\n";
        for byte in rest {
            stepped.advance(SHORT.header / 40);
            send(&mut stepped, &mut client, &[*byte]);
        }
        let waited = SHORT.header / 40 * u32::try_from(rest.len()).unwrap();
        stepped.advance(SHORT.header - waited - TICK);
        assert_eq!(stepped.open_connections(), 1);
        stepped.advance(TICK);
        let response = read_response(&mut client);
        assert!(
            response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{response}"
        );
        assert!(response.contains("Connection: close\r\n"));
        assert!(response.ends_with(r#"{"fault_message":"The request did not arrive in time."}"#));
        assert!(is_closed(&mut client));
        assert_eq!(stepped.open_connections(), 0);
    }

    #[test]
    fn a_body_that_does_not_arrive_in_time_gets_a_408() {
        let mut stepped = Stepped::new();
        let mut client = stepped.connect();
        send(
            &mut stepped,
            &mut client,
            b"PUT /boot-source HTTP/1.1\r\nContent-Length: 26\r\n\r\n{\"kernel",
        );
        // The body has its own clock, from the end of the head.
        stepped.advance(SHORT.body - TICK);
        send(&mut stepped, &mut client, b"_image");
        assert_eq!(stepped.open_connections(), 1);
        stepped.advance(TICK);
        assert!(read_response(&mut client).starts_with("HTTP/1.1 408"));
        assert!(is_closed(&mut client));
    }

    #[test]
    fn the_next_pipelined_request_gets_a_clock_of_its_own() {
        let mut stepped = Stepped::new();
        let mut client = stepped.connect();
        send(&mut stepped, &mut client, b"GET /nowhere HTTP/1.1\r\n");
        stepped.advance(SHORT.header - TICK);
        // The end of the first request and the start of the second, in one write.
        send(&mut stepped, &mut client, b"\r\nGET /nowh");
        assert!(read_response(&mut client).starts_with("HTTP/1.1 400"));
        stepped.advance(SHORT.header - TICK);
        assert_eq!(stepped.open_connections(), 1);
        stepped.advance(TICK);
        assert!(read_response(&mut client).starts_with("HTTP/1.1 408"));
    }

    #[test]
    fn bytes_that_arrived_while_the_thread_was_busy_are_served_before_a_timeout() {
        let mut stepped = Stepped::new();
        let mut client = stepped.connect();
        send(&mut stepped, &mut client, b"GET /nowhere HTTP/1.1\r\n");
        // The end of the head arrives in time, but the thread only looks after the deadline.
        client.write_all(b"\r\n").unwrap();
        stepped.clock.advance(SHORT.header);
        stepped.event_loop.expire();
        assert!(read_response(&mut client).starts_with("HTTP/1.1 400 Bad Request"));
        assert_eq!(stepped.open_connections(), 1);
    }

    #[test]
    fn the_loop_wakes_at_the_earliest_deadline() {
        let mut stepped = Stepped::new();
        assert_eq!(stepped.event_loop.wait_timeout(), -1);
        let _idle = stepped.connect();
        let idle_ms = i32::try_from(SHORT.idle.as_millis()).unwrap();
        assert_eq!(stepped.event_loop.wait_timeout(), idle_ms);
        let mut sending = stepped.connect();
        send(&mut stepped, &mut sending, b"GET");
        let header_ms = i32::try_from(SHORT.header.as_millis()).unwrap();
        assert_eq!(stepped.event_loop.wait_timeout(), header_ms);
        stepped.advance(SHORT.header + TICK);
        // The one left is the idle connection, with less time to go.
        assert_eq!(stepped.event_loop.wait_timeout(), idle_ms - header_ms - 1);
    }

    #[test]
    fn a_slowloris_client_is_cut_off_on_the_systems_clock() {
        let timeouts = Timeouts {
            header: Duration::from_millis(300),
            ..Timeouts::default()
        };
        let dir = TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let path = dir.as_path().join("api.sock");
        let (_server, requests) =
            ApiServer::spawn_with(&path, timeouts, Box::new(MonotonicClock), None).unwrap();
        let mut slow = connect(&path);
        let started = Instant::now();
        let mut received = Vec::new();
        for byte in b"GET /machine-config HTTP/1.1\r\nX-Slow: ".iter().cycle() {
            if slow.write_all(&[*byte]).is_err() || started.elapsed() > TIMEOUT {
                break;
            }
            thread::sleep(Duration::from_millis(20));
            // The 408 may already be there.
            slow.set_nonblocking(true).unwrap();
            let mut chunk = [0u8; 512];
            if let Ok(count) = slow.read(&mut chunk) {
                received.extend_from_slice(&chunk[..count]);
            }
            slow.set_nonblocking(false).unwrap();
            if !received.is_empty() {
                break;
            }
        }
        assert!(started.elapsed() >= timeouts.header);
        assert!(
            started.elapsed() < TIMEOUT,
            "the slow client was never cut off"
        );
        // The rest of the answer, then the end of the connection: EOF, or a reset when it closed
        // with a byte of ours unread.
        if let Err(err) = slow.read_to_end(&mut received) {
            assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        }
        let response = String::from_utf8(received).unwrap();
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(requests.try_recv().is_none());
    }

    #[test]
    fn the_socket_is_created_private_whatever_the_umask() {
        let fixture = start();
        let mode = std::fs::metadata(&fixture.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
    }

    #[test]
    fn a_socket_path_too_long_is_refused() {
        let dir = TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let path = dir.as_path().join("s".repeat(120));
        assert!(matches!(
            ApiServer::spawn(&path),
            Err(ServerError::Bind { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn the_thread_hook_runs_on_the_api_thread_and_a_failure_stops_the_server() {
        let dir = std::env::temp_dir().join(format!("ember-api-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let ran_on = Arc::new(std::sync::Mutex::new(None));
        let hook: ThreadHook = Box::new({
            let ran_on = ran_on.clone();
            move || {
                *ran_on.lock().unwrap() = thread::current().name().map(str::to_string);
                Ok(())
            }
        });
        let (server, _requests) = ApiServer::spawn_with(
            &path,
            Timeouts::default(),
            Box::new(MonotonicClock),
            Some(hook),
        )
        .unwrap();
        assert_eq!(ran_on.lock().unwrap().as_deref(), Some(THREAD_NAME));
        drop(server);

        let hook: ThreadHook = Box::new(|| Err(io::Error::other("no filter")));
        let err = ApiServer::spawn_with(
            &path,
            Timeouts::default(),
            Box::new(MonotonicClock),
            Some(hook),
        )
        .unwrap_err();
        assert!(matches!(err, ServerError::ThreadHook(_)), "{err}");
        assert!(!path.exists(), "the socket file is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
