//! The API of `ember` as a client sees it: a real `ember` process, requests over its Unix
//! socket, and the answers Firecracker gives, byte for byte where Firecracker's clients look.
//!
//! Guests here are tiny (a few bytes of code in an ELF, run on the host's `/dev/kvm`); the
//! Linux guest driven with `curl` is in `scripts/e2e.sh`.

use std::fs;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_boot::test_utils::tiny_elf;
use serde_json::{Value, json};

mod common;
use common::{Response, Scratch, encode, read_response, request, send, wait_for_api};

/// `mov dx, 0x3f8; mov al, 'U'; out dx, al`, then wait for a key on the i8042 (status bit 0),
/// then reset through it: the guest runs until `SendCtrlAltDel`, exiting to the VMM on every
/// poll, which the vCPU counters see.
const WAIT_FOR_KEY_THEN_RESET: [u8; 20] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'U', 0xee, // print U
    0xe4, 0x64, 0xa8, 0x01, 0x74, 0xfa, // in al, 0x64; test al, 1; jz back
    0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd, // reset through the i8042
];

/// A running `ember --api-sock`, killed when dropped.
struct Ember {
    child: Child,
    socket: PathBuf,
}

impl Ember {
    fn start(scratch: &Scratch, extra: &[&str]) -> Self {
        let serial = format!("file:{}", scratch.path("console").display());
        Ember::spawn(
            scratch,
            &serial,
            extra,
            Command::new(env!("CARGO_BIN_EXE_ember")),
        )
    }

    /// Starts `ember` with `--serial serial`; its stdout is a pipe nobody reads.
    fn start_with_serial(scratch: &Scratch, serial: &str, extra: &[&str]) -> Self {
        Ember::spawn(
            scratch,
            serial,
            extra,
            Command::new(env!("CARGO_BIN_EXE_ember")),
        )
    }

    /// Starts ember from a shell that sets the umask first.
    fn start_under_umask(scratch: &Scratch, umask: &str) -> Self {
        let mut shell = Command::new("/bin/sh");
        shell
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_ember"));
        let serial = format!("file:{}", scratch.path("console").display());
        Ember::spawn(scratch, &serial, &[], shell)
    }

    fn spawn(scratch: &Scratch, serial: &str, extra: &[&str], mut command: Command) -> Self {
        let socket = scratch.path("api.sock");
        let mut child = command
            .arg("--api-sock")
            .arg(&socket)
            .arg("--serial")
            .arg(serial)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ember starts");
        wait_for_api(&mut child, &socket);
        Ember { child, socket }
    }

    /// Sends raw bytes on a new connection and reads one response.
    fn raw(&self, request: &[u8]) -> Response {
        send(&self.socket, request)
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        request(&self.socket, method, path, body)
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    fn put(&self, path: &str, body: Value) -> Response {
        self.request("PUT", path, Some(&body))
    }

    fn patch(&self, path: &str, body: Value) -> Response {
        self.request("PATCH", path, Some(&body))
    }

    /// Waits for the process to end, at most 10 s; its exit status and stderr.
    fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut stderr) = self.child.stderr.take() {
                    stderr.read_to_string(&mut err).unwrap();
                }
                return (status.code(), err);
            }
            assert!(Instant::now() < deadline, "ember did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configured microVM with the waiting guest and metrics at `metrics`.
fn configure_waiting_guest(ember: &Ember, scratch: &Scratch) -> PathBuf {
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    let metrics = scratch.path("metrics.json");
    assert_eq!(
        ember
            .put(
                "/boot-source",
                json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"})
            )
            .status,
        204
    );
    assert_eq!(
        ember
            .put("/metrics", json!({"metrics_path": metrics}))
            .status,
        204
    );
    metrics
}

fn prometheus_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn before_boot_the_api_describes_and_configures_the_microvm() {
    let scratch = Scratch::new("configure");
    let ember = Ember::start(&scratch, &["--id", "vm-under-test"]);

    let info = ember.get("/");
    assert_eq!(info.status, 200);
    assert_eq!(info.header("Content-Type"), Some("application/json"));
    let info = info.json();
    assert_eq!(info["id"], "vm-under-test");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "ember");
    assert_eq!(
        ember.get("/version").json()["firecracker_version"],
        env!("CARGO_PKG_VERSION")
    );

    let machine = ember.get("/machine-config").json();
    assert_eq!(machine["vcpu_count"], 1);
    assert_eq!(machine["mem_size_mib"], 128);
    assert_eq!(
        ember
            .put(
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 256})
            )
            .status,
        204
    );
    assert_eq!(
        ember
            .patch("/machine-config", json!({"mem_size_mib": 512}))
            .status,
        204
    );
    let machine = ember.get("/machine-config").json();
    assert_eq!(
        (
            machine["vcpu_count"].clone(),
            machine["mem_size_mib"].clone()
        ),
        (json!(2), json!(512))
    );

    let disk = scratch.file("data.img", &[0u8; 4096]);
    let limiter = json!({"bandwidth": {"size": 1048576, "refill_time": 1000}});
    for (id, root) in [("data", false), ("rootfs", true)] {
        let response = ember.put(
            &format!("/drives/{id}"),
            json!({"drive_id": id, "path_on_host": disk, "is_root_device": root,
                   "is_read_only": !root, "rate_limiter": limiter}),
        );
        assert_eq!(response.status, 204, "{}", response.body);
        assert!(response.body.is_empty());
    }
    let response = ember.put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
               "rx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}),
    );
    assert_eq!(response.status, 204, "{}", response.body);

    let config = ember.get("/vm/config").json();
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);
    // The root device goes first, as in Firecracker.
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(config["drives"][1]["drive_id"], "data");
    assert_eq!(config["drives"][1]["rate_limiter"], limiter);
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap0");
    assert_eq!(
        config["network-interfaces"][0]["rx_rate_limiter"]["ops"]["size"],
        100
    );
}

