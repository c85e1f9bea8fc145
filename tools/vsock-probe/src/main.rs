//! `ember-vsock-probe`: both ends of ember's vsock tests.
//!
//! In the guest it speaks `AF_VSOCK` (`listen PORT`, `connect PORT`, the host being CID 2); on
//! the host it speaks the Unix sockets of ember's hybrid vsock (`uds-connect UDS_PATH PORT`,
//! which does the `CONNECT PORT\n` / `OK ...\n` handshake, and `uds-listen PATH`, where a
//! guest connecting to host port P arrives when `PATH` is `<uds_path>_P`). The same over TCP
//! (`tcp-listen PORT`, `tcp-connect ADDR:PORT`) measures a network device beside it. On each
//! connection
//! it sends a seeded pattern and/or receives and checksums what comes, echoes, or runs a
//! request/response loop and reports its round-trip latency. One line of `key=value` results
//! goes to stdout; the exit status is 0 only when every connection did what it was asked.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: ember-vsock-probe ENDPOINT [OPTION...]

endpoints:
  listen PORT              accept AF_VSOCK connections on PORT (in the guest)
  connect PORT             connect to AF_VSOCK PORT of --cid (default 2, the host)
  uds-listen PATH          accept connections on the Unix socket PATH (on the host)
  uds-connect PATH PORT    connect to ember's Unix socket PATH, then to guest PORT
  tcp-listen PORT          accept TCP connections on PORT (to compare with a network)
  tcp-connect ADDR:PORT    connect over TCP

options (sizes take K, M or G for KiB, MiB, GiB):
  --send SIZE       send SIZE bytes of the pattern of --seed, then shut down writing
  --recv            receive until the peer shuts down; print the count and checksum
  --expect SIZE     with --recv: each connection must bring exactly the SIZE-byte pattern
  --echo            send back whatever comes, until the peer shuts down
  --ping ROUNDS     send --size bytes and read them back, ROUNDS times (the peer echoes);
                    print the round-trip latency
  --size SIZE       the message of --ping (default 64)
  --seed N          the pattern's seed (default 1)
  --conns N         connect N times at once, or accept N connections (default 1)
  --pause-ms MS     on each connection, wait MS before reading or writing anything
  --wait-ms MS      retry connecting (and the handshake) for up to MS
  --cid N           the CID `connect` reaches (default 2)
  --timeout-ms MS   give up, with status 1, after MS (default 300000)
";

/// Bytes moved by one `read` or `write`.
const CHUNK: usize = 64 * 1024;
/// How long to wait between two connection attempts.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// The longest handshake answer read before giving up on it.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Where connections come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    VsockListen { port: u32 },
    VsockConnect { cid: u32, port: u32 },
    UdsListen { path: String },
    UdsConnect { path: String, port: u32 },
    TcpListen { port: u16 },
    TcpConnect { addr: String },
}

/// What each connection does.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mode {
    send: u64,
    recv: bool,
    expect: Option<u64>,
    echo: bool,
    ping: u32,
    size: usize,
    seed: u64,
    conns: u32,
    pause: Duration,
    wait: Duration,
    timeout: Duration,
}

impl Default for Mode {
    fn default() -> Self {
        Mode {
            send: 0,
            recv: false,
            expect: None,
            echo: false,
            ping: 0,
            size: 64,
            seed: 1,
            conns: 1,
            pause: Duration::ZERO,
            wait: Duration::ZERO,
            timeout: Duration::from_secs(300),
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 1u64 << 10),
        Some((at, 'M' | 'm')) => (&text[..at], 1 << 20),
        Some((at, 'G' | 'g')) => (&text[..at], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("not a size: {text}"))
}

fn parse_number<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{what} is not a number: {text}"))
}

