//! The API's costs, measured on a real `ember` process with a tiny guest on this host's
//! `/dev/kvm`:
//!
//! - **Start to API**: from spawning `ember --api-sock` to its socket accepting a connection,
//!   measured from outside (the client connects in a loop), and the CPU time the process had
//!   used by then (its `process_startup_time_cpu_us` metric). Median of `EMBER_BENCH_RUNS`
//!   (default 20) runs. As root, the same for `ember-jailer` starting `ember` in a jail (uid
//!   123, a chroot in a scratch directory, the API at the jail's `/run/firecracker.socket`),
//!   run by run in turn with the plain start, and the ratio of the medians; the CPU time then
//!   includes the jailer's.
//! - **Request latency**: `GET /machine-config` and `PATCH /vm` (pausing and resuming a
//!   running guest in turn), each sent `EMBER_BENCH_REQUESTS` (default 1000) times on one
//!   keep-alive connection after 50 that are not counted, from the request's first byte to the
//!   response's last; median and 99th percentile.
//!
//! Run with `cargo bench -p ember --bench api`.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_boot::test_utils::tiny_elf;

const EMBER: &str = env!("CARGO_BIN_EXE_ember");
const JAILER: &str = env!("CARGO_BIN_EXE_ember-jailer");

/// `in al, 0x64; test al, 1; jz .-4`, then a reset through the i8042: a guest that runs (and
/// exits to the VMM) until it gets a key.
const WAIT_FOR_KEY_THEN_RESET: [u8; 13] = [
    0xe4, 0x64, 0xa8, 0x01, 0x74, 0xfa, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Ember {
    child: Child,
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(socket: &Path) -> Ember {
    let _ = fs::remove_file(socket);
    let mut command = Command::new(EMBER);
    command.arg("--api-sock").arg(socket);
    start_ember(command)
}

/// `ember-jailer` starting ember in the jail `bench` under `base`, with its API at the jail's
/// default socket, which this returns.
fn spawn_jailed(base: &Path) -> (Ember, PathBuf) {
    let mut command = Command::new(JAILER);
    command
        .args([
            "--id",
            "bench",
            "--exec-file",
            EMBER,
            "--uid",
            "123",
            "--gid",
            "100",
        ])
        .arg("--chroot-base-dir")
        .arg(base)
        .arg("--");
    let socket = base.join("ember/bench/root/run/firecracker.socket");
    (start_ember(command), socket)
}

fn start_ember(mut command: Command) -> Ember {
    let child = command
        .args(["--serial", "none", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ember starts");
    Ember { child }
}

fn connect_when_ready(socket: &Path, deadline: Instant) -> UnixStream {
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return stream;
        }
        assert!(Instant::now() < deadline, "the API socket never accepted");
        std::hint::spin_loop();
    }
}

/// Sends one request and reads its response; returns the status.
fn request(stream: &mut UnixStream, method: &str, path: &str, body: Option<&str>) -> u16 {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    match body {
        Some(body) => text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => text.push_str("\r\n"),
    }
    stream.write_all(text.as_bytes()).expect("request sent");
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).expect("response read");
        assert!(n > 0, "the API closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let index = (sorted.len().saturating_sub(1) * p) / 100;
    sorted.get(index).copied().unwrap_or_default()
}

fn prometheus_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// One way of starting ember, measured: start to socket accepting, and CPU time by then.
#[derive(Default)]
struct StartTimes {
    walls: Vec<Duration>,
    cpus: Vec<Duration>,
}

impl StartTimes {
    /// Measures one start: `spawn` starts ember and says where its socket will be.
    fn measure(&mut self, spawn: impl FnOnce() -> (Ember, PathBuf)) {
        let started = Instant::now();
        let (ember, socket) = spawn();
        let mut stream = connect_when_ready(&socket, started + Duration::from_secs(10));
        self.walls.push(started.elapsed());
        let mut text = String::new();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("request sent");
        stream.read_to_string(&mut text).expect("metrics read");
        if let Some(cpu) = prometheus_value(&text, "ember_api_server_process_startup_time_cpu_us") {
            self.cpus.push(Duration::from_micros(cpu));
        }
        drop(ember);
    }

    /// Prints the medians; returns the median wall time.
    fn report(&mut self, label: &str) -> Duration {
        self.walls.sort();
        self.cpus.sort();
        let median = percentile(&self.walls, 50);
        println!(
            "{label} to API socket accepting: median {:.2} ms wall (min {:.2}, max {:.2}), \
             median {:.2} ms CPU, {} runs",
            median.as_secs_f64() * 1e3,
            self.walls
                .first()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            self.walls.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            percentile(&self.cpus, 50).as_secs_f64() * 1e3,
            self.walls.len(),
        );
        median
    }
}

fn start_to_api(dir: &Path, runs: usize) {
    let socket = dir.join("start.sock");
    let jails = dir.join("jails");
    fs::create_dir_all(&jails).expect("cannot create the jails' directory");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let jailed = unsafe { libc::geteuid() } == 0;
    let mut plain = StartTimes::default();
    let mut jail = StartTimes::default();
    for _ in 0..runs {
        plain.measure(|| (spawn(&socket), socket.clone()));
        if jailed {
            jail.measure(|| spawn_jailed(&jails));
        }
    }
    let plain = plain.report("start");
    if jailed {
        let jail = jail.report("jailed start (ember-jailer)");
        println!(
            "jailed / plain start to API: {:.2}",
            jail.as_secs_f64() / plain.as_secs_f64().max(f64::EPSILON)
        );
    } else {
        println!("jailed start to API: not measured (needs root)");
    }
}

/// Requests sent before each series and not counted: the first ones of a connection pay for
/// the allocations of its buffers.
const WARM_UP: usize = 50;

fn latency(label: &str, mut send: impl FnMut(usize) -> u16, requests: usize) {
    for i in 0..WARM_UP {
        send(i);
    }
    let mut times = Vec::with_capacity(requests);
    for i in 0..requests {
        let t0 = Instant::now();
        let status = send(i);
        times.push(t0.elapsed());
        assert!(status == 200 || status == 204, "{label}: status {status}");
    }
    times.sort();
    println!(
        "{label}: median {:.1} us, p99 {:.1} us, max {:.1} us over {requests} requests",
        percentile(&times, 50).as_secs_f64() * 1e6,
        percentile(&times, 99).as_secs_f64() * 1e6,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
    );
}

fn request_latency(dir: &Path, requests: usize) {
    let socket = dir.join("latency.sock");
    let kernel = dir.join("kernel");
    fs::write(&kernel, tiny_elf(&WAIT_FOR_KEY_THEN_RESET)).expect("kernel written");
    let _ember = spawn(&socket);
    let mut stream = connect_when_ready(&socket, Instant::now() + Duration::from_secs(10));
    latency(
        "GET /machine-config",
        |_| request(&mut stream, "GET", "/machine-config", None),
        requests,
    );
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    assert_eq!(
        request(&mut stream, "PUT", "/boot-source", Some(&boot)),
        204
    );
    assert_eq!(
        request(
            &mut stream,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        ),
        204
    );
    latency(
        "PATCH /vm (Paused and Resumed in turn, guest running)",
        |i| {
            let state = if i % 2 == 0 { "Paused" } else { "Resumed" };
            let body = format!(r#"{{"state": "{state}"}}"#);
            request(&mut stream, "PATCH", "/vm", Some(&body))
        },
        requests,
    );
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-api-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("cannot create a scratch directory");
    dir
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: keep that run short.
    let full = std::env::args().any(|a| a == "--bench");
    let dir = scratch();
    let (runs, requests) = if full {
        (
            env_count("EMBER_BENCH_RUNS", 20),
            env_count("EMBER_BENCH_REQUESTS", 1000),
        )
    } else {
        (2, 20)
    };
    start_to_api(&dir, runs);
    request_latency(&dir, requests);
    let _ = fs::remove_dir_all(&dir);
}