#[test]
fn bad_requests_get_a_400_with_a_fault_message_and_change_nothing() {
    let scratch = Scratch::new("bad");
    let ember = Ember::start(&scratch, &[]);
    let disk = scratch.file("disk.img", &[0u8; 512]);
    assert_eq!(
        ember
            .put(
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true})
            )
            .status,
        204
    );
    let before = ember.get("/vm/config").body;

    let raw_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "malformed JSON",
            encode("PUT", "/machine-config", Some("{\"vcpu_count\": 2,")),
            "",
        ),
        (
            "unknown field",
            encode(
                "PUT",
                "/machine-config",
                Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "turbo": true}"#),
            ),
            "turbo",
        ),
        (
            "wrong type",
            encode(
                "PUT",
                "/machine-config",
                Some(r#"{"vcpu_count": "two", "mem_size_mib": 256}"#),
            ),
            "",
        ),
        (
            "missing field",
            encode("PUT", "/machine-config", Some(r#"{"vcpu_count": 2}"#)),
            "mem_size_mib",
        ),
        (
            "unknown path",
            encode("GET", "/snapshots", None),
            "Invalid request method and/or path",
        ),
        (
            "wrong method",
            encode("DELETE", "/machine-config", None),
            "",
        ),
        (
            "drive id with path characters",
            encode(
                "PUT",
                "/drives/..%2Fetc",
                Some(r#"{"drive_id": "../etc", "path_on_host": "x", "is_root_device": false}"#),
            ),
            "",
        ),
        (
            "drive id with a slash in the path",
            encode(
                "PUT",
                "/drives/a/b",
                Some(r#"{"drive_id": "a", "path_on_host": "x", "is_root_device": false}"#),
            ),
            "",
        ),
        (
            "ids that differ",
            encode(
                "PUT",
                "/drives/data",
                Some(r#"{"drive_id": "other", "path_on_host": "x", "is_root_device": false}"#),
            ),
            "does not match",
        ),
        (
            "a second root device",
            encode(
                "PUT",
                "/drives/second",
                Some(r#"{"drive_id": "second", "path_on_host": "x", "is_root_device": true}"#),
            ),
            "root",
        ),
        (
            "invalid rate limiter",
            encode(
                "PUT",
                "/drives/data",
                Some(
                    r#"{"drive_id": "data", "path_on_host": "x", "is_root_device": false,
                        "rate_limiter": {"bandwidth": {"size": -1, "refill_time": 100}}}"#,
                ),
            ),
            "",
        ),
        (
            "rate limiter with an unknown field",
            encode(
                "PUT",
                "/drives/data",
                Some(
                    r#"{"drive_id": "data", "path_on_host": "x", "is_root_device": false,
                        "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "rate": 2}}}"#,
                ),
            ),
            "rate",
        ),
        (
            "too many vCPUs",
            encode(
                "PUT",
                "/machine-config",
                Some(r#"{"vcpu_count": 200, "mem_size_mib": 256}"#),
            ),
            "vCPUs",
        ),
        (
            "a running-device update before boot",
            encode(
                "PATCH",
                "/drives/rootfs",
                Some(r#"{"drive_id": "rootfs", "path_on_host": "y"}"#),
            ),
            "before starting",
        ),
        (
            "pause before boot",
            encode("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
            "before starting",
        ),
        (
            "InstanceStart without a kernel",
            encode(
                "PUT",
                "/actions",
                Some(r#"{"action_type": "InstanceStart"}"#),
            ),
            "without kernel",
        ),
        (
            "an unknown action",
            encode("PUT", "/actions", Some(r#"{"action_type": "Explode"}"#)),
            "",
        ),
    ];
    for (what, request, expected) in raw_cases {
        let response = ember.raw(&request);
        assert_eq!(response.status, 400, "{what}: {}", response.body);
        let fault = response.fault();
        assert!(!fault.is_empty(), "{what}");
        assert!(
            fault.contains(expected),
            "{what}: {fault:?} lacks {expected:?}"
        );
        assert_eq!(
            ember.get("/vm/config").body,
            before,
            "{what} changed the state"
        );
    }

    // A body over the limit (51200 bytes, as in Firecracker).
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(60_000));
    let response = ember.raw(&encode("PUT", "/boot-source", Some(&big)));
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(response.fault().contains("51200"), "{}", response.fault());
    assert_eq!(ember.get("/vm/config").body, before);
    assert_eq!(ember.get("/").json()["state"], "Not started");
}

#[test]
fn a_client_that_disconnects_mid_request_does_not_stop_the_api() {
    let scratch = Scratch::new("disconnect");
    let ember = Ember::start(&scratch, &[]);
    for partial in [
        &b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu"[..],
        b"GET /machine-con",
        b"",
    ] {
        let mut stream = UnixStream::connect(&ember.socket).unwrap();
        stream.write_all(partial).unwrap();
        drop(stream);
    }
    assert_eq!(ember.get("/machine-config").json()["vcpu_count"], 1);
    // Two requests on one connection are both answered.
    let mut stream = UnixStream::connect(&ember.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut both = encode("GET", "/", None);
    both.extend(encode("GET", "/version", None));
    stream.write_all(&both).unwrap();
    let mut stream = BufReader::new(stream);
    assert_eq!(read_response(&mut stream).json()["state"], "Not started");
    assert!(read_response(&mut stream).json()["firecracker_version"].is_string());
}

#[test]
fn a_started_guest_is_paused_resumed_measured_and_reset_by_ctrl_alt_del() {
    let scratch = Scratch::new("lifecycle");
    let ember = Ember::start(&scratch, &[]);
    let metrics = configure_waiting_guest(&ember, &scratch);

    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(ember.get("/").json()["state"], "Running");

    // Configuring after the start, and starting again, are refused.
    let response = ember.put(
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    assert_eq!(response.status, 400);
    assert!(
        response.fault().contains("after starting"),
        "{}",
        response.fault()
    );
    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 400);
    assert!(response.fault().contains("after starting"));
    assert_eq!(ember.get("/machine-config").json()["vcpu_count"], 1);

    // The guest polls the i8042: its port reads grow while it runs, and stop while paused.
    let io_in = || {
        let response = ember.get("/metrics");
        assert_eq!(response.status, 200);
        assert!(
            response
                .header("Content-Type")
                .unwrap()
                .starts_with("text/plain")
        );
        prometheus_value(&response.body, "ember_vcpu_exit_io_in")
    };
    let running = io_in();
    std::thread::sleep(Duration::from_millis(50));
    assert!(io_in() > running, "the guest runs");
    assert_eq!(ember.patch("/vm", json!({"state": "Paused"})).status, 204);
    assert_eq!(ember.get("/").json()["state"], "Paused");
    let paused = io_in();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(io_in(), paused, "a paused guest makes no exits");
    // Pausing twice is fine, as in Firecracker.
    assert_eq!(ember.patch("/vm", json!({"state": "Paused"})).status, 204);
    assert_eq!(ember.patch("/vm", json!({"state": "Resumed"})).status, 204);
    assert_eq!(ember.get("/").json()["state"], "Running");
    std::thread::sleep(Duration::from_millis(50));
    assert!(io_in() > paused, "a resumed guest runs again");

    // FlushMetrics writes a JSON line: counters since the line before.
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "FlushMetrics"}))
            .status,
        204
    );
    let text = fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 0);
    assert!(line["vcpu"]["exit_io_in"].as_u64().unwrap() > 0);
    assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() >= 1);
    assert!(line["api_server"]["requests"].as_u64().unwrap() > 0);

    // Ctrl+Alt+Del: the guest sees the keys and resets; ember exits 0.
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let console = scratch.path("console");
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("reset the VM through the i8042"), "{err}");
    assert_eq!(fs::read_to_string(console).unwrap(), "U");
    // The last metrics line was written at exit.
    assert!(fs::read_to_string(&metrics).unwrap().lines().count() >= 2);
    // The socket file stays, as Firecracker leaves it, and nobody listens on it.
    assert!(scratch.path("api.sock").exists());
    assert!(std::os::unix::net::UnixStream::connect(scratch.path("api.sock")).is_err());
}

/// Print `x` on COM1 until a key comes on the i8042, then reset through it: a guest that
/// fills its console as fast as it can until `SendCtrlAltDel`.
const PRINT_UNTIL_KEY_THEN_RESET: [u8; 20] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'x', 0xee, // loop: print x
    0xe4, 0x64, 0xa8, 0x01, 0x74, 0xf7, // in al, 0x64; test al, 1; jz loop
    0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd, // reset through the i8042
];

#[test]
fn a_guest_filling_a_console_nobody_reads_is_paused_measured_and_stopped() {
    let scratch = Scratch::new("stalled-console");
    // The console on stdout, a pipe this test never reads.
    let ember = Ember::start_with_serial(&scratch, "stdio", &[]);
    let kernel = scratch.file("kernel", &tiny_elf(&PRINT_UNTIL_KEY_THEN_RESET));
    let metrics = scratch.path("metrics.json");
    let boot = json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"});
    assert_eq!(ember.put("/boot-source", boot).status, 204);
    assert_eq!(
        ember
            .put("/metrics", json!({"metrics_path": metrics}))
            .status,
        204
    );
    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);

    // Once the pipe and the console's buffer are full, output is dropped and counted.
    let missed = || prometheus_value(&ember.get("/metrics").body, "ember_uart_missed_write_count");
    let deadline = Instant::now() + Duration::from_secs(60);
    while missed() == 0 {
        assert!(
            Instant::now() < deadline,
            "the console never dropped output"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Pause and resume complete at once: no vCPU waits on the console.
    let started = Instant::now();
    assert_eq!(ember.patch("/vm", json!({"state": "Paused"})).status, 204);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ember.get("/").json()["state"], "Paused");
    assert_eq!(ember.patch("/vm", json!({"state": "Resumed"})).status, 204);

    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "FlushMetrics"}))
            .status,
        204
    );
    let text = fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["uart"]["missed_write_count"].as_u64().unwrap() > 0);
    assert!(line["uart"]["write_count"].as_u64().unwrap() > 0);
    assert_eq!(line["logger"]["missed_metrics_count"], 0);

    // The guest stops, and ember exits, with its stdout still unread.
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("bytes of the guest's output"), "{err}");
}