fn parse_args(args: &[String]) -> Result<(Endpoint, Mode), String> {
    let mut args = args.iter().map(String::as_str);
    let mut next = |what: &str| args.next().ok_or_else(|| format!("{what} is missing"));
    let endpoint = match next("the endpoint")? {
        "listen" => Endpoint::VsockListen {
            port: parse_number("PORT", next("PORT")?)?,
        },
        "connect" => Endpoint::VsockConnect {
            cid: libc::VMADDR_CID_HOST,
            port: parse_number("PORT", next("PORT")?)?,
        },
        "uds-listen" => Endpoint::UdsListen {
            path: next("PATH")?.to_string(),
        },
        "uds-connect" => Endpoint::UdsConnect {
            path: next("PATH")?.to_string(),
            port: parse_number("PORT", next("PORT")?)?,
        },
        "tcp-listen" => Endpoint::TcpListen {
            port: parse_number("PORT", next("PORT")?)?,
        },
        "tcp-connect" => Endpoint::TcpConnect {
            addr: next("ADDR:PORT")?.to_string(),
        },
        other => return Err(format!("unknown endpoint: {other}")),
    };
    let mut endpoint = endpoint;
    let mut mode = Mode::default();
    let ms = |text: &str| parse_number("MS", text).map(Duration::from_millis);
    while let Ok(flag) = next("an option") {
        match flag {
            "--send" => mode.send = parse_size(next("SIZE")?)?,
            "--recv" => mode.recv = true,
            "--expect" => mode.expect = Some(parse_size(next("SIZE")?)?),
            "--echo" => mode.echo = true,
            "--ping" => mode.ping = parse_number("ROUNDS", next("ROUNDS")?)?,
            "--size" => {
                let size = parse_size(next("SIZE")?)?;
                mode.size = usize::try_from(size)
                    .ok()
                    .filter(|&s| s > 0 && s <= 1 << 24)
                    .ok_or("--size must be 1 byte to 16 MiB")?;
            }
            "--seed" => mode.seed = parse_number("N", next("N")?)?,
            "--conns" => mode.conns = parse_number("N", next("N")?)?,
            "--pause-ms" => mode.pause = ms(next("MS")?)?,
            "--wait-ms" => mode.wait = ms(next("MS")?)?,
            "--timeout-ms" => mode.timeout = ms(next("MS")?)?,
            "--cid" => match &mut endpoint {
                Endpoint::VsockConnect { cid, .. } => *cid = parse_number("CID", next("CID")?)?,
                _ => return Err("--cid is for connect".into()),
            },
            other => return Err(format!("unknown option: {other}")),
        }
    }
    if mode.conns == 0 {
        return Err("--conns must be at least 1".into());
    }
    if mode.echo && (mode.send > 0 || mode.recv || mode.ping > 0) {
        return Err("--echo goes alone".into());
    }
    if mode.ping > 0 && (mode.send > 0 || mode.recv) {
        return Err("--ping goes without --send and --recv".into());
    }
    if mode.expect.is_some() && !mode.recv {
        return Err("--expect needs --recv".into());
    }
    Ok((endpoint, mode))
}

/// The pattern's eight bytes at `block` (bytes `8 * block..8 * block + 8`): splitmix64.
fn pattern_block(seed: u64, block: u64) -> [u8; 8] {
    let mut z = seed
        .wrapping_add(block)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the pattern from byte `offset`, a multiple of 8.
fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    let first = offset / 8;
    for (block, bytes) in (first..).zip(buf.chunks_mut(8)) {
        let pattern = pattern_block(seed, block);
        bytes.copy_from_slice(&pattern[..bytes.len()]);
    }
}

/// A running checksum of a byte stream (Fletcher's, in 64 bits): the same for the same bytes
/// however they are split, and changed by a byte lost, added or moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Checksum {
    a: u64,
    b: u64,
    len: u64,
}

impl Checksum {
    fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.a = self.a.wrapping_add(u64::from(byte));
            self.b = self.b.wrapping_add(self.a);
        }
        self.len = self.len.wrapping_add(bytes.len() as u64);
    }

    fn value(&self) -> u64 {
        self.b.rotate_left(32) ^ self.a ^ self.len
    }

    /// The checksum of the first `len` bytes of the pattern of `seed`.
    fn of_pattern(seed: u64, len: u64) -> Checksum {
        let mut sum = Checksum::default();
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < len {
            let n = usize::try_from(len - offset).map_or(CHUNK, |left| left.min(CHUNK));
            fill_pattern(&mut buf[..n], seed, offset);
            sum.update(&buf[..n]);
            offset += n as u64;
        }
        sum
    }
}

/// One connection: a stream socket of either family.
#[derive(Debug)]
struct Conn {
    file: File,
}

impl Conn {
    fn from_fd(fd: OwnedFd) -> Conn {
        Conn {
            file: File::from(fd),
        }
    }

    fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            file: self.file.try_clone()?,
        })
    }

    fn shutdown_write(&self) {
        // SAFETY: `shutdown` takes no pointer; the descriptor is owned by `self.file`.
        unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) };
    }

    /// Reads until the peer shuts down, into `sum`; `Ok(count)`.
    fn drain(&mut self, mut sum: Option<&mut Checksum>) -> io::Result<u64> {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            if let Some(sum) = sum.as_deref_mut() {
                sum.update(&buf[..n]);
            }
            total += n as u64;
        }
    }

    fn send_pattern(&mut self, seed: u64, len: u64) -> io::Result<Checksum> {
        let mut buf = vec![0u8; CHUNK];
        let mut sum = Checksum::default();
        let mut offset = 0u64;
        while offset < len {
            let n = usize::try_from(len - offset).map_or(CHUNK, |left| left.min(CHUNK));
            fill_pattern(&mut buf[..n], seed, offset);
            self.file.write_all(&buf[..n])?;
            sum.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(sum)
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    // SAFETY: `socket` takes no pointer; a descriptor it returns is new and owned here.
    let fd = cvt(unsafe { libc::socket(libc::AF_VSOCK, kind, 0) })?;
    // SAFETY: `fd` was just returned by `socket` and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: `sockaddr_vm` is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_connect(cid: u32, port: u32) -> io::Result<Conn> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a `sockaddr_vm` that lives across the call, of the length given.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            VSOCK_ADDR_LEN,
        )
    })?;
    Ok(Conn::from_fd(fd))
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a `sockaddr_vm` that lives across the call, of the length given.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            VSOCK_ADDR_LEN,
        )
    })?;
    // SAFETY: `listen` takes no pointer.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(fd)
}