#[test]
fn a_running_drive_takes_a_new_image_and_limits_and_bad_patches_change_nothing() {
    let scratch = Scratch::new("patch");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    let first = scratch.file("first.img", &[0u8; 4096]);
    let second = scratch.file("second.img", &[0u8; 8192]);
    let odd = scratch.file("odd.img", &[0u8; 1000]);
    let response = ember.put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": first, "is_root_device": false}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "InstanceStart"}))
            .status,
        204
    );
    // Adding a drive after the start is refused.
    let response = ember.put(
        "/drives/late",
        json!({"drive_id": "late", "path_on_host": second, "is_root_device": false}),
    );
    assert_eq!(response.status, 400);
    assert!(response.fault().contains("after starting"));

    let response = ember.patch(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": second,
               "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let drive = &ember.get("/vm/config").json()["drives"][0];
    assert_eq!(drive["path_on_host"], json!(second));
    assert_eq!(drive["rate_limiter"]["ops"]["size"], 10);

    let before = ember.get("/vm/config").body;
    for (what, path, body, expected) in [
        (
            "an image that is not whole sectors",
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": odd}),
            "512",
        ),
        (
            "an image that does not exist",
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": scratch.path("missing.img")}),
            "missing.img",
        ),
        (
            "a drive that does not exist",
            "/drives/other",
            json!({"drive_id": "other", "path_on_host": second}),
            "other",
        ),
        (
            "an interface that does not exist",
            "/network-interfaces/eth9",
            json!({"iface_id": "eth9", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}),
            "eth9",
        ),
    ] {
        let response = ember.patch(path, body);
        assert_eq!(response.status, 400, "{what}: {}", response.body);
        assert!(
            response.fault().contains(expected),
            "{what}: {}",
            response.fault()
        );
        assert_eq!(ember.get("/vm/config").body, before, "{what}");
    }
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn put_logger_sends_the_log_to_a_file_with_the_level_asked_for() {
    let scratch = Scratch::new("logger");
    let ember = Ember::start(&scratch, &[]);
    let log = scratch.path("ember.log");
    let response = ember.put(
        "/logger",
        json!({"log_path": log, "level": "Debug", "show_level": true, "show_log_origin": true}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    configure_waiting_guest(&ember, &scratch);
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "InstanceStart"}))
            .status,
        204
    );
    assert_eq!(ember.get("/vm/config").json()["logger"]["level"], "Debug");
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
    let text = fs::read_to_string(&log).unwrap();
    // Debug lines, with their level and origin, went to the file and not to stderr.
    assert!(text.contains("DEBUG"), "{text}");
    assert!(text.contains("Started 1 vCPU(s)"), "{text}");
    assert!(text.contains(".rs:"), "{text}");
    assert!(!err.contains("Started 1 vCPU(s)"), "{err}");
}

#[test]
fn a_config_file_boots_without_api_calls_and_the_api_serves_the_running_vm() {
    let scratch = Scratch::new("config-file");
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    let config = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    let config_path = scratch.file("vm.json", config.to_string().as_bytes());
    let ember = Ember::start(&scratch, &["--config-file", config_path.to_str().unwrap()]);
    assert_eq!(ember.get("/").json()["state"], "Running");
    let served = ember.get("/vm/config").json();
    assert_eq!(served["machine-config"]["mem_size_mib"], 64);
    assert_eq!(served["boot-source"], config["boot-source"]);
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_socket_path_that_exists_is_refused() {
    let scratch = Scratch::new("exists");
    let socket = scratch.file("api.sock", b"");
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--api-sock")
        .arg(&socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains(&*socket.to_string_lossy()), "{err}");
    // The file is left as it was.
    assert!(Path::new(&socket).exists());
}

#[test]
fn the_socket_is_private_under_a_permissive_umask() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("umask");
    let ember = Ember::start_under_umask(&scratch, "000");
    let mode = fs::metadata(&ember.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // The socket serves its owner.
    assert_eq!(ember.get("/").status, 200);
}

/// A connection to `ember`'s socket whose reads give up after 10 s.
fn connect(ember: &Ember) -> UnixStream {
    let stream = UnixStream::connect(&ember.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Sends a request on `stream` and reads its answer.
fn ask(stream: &mut BufReader<UnixStream>, method: &str, path: &str) -> Response {
    stream
        .get_mut()
        .write_all(&encode(method, path, None))
        .unwrap();
    read_response(stream)
}

#[test]
fn idle_connections_cannot_shut_out_a_client_being_served() {
    let scratch = Scratch::new("connection-cap");
    let ember = Ember::start(&scratch, &[]);
    // The connections made while waiting for the socket are gone once the server saw them close.
    std::thread::sleep(Duration::from_millis(200));
    let mut served = BufReader::new(connect(&ember));
    assert_eq!(ask(&mut served, "GET", "/machine-config").status, 200);

    // Nine idle connections take the other slots of the ten.
    let _idle: Vec<UnixStream> = (0..9).map(|_| connect(&ember)).collect();
    let mut extra = BufReader::new(connect(&ember));
    let refused = read_response(&mut extra);
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.fault(),
        "Too many open connections to the API socket."
    );
    let mut rest = Vec::new();
    extra.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // The client already connected is still served, on the same connection.
    for _ in 0..3 {
        assert_eq!(ask(&mut served, "GET", "/machine-config").status, 200);
    }
}

#[test]
fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let scratch = Scratch::new("slowloris");
    let ember = Ember::start(&scratch, &[]);
    let mut slow = connect(&ember);
    slow.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    // One byte every 200 ms of a head that never ends.
    for byte in b"GET /machine-config HTTP/1.1\r\nX-Slow: ".iter().cycle() {
        let mut chunk = [0u8; 512];
        match slow.read(&mut chunk) {
            Ok(0) => break,
            Ok(count) => received.extend_from_slice(&chunk[..count]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("{err}"),
        }
        if !received.is_empty() || slow.write_all(&[*byte]).is_err() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the slow client is still connected"
        );
        // Others are served meanwhile.
        assert_eq!(ember.get("/machine-config").status, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    // The default header timeout is 5 s.
    assert!(started.elapsed() >= Duration::from_secs(5));
    slow.set_nonblocking(false).unwrap();
    // The end of the connection: EOF, or a reset when it closed with a byte of ours unread.
    if let Err(err) = slow.read_to_end(&mut received) {
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
    let response = read_response(&mut BufReader::new(received.as_slice()));
    assert_eq!(response.status, 408);
    assert_eq!(response.header("Connection"), Some("close"));
    assert_eq!(response.fault(), "The request did not arrive in time.");
}

/// Files of every kind a drive cannot be backed by, in `scratch`: (path, what the error says).
fn unusable_drive_files(scratch: &Scratch) -> Vec<(PathBuf, &'static str)> {
    let directory = scratch.path("directory");
    fs::create_dir(&directory).unwrap();
    let fifo = scratch.path("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let socket = scratch.path("socket");
    // The socket file stays when the listener is dropped.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    vec![
        (directory, "is a directory"),
        (fifo, "is a FIFO"),
        (socket, "is a socket"),
        (PathBuf::from("/dev/null"), "is a character device"),
    ]
}

#[test]
fn a_drive_that_is_not_a_file_or_block_device_is_refused_with_a_400() {
    let scratch = Scratch::new("drive-kinds");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    let unusable = unusable_drive_files(&scratch);
    for (path, kind) in &unusable {
        let response = ember.put(
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": path, "is_root_device": false}),
        );
        assert_eq!(response.status, 400, "{}", response.body);
        assert_eq!(
            response.fault(),
            format!(
                "The drive file {} {kind}: a drive must be a regular file or a block device.",
                path.display()
            )
        );
    }
    assert_eq!(ember.get("/vm/config").json()["drives"], json!([]));

    // The same for a new image of a running drive; the FIFO is never opened, so never waited on.
    let image = scratch.file("data.img", &[0u8; 4096]);
    let response = ember.put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": image, "is_root_device": false}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "InstanceStart"}))
            .status,
        204
    );
    for (path, kind) in &unusable {
        let response = ember.patch(
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": path}),
        );
        assert_eq!(response.status, 400, "{}", response.body);
        assert!(response.fault().contains(kind), "{}", response.body);
    }
    let drive = &ember.get("/vm/config").json()["drives"][0];
    assert_eq!(drive["path_on_host"], json!(image));
}

#[test]
fn a_disk_flag_or_config_file_drive_that_is_not_a_file_is_refused() {
    let scratch = Scratch::new("drive-kinds-flags");
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    for (path, kind) in unusable_drive_files(&scratch) {
        let message = format!(
            "The drive file {} {kind}: a drive must be a regular file or a block device.",
            path.display()
        );
        let output = Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg("--kernel")
            .arg(&kernel)
            .arg("--disk")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(&message), "{err}");

        let config = json!({
            "boot-source": {"kernel_image_path": kernel},
            "drives": [{"drive_id": "rootfs", "path_on_host": path, "is_root_device": true}],
        });
        let config_path = scratch.file("vm.json", config.to_string().as_bytes());
        let output = Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg("--config-file")
            .arg(&config_path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(&message), "{err}");
        assert!(err.contains("vm.json"), "{err}");
    }
}

/// Sends `signal` to the `ember` process.
fn send_signal(ember: &Ember, signal: i32) {
    let pid = i32::try_from(ember.child.id()).unwrap();
    // SAFETY: a plain system call; `pid` is our child, which is not yet waited for.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// The lines of the metrics file, after a flush asked for through the API.
fn flushed_metrics_lines(ember: &Ember, metrics: &Path) -> usize {
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "FlushMetrics"}))
            .status,
        204
    );
    fs::read_to_string(metrics).unwrap().lines().count()
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    let scratch = Scratch::new("sigterm");
    let ember = Ember::start(&scratch, &[]);
    let metrics = configure_waiting_guest(&ember, &scratch);
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "InstanceStart"}))
            .status,
        204
    );
    assert_eq!(ember.get("/").json()["state"], "Running");
    let lines = flushed_metrics_lines(&ember, &metrics);
    let socket = ember.socket.clone();

    send_signal(&ember, libc::SIGTERM);
    let (code, err) = ember.wait();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert!(err.contains("ember: stopped by SIGTERM"), "{err}");
    assert!(
        socket.exists(),
        "the API socket is left, as Firecracker leaves it"
    );
    let text = fs::read_to_string(&metrics).unwrap();
    assert_eq!(text.lines().count(), lines + 1, "no final metrics line");
    // The final line is whole JSON.
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(last.is_object());
}