fn vsock_accept(listener: RawFd) -> io::Result<Conn> {
    loop {
        // SAFETY: null address and length ask `accept4` for no peer address.
        let ret = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        match cvt(ret) {
            // SAFETY: `fd` was just returned by `accept4` and nothing else owns it.
            Ok(fd) => return Ok(Conn::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Connects to ember's Unix socket and asks for guest `port`: `CONNECT port\n`, answered with
/// `OK <host port>\n` before the stream is the guest's.
fn uds_connect(path: &str, port: u32) -> io::Result<Conn> {
    let mut stream = UnixStream::connect(path)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() >= MAX_HANDSHAKE_LINE || stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "no OK for port {port}: {:?}",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("refused: {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    Ok(Conn::from_fd(OwnedFd::from(stream)))
}

fn connect(endpoint: &Endpoint, wait: Duration) -> io::Result<Conn> {
    let deadline = Instant::now() + wait;
    loop {
        let result = match endpoint {
            Endpoint::VsockConnect { cid, port } => vsock_connect(*cid, *port),
            Endpoint::UdsConnect { path, port } => uds_connect(path, *port),
            Endpoint::TcpConnect { addr } => TcpStream::connect(addr.as_str()).map(|stream| {
                // Requests and answers go at once, as over vsock.
                let _ = stream.set_nodelay(true);
                Conn::from_fd(OwnedFd::from(stream))
            }),
            _ => unreachable!("a listening endpoint does not connect"),
        };
        match result {
            Err(_) if Instant::now() < deadline => thread::sleep(RETRY_INTERVAL),
            other => return other,
        }
    }
}

/// What one connection did.
#[derive(Debug, Default)]
struct Report {
    sent: u64,
    received: u64,
    sum: Option<Checksum>,
    rtts: Vec<Duration>,
    /// From the connection's start (after `--pause-ms`) to its end.
    elapsed: Duration,
    error: Option<String>,
}

/// Runs `mode` on `conn`; `expected` is the checksum `--expect` asks for.
fn serve(mut conn: Conn, mode: &Mode, expected: Option<Checksum>) -> Report {
    thread::sleep(mode.pause);
    let start = Instant::now();
    let mut report = Report::default();
    let result = exchange(&mut conn, mode, &mut report);
    report.elapsed = start.elapsed();
    if let Err(err) = result {
        report.error = Some(err.to_string());
        return report;
    }
    if let (Some(expected), Some(sum)) = (expected, report.sum) {
        if sum != expected {
            report.error = Some(format!(
                "received {} bytes, sum {:016x}; expected {} bytes, sum {:016x}",
                sum.len,
                sum.value(),
                expected.len,
                expected.value()
            ));
        }
    }
    report
}

fn exchange(conn: &mut Conn, mode: &Mode, report: &mut Report) -> io::Result<()> {
    if mode.echo {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match conn.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            conn.file.write_all(&buf[..n])?;
            report.received += n as u64;
            report.sent += n as u64;
        }
        conn.shutdown_write();
        return Ok(());
    }
    if mode.ping > 0 {
        let mut request = vec![0u8; mode.size];
        let mut answer = vec![0u8; mode.size];
        for round in 0..mode.ping {
            fill_pattern(&mut request, mode.seed.wrapping_add(u64::from(round)), 0);
            let start = Instant::now();
            conn.file.write_all(&request)?;
            conn.file.read_exact(&mut answer)?;
            report.rtts.push(start.elapsed());
            if answer != request {
                return Err(io::Error::other(format!("round {round}: a wrong answer")));
            }
            report.sent += mode.size as u64;
            report.received += mode.size as u64;
        }
        conn.shutdown_write();
        conn.drain(None)?;
        return Ok(());
    }
    let sender = if mode.send > 0 {
        let mut writer = conn.try_clone()?;
        let (seed, len) = (mode.seed, mode.send);
        Some(thread::spawn(move || {
            let sum = writer.send_pattern(seed, len);
            writer.shutdown_write();
            sum
        }))
    } else {
        conn.shutdown_write();
        None
    };
    let mut sum = Checksum::default();
    report.received = conn.drain(Some(&mut sum))?;
    if mode.recv {
        report.sum = Some(sum);
    }
    if let Some(sender) = sender {
        let sent = sender
            .join()
            .map_err(|_| io::Error::other("the sending thread panicked"))??;
        report.sent = sent.len;
        if !mode.recv {
            report.sum = Some(sent);
        }
    }
    Ok(())
}

/// Accepts or opens `mode.conns` connections and serves each on a thread of its own.
fn run(endpoint: &Endpoint, mode: &Mode) -> io::Result<Vec<Report>> {
    let expected = mode.expect.map(|len| Checksum::of_pattern(mode.seed, len));
    let mut threads = Vec::new();
    let spawn = |conn: Conn| {
        let mode = mode.clone();
        thread::spawn(move || serve(conn, &mode, expected))
    };
    match endpoint {
        Endpoint::VsockListen { port } => {
            let listener = vsock_listen(*port)?;
            for _ in 0..mode.conns {
                threads.push(spawn(vsock_accept(listener.as_raw_fd())?));
            }
        }
        Endpoint::UdsListen { path } => {
            let listener = UnixListener::bind(path)?;
            for _ in 0..mode.conns {
                threads.push(spawn(Conn::from_fd(OwnedFd::from(listener.accept()?.0))));
            }
        }
        Endpoint::TcpListen { port } => {
            let listener = TcpListener::bind(("0.0.0.0", *port))?;
            for _ in 0..mode.conns {
                let stream = listener.accept()?.0;
                let _ = stream.set_nodelay(true);
                threads.push(spawn(Conn::from_fd(OwnedFd::from(stream))));
            }
        }
        Endpoint::VsockConnect { .. }
        | Endpoint::UdsConnect { .. }
        | Endpoint::TcpConnect { .. } => {
            let connectors: Vec<_> = (0..mode.conns)
                .map(|_| {
                    let (endpoint, mode) = (endpoint.clone(), mode.clone());
                    thread::spawn(move || match connect(&endpoint, mode.wait) {
                        Ok(conn) => serve(conn, &mode, expected),
                        Err(err) => Report {
                            error: Some(format!("cannot connect: {err}")),
                            ..Report::default()
                        },
                    })
                })
                .collect();
            threads.extend(connectors);
        }
    }
    Ok(threads
        .into_iter()
        .map(|thread| {
            thread.join().unwrap_or_else(|_| Report {
                error: Some("a connection's thread panicked".into()),
                ..Report::default()
            })
        })
        .collect())
}

/// The `p`th percentile (0 to 100) of sorted `values`, nearest rank.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// The result line. Its time is the longest connection's, from its start (after
/// `--pause-ms`) to its end: connections run at once.
fn summary(reports: &[Report]) -> String {
    let elapsed = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let ok = reports.iter().filter(|r| r.error.is_none()).count();
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let received: u64 = reports.iter().map(|r| r.received).sum();
    let mut line = format!(
        "conns={} ok={ok} sent={sent} received={received}",
        reports.len()
    );
    if let [report] = reports {
        if let Some(sum) = report.sum {
            line.push_str(&format!(" sum={:016x}", sum.value()));
        }
    }
    let secs = elapsed.as_secs_f64();
    let mib_s = if secs > 0.0 {
        sent.max(received) as f64 / secs / f64::from(1u32 << 20)
    } else {
        0.0
    };
    line.push_str(&format!(" ms={} mib_s={mib_s:.1}", elapsed.as_millis()));
    let mut rtts: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.rtts.iter().copied())
        .collect();
    if !rtts.is_empty() {
        rtts.sort();
        line.push_str(&format!(
            " rounds={} rtt_us_min={} rtt_us_median={} rtt_us_p99={}",
            rtts.len(),
            rtts[0].as_micros(),
            percentile(&rtts, 50).as_micros(),
            percentile(&rtts, 99).as_micros()
        ));
    }
    line
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoint, mode) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(err) => {
            eprintln!("ember-vsock-probe: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let timeout = mode.timeout;
    thread::spawn(move || {
        thread::sleep(timeout);
        eprintln!(
            "ember-vsock-probe: timed out after {} ms",
            timeout.as_millis()
        );
        std::process::exit(1);
    });
    let reports = match run(&endpoint, &mode) {
        Ok(reports) => reports,
        Err(err) => {
            eprintln!("ember-vsock-probe: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", summary(&reports));
    let mut status = ExitCode::SUCCESS;
    for (index, error) in reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.error.as_ref()?)))
    {
        eprintln!("ember-vsock-probe: connection {index}: {error}");
        status = ExitCode::FAILURE;
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn endpoints_and_options_parse_and_bad_ones_are_refused() {
        let (endpoint, mode) = parse_args(&args(
            "uds-connect /v.sock 52 --send 64M --seed 7 --conns 100",
        ))
        .unwrap();
        assert_eq!(
            endpoint,
            Endpoint::UdsConnect {
                path: "/v.sock".into(),
                port: 52
            }
        );
        assert_eq!((mode.send, mode.seed, mode.conns), (64 << 20, 7, 100));
        let (endpoint, mode) =
            parse_args(&args("connect 1024 --cid 3 --ping 10 --size 1K")).unwrap();
        assert_eq!(endpoint, Endpoint::VsockConnect { cid: 3, port: 1024 });
        assert_eq!((mode.ping, mode.size), (10, 1024));
        let (endpoint, _) = parse_args(&args("tcp-connect 169.254.78.2:5100 --send 1")).unwrap();
        assert_eq!(
            endpoint,
            Endpoint::TcpConnect {
                addr: "169.254.78.2:5100".into()
            }
        );
        for bad in [
            "",
            "listen",
            "listen x",
            "dial 1",
            "listen 1 --echo --recv",
            "listen 1 --expect 1",
            "listen 1 --conns 0",
            "listen 1 --cid 3",
            "listen 1 --send 1T",
            "listen 1 --size 0",
            "listen 1 --bogus",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_checksum_does_not_depend_on_how_the_stream_is_split() {
        let mut whole = vec![0u8; 1000];
        fill_pattern(&mut whole, 3, 0);
        let mut one = Checksum::default();
        one.update(&whole);
        let mut pieces = Checksum::default();
        for piece in whole.chunks(7) {
            pieces.update(piece);
        }
        assert_eq!(one, pieces);
        assert_eq!(one, Checksum::of_pattern(3, 1000));
        // The pattern from an offset continues it.
        let mut tail = vec![0u8; 1000 - 64];
        fill_pattern(&mut tail, 3, 64);
        assert_eq!(tail, whole[64..]);
        // A byte moved, lost or another seed changes the sum.
        whole.swap(10, 11);
        let mut swapped = Checksum::default();
        swapped.update(&whole);
        assert_ne!(swapped.value(), one.value());
        assert_ne!(Checksum::of_pattern(3, 999).value(), one.value());
        assert_ne!(Checksum::of_pattern(4, 1000).value(), one.value());
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&values, 50), Duration::from_micros(50));
        assert_eq!(percentile(&values, 99), Duration::from_micros(99));
        assert_eq!(percentile(&values[..1], 99), Duration::from_micros(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    /// A stand-in for ember's side: answers `CONNECT port` with `OK`, then echoes.
    fn fake_vmm(path: &str, connections: usize) -> thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let mut requests = Vec::new();
            let mut echoes = Vec::new();
            for _ in 0..connections {
                let (mut stream, _) = listener.accept().unwrap();
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while line.last() != Some(&b'\n') {
                    stream.read_exact(&mut byte).unwrap();
                    line.push(byte[0]);
                }
                requests.push(String::from_utf8(line).unwrap());
                if requests.last().unwrap() == "CONNECT 9\n" {
                    continue; // No guest listens there: closed without an answer.
                }
                stream.write_all(b"OK 1073741824\n").unwrap();
                let conn = Conn::from_fd(OwnedFd::from(stream));
                echoes.push(thread::spawn(move || {
                    serve(
                        conn,
                        &Mode {
                            echo: true,
                            ..Mode::default()
                        },
                        None,
                    )
                }));
            }
            for echo in echoes {
                assert!(echo.join().unwrap().error.is_none());
            }
            requests
        })
    }

    fn scratch(name: &str) -> String {
        let path = std::env::temp_dir().join(format!("ember-probe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn uds_connect_does_the_handshake_and_checks_what_comes_back() {
        let path = scratch("handshake");
        let vmm = fake_vmm(&path, 5);
        let endpoint = Endpoint::UdsConnect {
            path: path.clone(),
            port: 52,
        };
        // Sent and echoed: the receiver's sum is the sender's.
        let mode = Mode {
            send: 300_000,
            recv: true,
            expect: Some(300_000),
            conns: 3,
            ..Mode::default()
        };
        let reports = run(&endpoint, &mode).unwrap();
        assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
        assert!(
            reports
                .iter()
                .all(|r| r.sent == 300_000 && r.received == 300_000)
        );
        let line = summary(&reports);
        assert!(
            line.starts_with("conns=3 ok=3 sent=900000 received=900000"),
            "{line}"
        );

        let ping = Mode {
            ping: 20,
            size: 100,
            ..Mode::default()
        };
        let reports = run(&endpoint, &ping).unwrap();
        assert_eq!(reports[0].rtts.len(), 20);
        assert!(summary(&reports).contains(" rounds=20 rtt_us_min="));

        let refused = Endpoint::UdsConnect {
            path: path.clone(),
            port: 9,
        };
        let err = connect(&refused, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("no OK for port 9"), "{err}");
        let requests = vmm.join().unwrap();
        assert_eq!(requests[..2], ["CONNECT 52\n", "CONNECT 52\n"]);
        assert!(requests.contains(&"CONNECT 9\n".to_string()));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tcp_endpoints_carry_the_same_pattern() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = Endpoint::TcpListen { port };
        let server = thread::spawn(move || {
            run(
                &listen,
                &Mode {
                    recv: true,
                    expect: Some(100_000),
                    ..Mode::default()
                },
            )
            .unwrap()
        });
        let connect = Endpoint::TcpConnect {
            addr: format!("127.0.0.1:{port}"),
        };
        let sent = run(
            &connect,
            &Mode {
                send: 100_000,
                wait: Duration::from_secs(10),
                ..Mode::default()
            },
        )
        .unwrap();
        let received = server.join().unwrap();
        assert!(sent[0].error.is_none() && received[0].error.is_none());
        assert_eq!(sent[0].sum, received[0].sum);
    }

    #[test]
    fn a_wrong_stream_fails_the_expectation() {
        let path = scratch("expect");
        let listen = Endpoint::UdsListen { path: path.clone() };
        let mode = Mode {
            recv: true,
            expect: Some(1000),
            ..Mode::default()
        };
        let server = {
            let mode = mode.clone();
            thread::spawn(move || run(&listen, &mode).unwrap())
        };
        let mut client = loop {
            match UnixStream::connect(&path) {
                Ok(stream) => break stream,
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut bytes = vec![0u8; 1000];
        fill_pattern(&mut bytes, 1, 0);
        bytes[500] ^= 1;
        client.write_all(&bytes).unwrap();
        drop(client);
        let reports = server.join().unwrap();
        let error = reports[0].error.as_deref().unwrap();
        assert!(error.starts_with("received 1000 bytes"), "{error}");
        std::fs::remove_file(&path).unwrap();
    }
}