#[test]
fn sigint_before_boot_stops_ember_cleanly() {
    let scratch = Scratch::new("sigint");
    let ember = Ember::start(&scratch, &[]);
    let metrics = scratch.path("metrics.json");
    assert_eq!(
        ember
            .put("/metrics", json!({"metrics_path": metrics}))
            .status,
        204
    );
    let lines = flushed_metrics_lines(&ember, &metrics);
    let socket = ember.socket.clone();

    send_signal(&ember, libc::SIGINT);
    let (code, err) = ember.wait();
    assert_eq!(code, Some(128 + libc::SIGINT), "{err}");
    assert!(err.contains("ember: stopped by SIGINT"), "{err}");
    assert!(
        socket.exists(),
        "the API socket is left, as Firecracker leaves it"
    );
    let text = fs::read_to_string(&metrics).unwrap();
    assert_eq!(text.lines().count(), lines + 1, "no final metrics line");
}

/// CPU seconds the process `pid` has used (user and system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: a plain query of a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / per_second as f64
}

/// The latency of `GET /machine-config` on a kept-alive connection while 10 slowloris clients
/// (one byte every millisecond of a head that never ends, reconnecting when cut off) attack,
/// and whether new connections get in meanwhile. Not a test: a measurement, printed.
///
/// `cargo test -p ember --test api -- --ignored --nocapture api_latency_under_slowloris`;
/// `EMBER_BIN=path` measures another build of `ember`.
#[test]
#[ignore]
fn api_latency_under_slowloris() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let scratch = Scratch::new("measure-slowloris");
    let bin = std::env::var("EMBER_BIN").unwrap_or(env!("CARGO_BIN_EXE_ember").to_string());
    let serial = format!("file:{}", scratch.path("console").display());
    let ember = Ember::spawn(&scratch, &serial, &[], Command::new(bin));
    let mut client = BufReader::new(connect(&ember));
    assert_eq!(ask(&mut client, "GET", "/machine-config").status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let cut_off = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attackers: Vec<_> = (0..10)
        .map(|_| {
            let (socket, stop, cut_off) = (ember.socket.clone(), stop.clone(), cut_off.clone());
            std::thread::spawn(move || {
                let head = b"GET /machine-config HTTP/1.1\r\nX-Slow: ";
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = UnixStream::connect(&socket) else {
                        continue;
                    };
                    let mut sent = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let byte = head.get(sent).copied().unwrap_or(b'a');
                        if stream.write_all(&[byte]).is_err() {
                            cut_off.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        sent += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    // Let the heads grow.
    std::thread::sleep(Duration::from_secs(3));
    let cpu_before = cpu_seconds(ember.child.id());
    let wall = Instant::now();
    let mut latencies = Vec::new();
    let (mut new_served, mut new_refused) = (0, 0);
    for index in 0..200 {
        let asked = Instant::now();
        assert_eq!(ask(&mut client, "GET", "/machine-config").status, 200);
        latencies.push(asked.elapsed());
        if index % 10 == 0 {
            // A newcomer: one request on a new connection.
            let served = UnixStream::connect(&ember.socket).is_ok_and(|mut stream| {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                // Refused: a 503, or the connection closed before the request was written.
                let mut answer = [0u8; 12];
                stream
                    .write_all(&encode("GET", "/machine-config", None))
                    .is_ok()
                    && stream.read_exact(&mut answer).is_ok()
                    && answer.starts_with(b"HTTP/1.1 200")
            });
            if served {
                new_served += 1;
            } else {
                new_refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = cpu_seconds(ember.child.id()) - cpu_before;
    let wall = wall.elapsed();
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().unwrap();
    }
    latencies.sort();
    println!(
        "GET /machine-config over {} requests with 10 slowloris clients: median {:?}, max {:?}; \
         ember used {cpu:.2} CPU s in {:.2} s; newcomers served {new_served}, refused \
         {new_refused}; slowloris connections cut off {}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        wall.as_secs_f64(),
        cut_off.load(Ordering::Relaxed),
    );
}

#[test]
fn sigterm_restores_the_terminal_the_console_put_in_raw_mode() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let scratch = Scratch::new("sigterm-tty");
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: both fd pointers are valid; no name, termios or window size is asked for.
    let opened = unsafe {
        libc::openpty(
            &raw mut controller,
            &raw mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0);
    // SAFETY: both fds were just opened by openpty, and nothing else owns them.
    let (_controller, terminal) = unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    };
    let canonical = |fd: &OwnedFd| {
        // SAFETY: `termios` is plain data, for which all zeroes is a valid value.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a terminal and `termios` a writable termios.
        let got = unsafe { libc::tcgetattr(fd.as_raw_fd(), &raw mut termios) };
        assert_eq!(got, 0);
        termios.c_lflag & libc::ICANON != 0
    };
    assert!(canonical(&terminal));

    let socket = scratch.path("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--api-sock")
        .arg(&socket)
        .arg("--kernel")
        .arg(&kernel)
        .stdin(Stdio::from(terminal.try_clone().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ember = Ember {
        child,
        socket: socket.clone(),
    };
    // Raw once the guest runs with the console on the terminal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while canonical(&terminal) {
        assert!(
            Instant::now() < deadline,
            "the console never took the terminal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    send_signal(&ember, libc::SIGTERM);
    let (code, err) = ember.wait();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert!(canonical(&terminal), "the terminal is left in raw mode");
    assert!(
        socket.exists(),
        "the API socket is left, as Firecracker leaves it"
    );
}

#[test]
fn put_entropy_before_boot_attaches_the_device_and_bad_bodies_change_nothing() {
    let scratch = Scratch::new("entropy");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    assert!(ember.get("/vm/config").json().get("entropy").is_none());

    let before = ember.get("/vm/config").body;
    for (body, expected) in [
        (r#"{"rate":1}"#, "unknown field `rate`"),
        (r#"{"rate_limiter": 5}"#, "invalid type"),
        (
            r#"{"rate_limiter": {"bandwidth": {"size": 1}}}"#,
            "missing field `refill_time`",
        ),
        (
            r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#,
            "refill_time",
        ),
        (r#""x""#, "invalid type"),
    ] {
        let response = ember.raw(&encode("PUT", "/entropy", Some(body)));
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert!(
            response.fault().contains(expected),
            "{body}: {:?} lacks {expected:?}",
            response.fault()
        );
        assert_eq!(ember.get("/vm/config").body, before, "{body}");
    }
    let response = ember.raw(&encode("GET", "/entropy", None));
    assert_eq!(response.status, 400);
    assert_eq!(
        response.fault(),
        "Invalid request method and/or path: GET entropy."
    );

    let limiter = json!({"bandwidth": {"size": 131072, "refill_time": 1000}});
    let response = ember.put("/entropy", json!({"rate_limiter": limiter}));
    assert_eq!(response.status, 204, "{}", response.body);
    // A second PUT replaces the first, as in Firecracker.
    let response = ember.put("/entropy", json!({}));
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(ember.get("/vm/config").json()["entropy"], json!({}));
    let response = ember.put("/entropy", json!({"rate_limiter": limiter}));
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember.get("/vm/config").json()["entropy"]["rate_limiter"],
        limiter
    );

    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);
    // The device is attached: its counters are served.
    let metrics = ember.get("/metrics").body;
    assert_eq!(
        prometheus_value(&metrics, "ember_entropy_activate_fails"),
        0
    );

    let response = ember.put("/entropy", json!({}));
    assert_eq!(response.status, 400);
    assert!(
        response.fault().contains("after starting"),
        "{}",
        response.fault()
    );
    assert_eq!(
        ember.get("/vm/config").json()["entropy"]["rate_limiter"],
        limiter
    );
}

#[test]
fn a_config_file_with_an_entropy_device_boots_with_it() {
    let scratch = Scratch::new("config-entropy");
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    let config = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "entropy": {"rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}},
    });
    let config_path = scratch.file("vm.json", config.to_string().as_bytes());
    let ember = Ember::start(&scratch, &["--config-file", config_path.to_str().unwrap()]);
    assert_eq!(ember.get("/").json()["state"], "Running");
    assert_eq!(ember.get("/vm/config").json()["entropy"], config["entropy"]);
    let metrics = ember.get("/metrics").body;
    assert_eq!(prometheus_value(&metrics, "ember_entropy_entropy_bytes"), 0);
}

#[test]
fn the_balloon_is_configured_patched_and_measured_and_bad_requests_change_nothing() {
    let scratch = Scratch::new("balloon");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    let response = ember.get("/balloon");
    assert_eq!(response.status, 400);
    assert_eq!(response.fault(), "No balloon device found.");
    let response = ember.patch("/balloon", json!({"amount_mib": 1}));
    assert_eq!(response.status, 400);
    assert_eq!(response.fault(), "No balloon device found.");

    // Bad bodies, before there is a balloon: nothing appears.
    for (what, body, expected) in [
        (
            "more than the guest's 128 MiB",
            json!({"amount_mib": 129, "deflate_on_oom": false}),
            "Amount of pages requested is too large.",
        ),
        (
            "free page hinting",
            json!({"amount_mib": 1, "deflate_on_oom": false, "free_page_hinting": true}),
            "hinting",
        ),
        (
            "a missing field",
            json!({"amount_mib": 1}),
            "deflate_on_oom",
        ),
        (
            "an unknown field",
            json!({"amount_mib": 1, "deflate_on_oom": false, "size": 3}),
            "size",
        ),
        (
            "a negative size",
            json!({"amount_mib": -1, "deflate_on_oom": false}),
            "deserializing",
        ),
    ] {
        let response = ember.put("/balloon", body);
        assert_eq!(response.status, 400, "{what}: {}", response.body);
        assert!(
            response.fault().contains(expected),
            "{what}: {}",
            response.fault()
        );
        assert_eq!(ember.get("/balloon").status, 400, "{what}");
    }

    let response = ember.put(
        "/balloon",
        json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember.patch("/balloon", json!({"amount_mib": 8})).status,
        204
    );
    assert_eq!(
        ember.get("/balloon").json(),
        json!({"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 1})
    );
    assert_eq!(ember.get("/vm/config").json()["balloon"]["amount_mib"], 8);
    let response = ember.get("/balloon/statistics");
    assert_eq!(response.status, 400);
    assert!(
        response.fault().contains("before starting"),
        "{}",
        response.fault()
    );

    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "InstanceStart"}))
            .status,
        204
    );
    let response = ember.put(
        "/balloon",
        json!({"amount_mib": 1, "deflate_on_oom": false}),
    );
    assert_eq!(response.status, 400);
    assert!(response.fault().contains("after starting"));

    let before = ember.get("/vm/config").body;
    for (what, path, body, expected) in [
        (
            "a target above the guest's memory",
            "/balloon",
            json!({"amount_mib": 200}),
            "Amount of pages requested is too large.",
        ),
        (
            "a target that is not a number",
            "/balloon",
            json!({"amount_mib": "x"}),
            "deserializing",
        ),
        (
            "statistics turned off",
            "/balloon/statistics",
            json!({"stats_polling_interval_s": 0}),
            "Cannot enable/disable the statistics after boot.",
        ),
        (
            "an interval too long",
            "/balloon/statistics",
            json!({"stats_polling_interval_s": 70000}),
            "deserializing",
        ),
    ] {
        let response = ember.patch(path, body);
        assert_eq!(response.status, 400, "{what}: {}", response.body);
        assert!(
            response.fault().contains(expected),
            "{what}: {}",
            response.fault()
        );
        assert_eq!(ember.get("/vm/config").body, before, "{what}");
    }

    assert_eq!(
        ember.patch("/balloon", json!({"amount_mib": 32})).status,
        204
    );
    let response = ember.patch(
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 2}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember.get("/balloon").json(),
        json!({"amount_mib": 32, "deflate_on_oom": true, "stats_polling_interval_s": 2})
    );
    // This guest has no balloon driver: the target moved, the balloon did not.
    let response = ember.get("/balloon/statistics");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.json(),
        json!({"target_pages": 8192, "actual_pages": 0, "target_mib": 32, "actual_mib": 0})
    );
    let metrics = ember.get("/metrics").body;
    assert!(metrics.contains("balloon_inflate_count"), "{metrics}");

    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn balloon_statistics_are_refused_when_not_enabled_at_boot() {
    let scratch = Scratch::new("balloon-nostats");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    assert_eq!(
        ember
            .put(
                "/balloon",
                json!({"amount_mib": 0, "deflate_on_oom": false})
            )
            .status,
        204
    );
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "InstanceStart"}))
            .status,
        204
    );
    for response in [
        ember.get("/balloon/statistics"),
        ember.patch(
            "/balloon/statistics",
            json!({"stats_polling_interval_s": 1}),
        ),
    ] {
        assert_eq!(response.status, 400, "{}", response.body);
        assert_eq!(
            response.fault(),
            "Statistics for the balloon device are not enabled"
        );
    }
    assert_eq!(
        ember.get("/balloon").json(),
        json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 0})
    );
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn the_mmds_store_is_put_patched_and_read_and_bad_bodies_change_nothing() {
    let scratch = Scratch::new("mmds");
    let ember = Ember::start(&scratch, &["--mmds-size-limit", "200"]);
    // Before any PUT, Firecracker answers an empty object, and a PATCH is refused.
    let response = ember.get("/mmds");
    assert_eq!((response.status, response.json()), (200, json!({})));
    let response = ember.patch("/mmds", json!({"a": "b"}));
    assert_eq!(response.status, 400);
    assert_eq!(response.fault(), "The MMDS data store is not initialized.");
    assert_eq!(ember.get("/mmds").json(), json!({}));

    let store = json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "old": "x"}}});
    let response = ember.put("/mmds", store.clone());
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(ember.get("/mmds").json(), store);
    let response = ember.patch(
        "/mmds",
        json!({"latest": {"meta-data": {"old": null, "tags": ["a", "b"]}, "user-data": "u"}}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let patched = json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "tags": ["a", "b"]},
                                    "user-data": "u"}});
    assert_eq!(ember.get("/mmds").json(), patched);

    // Past the store's limit: 413, as Firecracker answers, and nothing changes.
    let big = json!({"big": "x".repeat(200)});
    for response in [ember.put("/mmds", big.clone()), ember.patch("/mmds", big)] {
        assert_eq!(response.status, 413, "{}", response.body);
        assert_eq!(response.fault(), "The MMDS patch request doesn't fit.");
    }
    // Bodies that are not JSON.
    for (method, body, fault) in [
        (
            "PUT",
            "{",
            "An error occurred when deserializing the json body",
        ),
        (
            "PATCH",
            "[1,",
            "An error occurred when deserializing the json body",
        ),
        ("PUT", "", "Empty PUT request."),
        ("PATCH", "", "Empty PATCH request."),
    ] {
        let response = ember.raw(&encode(method, "/mmds", Some(body)));
        assert_eq!(response.status, 400, "{method} {body:?}");
        assert!(response.fault().starts_with(fault), "{}", response.body);
    }
    assert_eq!(ember.get("/mmds").json(), patched);
    let response = ember.raw(&encode("GET", "/mmds", Some("{}")));
    assert_eq!(response.fault(), "GET request cannot have a body.");
}

#[test]
fn mmds_config_is_checked_recorded_and_refused_after_boot() {
    let scratch = Scratch::new("mmds-config");
    let ember = Ember::start(&scratch, &[]);
    // The interfaces must have been put first.
    let response = ember.put("/mmds/config", json!({"network_interfaces": ["eth0"]}));
    assert_eq!(response.status, 400);
    assert_eq!(
        response.fault(),
        "The list of network interface IDs provided contains at least one ID that does not \
         correspond to any existing network interface."
    );
    let response = ember.put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let response = ember.put(
        "/mmds/config",
        json!({"network_interfaces": ["eth0"], "version": "V2"}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let recorded = json!({"version": "V2", "network_interfaces": ["eth0"],
                          "ipv4_address": "169.254.169.254", "imds_compat": false});
    assert_eq!(ember.get("/vm/config").json()["mmds-config"], recorded);

    for (body, fault) in [
        (
            json!({"network_interfaces": []}),
            "The list of network interface IDs that allow forwarding MMDS requests is empty.",
        ),
        (
            json!({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}),
            "The MMDS IPv4 address is not link local.",
        ),
        (
            json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.255.3"}),
            "The MMDS IPv4 address is not link local.",
        ),
        (
            json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.1"}),
            "An error occurred when deserializing the json body of a request: invalid IPv4",
        ),
        (
            json!({"network_interfaces": ["eth0"], "version": "V3"}),
            "An error occurred when deserializing the json body of a request: unknown variant",
        ),
        (
            json!({"version": "V1"}),
            "An error occurred when deserializing the json body of a request: missing field",
        ),
        (
            json!({"network_interfaces": ["eth0"], "ipv6_address": "::1"}),
            "An error occurred when deserializing the json body of a request: unknown field",
        ),
        (
            json!({"network_interfaces": ["eth0", "eth9"]}),
            "The list of network interface IDs provided contains at least one ID",
        ),
    ] {
        let response = ember.put("/mmds/config", body.clone());
        assert_eq!(response.status, 400, "{body}");
        assert!(
            response.fault().starts_with(fault),
            "{body}: {}",
            response.body
        );
    }
    assert_eq!(ember.get("/vm/config").json()["mmds-config"], recorded);
    let response = ember.put(
        "/mmds/config",
        json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2",
               "imds_compat": true}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let config = ember.get("/vm/config").json();
    assert_eq!(config["mmds-config"]["ipv4_address"], "169.254.170.2");
    assert_eq!(config["mmds-config"]["version"], "V1");

    // After boot the configuration is refused and the store still served. (A microVM of its
    // own, without a network interface: booting one would open a TAP device.)
    let booted = Scratch::new("mmds-booted");
    let ember = Ember::start(&booted, &[]);
    configure_waiting_guest(&ember, &booted);
    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);
    let response = ember.put("/mmds/config", json!({"network_interfaces": ["eth0"]}));
    assert_eq!(response.status, 400);
    assert_eq!(
        response.fault(),
        "The requested operation is not supported after starting the microVM."
    );
    assert_eq!(ember.put("/mmds", json!({"a": "b"})).status, 204);
    assert_eq!(ember.patch("/mmds", json!({"c": "d"})).status, 204);
    assert_eq!(ember.get("/mmds").json(), json!({"a": "b", "c": "d"}));
    assert!(ember.get("/vm/config").json().get("mmds-config").is_none());
}

#[test]
fn a_config_file_s_mmds_config_must_name_its_interfaces() {
    let scratch = Scratch::new("config-mmds");
    let config = json!({
        "boot-source": {"kernel_image_path": "/nonexistent/vmlinux"},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "mmds-config": {"network_interfaces": ["eth1"]},
    });
    let config_path = scratch.file("vm.json", config.to_string().as_bytes());
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--no-api", "--serial", "none", "--config-file"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("does not correspond to any existing network interface"),
        "{err}"
    );
}

#[test]
fn metadata_fills_the_store_that_get_mmds_answers() {
    let scratch = Scratch::new("metadata");
    let metadata = json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}});
    let path = scratch.file("metadata.json", metadata.to_string().as_bytes());
    let ember = Ember::start(&scratch, &["--metadata", path.to_str().unwrap()]);
    assert_eq!(ember.get("/mmds").json(), metadata);
    let response = ember.patch(
        "/mmds",
        json!({"latest": {"meta-data": {"instance-id": "i-1"}}}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember.get("/mmds").json()["latest"]["meta-data"]["instance-id"],
        "i-1"
    );
}

#[test]
fn put_vsock_before_boot_binds_its_socket_at_start_and_bad_bodies_change_nothing() {
    use std::os::unix::fs::FileTypeExt;

    let scratch = Scratch::new("vsock");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    assert!(ember.get("/vm/config").json().get("vsock").is_none());
    let uds = scratch.path("v.sock");
    let taken = scratch.file("taken", b"");

    let before = ember.get("/vm/config").body;
    let long = "p".repeat(108);
    for (body, expected) in [
        (
            r#"{"guest_cid": 3}"#.to_string(),
            "missing field `uds_path`",
        ),
        (
            r#"{"uds_path": "/v"}"#.to_string(),
            "missing field `guest_cid`",
        ),
        (
            r#"{"guest_cid": 3, "uds_path": "/v", "cid": 3}"#.to_string(),
            "unknown field `cid`",
        ),
        (
            r#"{"guest_cid": -1, "uds_path": "/v"}"#.to_string(),
            "invalid value",
        ),
        (
            r#"{"guest_cid": 2, "uds_path": "/v"}"#.to_string(),
            "The guest_cid 2 is reserved",
        ),
        (
            r#"{"guest_cid": 4294967295, "uds_path": "/v"}"#.to_string(),
            "The guest_cid 4294967295 is reserved",
        ),
        (
            r#"{"guest_cid": 3, "uds_path": ""}"#.to_string(),
            "The uds_path must be the path of a Unix socket",
        ),
        (
            format!(r#"{{"guest_cid": 3, "uds_path": "{long}"}}"#),
            "The uds_path must be the path of a Unix socket",
        ),
        (
            json!({"guest_cid": 3, "uds_path": taken}).to_string(),
            "Cannot create backend for vsock device: the uds_path",
        ),
        (r#""x""#.to_string(), "invalid type"),
    ] {
        let response = ember.raw(&encode("PUT", "/vsock", Some(&body)));
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert!(
            response.fault().contains(expected),
            "{body}: {:?} lacks {expected:?}",
            response.fault()
        );
        assert_eq!(ember.get("/vm/config").body, before, "{body}");
    }
    let response = ember.raw(&encode("GET", "/vsock", None));
    assert_eq!(response.status, 400);
    assert_eq!(
        response.fault(),
        "Invalid request method and/or path: GET vsock."
    );

    // Firecracker's deprecated vsock_id is accepted and dropped; a second PUT replaces the
    // first, as in Firecracker.
    let response = ember.put(
        "/vsock",
        json!({"vsock_id": "vsock0", "guest_cid": 7, "uds_path": scratch.path("old.sock")}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let response = ember.put("/vsock", json!({"guest_cid": 3, "uds_path": uds}));
    assert_eq!(response.status, 204, "{}", response.body);
    assert_eq!(
        ember.get("/vm/config").json()["vsock"],
        json!({"guest_cid": 3, "uds_path": uds})
    );
    // Nothing is bound before the microVM starts.
    assert!(!uds.exists() && !scratch.path("old.sock").exists());

    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);
    let kind = fs::symlink_metadata(&uds).unwrap().file_type();
    assert!(kind.is_socket(), "{kind:?}");
    assert!(UnixStream::connect(&uds).is_ok());
    let metrics = ember.get("/metrics").body;
    assert_eq!(prometheus_value(&metrics, "ember_vsock_activate_fails"), 0);
    assert_eq!(prometheus_value(&metrics, "ember_vsock_conns_added"), 0);

    let response = ember.put("/vsock", json!({"guest_cid": 4, "uds_path": uds}));
    assert_eq!(response.status, 400);
    assert!(
        response.fault().contains("after starting"),
        "{}",
        response.fault()
    );
    assert_eq!(ember.get("/vm/config").json()["vsock"]["guest_cid"], 3);
}

#[test]
fn a_vsock_path_taken_before_the_start_fails_it_clearly_and_changes_nothing() {
    let scratch = Scratch::new("vsock-taken");
    let ember = Ember::start(&scratch, &[]);
    configure_waiting_guest(&ember, &scratch);
    let uds = scratch.path("v.sock");
    let response = ember.put("/vsock", json!({"guest_cid": 3, "uds_path": uds}));
    assert_eq!(response.status, 204, "{}", response.body);
    fs::write(&uds, b"not a socket").unwrap();

    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 400, "{}", response.body);
    let fault = response.fault();
    assert!(
        fault.starts_with("Cannot create the vsock device: Cannot bind the vsock Unix socket at")
            && fault.contains(&*uds.to_string_lossy()),
        "{fault}"
    );
    assert_eq!(ember.get("/").json()["state"], "Not started");
    // What was in the way is left as it was.
    assert_eq!(fs::read(&uds).unwrap(), b"not a socket");

    // Once the path is free, the same description starts.
    fs::remove_file(&uds).unwrap();
    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);
    assert!(UnixStream::connect(&uds).is_ok());
}

#[test]
fn a_config_file_with_a_vsock_device_boots_with_it() {
    let scratch = Scratch::new("config-vsock");
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    let uds = scratch.path("v.sock");
    let config = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "vsock": {"vsock_id": "vsock0", "guest_cid": 42, "uds_path": uds},
    });
    let config_path = scratch.file("vm.json", config.to_string().as_bytes());
    let ember = Ember::start(&scratch, &["--config-file", config_path.to_str().unwrap()]);
    assert_eq!(ember.get("/").json()["state"], "Running");
    assert_eq!(
        ember.get("/vm/config").json()["vsock"],
        json!({"guest_cid": 42, "uds_path": uds})
    );
    assert!(UnixStream::connect(&uds).is_ok());
    let metrics = ember.get("/metrics").body;
    assert_eq!(prometheus_value(&metrics, "ember_vsock_rx_bytes_count"), 0);
    assert_eq!(
        ember
            .put("/actions", json!({"action_type": "SendCtrlAltDel"}))
            .status,
        204
    );
    let (code, err) = ember.wait();
    assert_eq!(code, Some(0), "{err}");
    // The device removes its socket when it goes.
    assert!(!uds.exists());
}

#[test]
fn a_config_file_whose_vsock_path_exists_is_refused() {
    let scratch = Scratch::new("config-vsock-taken");
    let kernel = scratch.file("kernel", &tiny_elf(&WAIT_FOR_KEY_THEN_RESET));
    let uds = scratch.file("v.sock", b"");
    let config = json!({
        "boot-source": {"kernel_image_path": kernel},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let config_path = scratch.file("vm.json", config.to_string().as_bytes());
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Cannot create backend for vsock device: the uds_path"),
        "{err}"
    );
    assert_eq!(fs::read(&uds).unwrap(), b"");
}
