//! Firecracker's command line and the answers its client libraries depend on, against a real
//! `ember` process: each flag's effect, `FlushMetrics` without metrics, the API socket left on
//! exit and the refusal of one in use.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

mod common;
use common::{Scratch, wait_for_api};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

/// A running `ember --api-sock SOCKET ARGS`, killed when dropped.
struct Ember {
    child: Option<Child>,
    socket: PathBuf,
}

impl Ember {
    fn start(scratch: &Scratch, args: &[&str]) -> Self {
        let socket = scratch.path("api.sock");
        let child = Command::new(EMBER)
            .arg("--api-sock")
            .arg(&socket)
            .args(["--serial", "none"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ember = Ember {
            child: Some(child),
            socket,
        };
        wait_for_api(ember.child.as_mut().unwrap(), &ember.socket);
        ember
    }

    /// Sends one request, with `Connection: close`, and returns the status and body.
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let body = body.unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // The server may close the connection before it read a body it refuses.
        let _ = stream.write_all(request.as_bytes());
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        (status, body)
    }

    fn put(&self, path: &str, body: &Value) -> (u16, String) {
        self.request("PUT", path, Some(&body.to_string()))
    }

    /// Stops ember with SIGTERM and returns its exit status and standard error.
    fn stop(&mut self) -> (Option<i32>, String) {
        let child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: a plain system call on our child, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let output = child.wait_with_output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(EMBER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn fault(body: &str) -> String {
    let value: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    value["fault_message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn flush_metrics_without_a_metrics_file_is_204_as_in_firecracker() {
    let scratch = Scratch::new("flush");
    let mut ember = Ember::start(&scratch, &[]);
    let (status, body) = ember.put("/actions", &json!({"action_type": "FlushMetrics"}));
    assert_eq!(status, 204, "{body}");
    // Nothing was configured by it: metrics can still be set up.
    let metrics = scratch.arg("metrics.json");
    let (status, body) = ember.put("/metrics", &json!({"metrics_path": metrics}));
    assert_eq!(status, 204, "{body}");
    let (status, _) = ember.put("/actions", &json!({"action_type": "FlushMetrics"}));
    assert_eq!(status, 204);
    assert!(!fs::read_to_string(&metrics).unwrap().is_empty());
    ember.stop();
}

#[test]
fn the_api_socket_is_left_on_exit_and_a_dead_one_is_reused() {
    let scratch = Scratch::new("socket-left");
    let mut ember = Ember::start(&scratch, &[]);
    let socket = ember.socket.clone();
    let (code, err) = ember.stop();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    // Left, as Firecracker leaves it; client libraries remove it themselves.
    assert!(socket.exists(), "the socket file was removed");
    assert!(
        UnixStream::connect(&socket).is_err(),
        "someone still listens"
    );
    // A dead socket does not keep the next instance (a jail's ID reused) from starting.
    let mut again = Ember::start(&scratch, &[]);
    assert_eq!(again.request("GET", "/", None).0, 200);
    again.stop();
}

#[test]
fn a_socket_in_use_is_refused_with_firecrackers_message() {
    let scratch = Scratch::new("socket-used");
    let socket = scratch.path("api.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let output = run(&["--api-sock", socket.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    let message = format!(
        "Failed to open the API socket at: {}. Check that it is not already used.",
        socket.display()
    );
    assert!(err.contains(&message), "{err}");
    // So is a file that is not a socket, which is left as it was.
    let file = scratch.path("file");
    fs::write(&file, b"x").unwrap();
    let output = run(&["--api-sock", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Failed to open the API socket at"));
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn log_path_level_and_show_log_origin_send_the_log_to_a_file_from_the_start() {
    let scratch = Scratch::new("log-path");
    let log = scratch.path("ember.log");
    fs::write(&log, b"").unwrap();
    let mut ember = Ember::start(
        &scratch,
        &[
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Debug",
            "--show-level",
            "--show-log-origin",
        ],
    );
    assert_eq!(ember.request("GET", "/", None).0, 200);
    let (_, err) = ember.stop();
    let text = fs::read_to_string(&log).unwrap();
    // The API's start is logged there, at Info, with its origin.
    let line = text
        .lines()
        .find(|line| line.contains("API server listening") && line.contains(" us ("))
        .unwrap_or_else(|| panic!("not in the log file: {text}\nstderr: {err}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains(".rs:"), "no origin: {line}");
    // Debug lines too.
    assert!(text.contains("DEBUG"), "{text}");
    assert!(!err.contains("API server listening"), "{err}");
}

#[test]
fn level_off_silences_the_log_and_lowercase_levels_are_refused_as_by_firecracker() {
    let scratch = Scratch::new("level");
    let mut ember = Ember::start(&scratch, &["--level", "OFF"]);
    let (_, err) = ember.stop();
    assert!(!err.contains("API server listening"), "{err}");
    let output = run(&["--level", "info"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--level"));
}

#[test]
fn metrics_path_writes_metrics_from_the_start_and_put_metrics_is_then_refused() {
    let scratch = Scratch::new("metrics-path");
    let metrics = scratch.arg("metrics.json");
    let mut ember = Ember::start(&scratch, &["--metrics-path", &metrics]);
    let (status, _) = ember.put("/actions", &json!({"action_type": "FlushMetrics"}));
    assert_eq!(status, 204);
    let text = fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["api_server"].is_object(), "{line}");
    let other = scratch.arg("other.json");
    let (status, body) = ember.put("/metrics", &json!({"metrics_path": other}));
    assert_eq!(status, 400);
    assert_eq!(fault(&body), "Reinitialization of metrics not allowed.");
    ember.stop();
}

#[test]
fn http_api_max_payload_size_bounds_request_bodies() {
    let scratch = Scratch::new("payload");
    let mut ember = Ember::start(&scratch, &["--http-api-max-payload-size", "64"]);
    let small = json!({"vcpu_count": 2, "mem_size_mib": 256}).to_string();
    assert!(small.len() <= 64);
    assert_eq!(ember.request("PUT", "/machine-config", Some(&small)).0, 204);
    let big = json!({"kernel_image_path": "k".repeat(100)}).to_string();
    let (status, body) = ember.request("PUT", "/boot-source", Some(&big));
    assert_eq!(status, 400, "{body}");
    assert!(
        fault(&body).contains(&format!(
            "Request payload with size {} is larger than the limit of 64 allowed by server.",
            big.len()
        )),
        "{body}"
    );
    let (_, config) = ember.request("GET", "/vm/config", None);
    let config: Value = serde_json::from_str(&config).unwrap();
    assert!(config["boot-source"].is_null(), "{config}");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    ember.stop();

    // The default is Firecracker's 51200 bytes.
    let mut ember = Ember::start(&scratch, &[]);
    let big = json!({"kernel_image_path": "k".repeat(51_200)}).to_string();
    let (status, body) = ember.request("PUT", "/boot-source", Some(&big));
    assert_eq!(status, 400);
    assert!(fault(&body).contains("limit of 51200"), "{body}");
    ember.stop();
}

#[test]
fn metadata_is_checked_against_the_mmds_size_limit() {
    let scratch = Scratch::new("metadata");
    let metadata = scratch.path("metadata.json");
    fs::write(
        &metadata,
        br#"{"latest": {"meta-data": {"ami-id": "ami-12345678"}}}"#,
    )
    .unwrap();
    let path = metadata.to_str().unwrap();
    // Accepted, and served by GET /mmds.
    let mut ember = Ember::start(&scratch, &["--metadata", path]);
    let (status, body) = ember.request("GET", "/mmds", None);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}})
    );
    ember.stop();
    // Too large for the limit, which defaults to the payload limit.
    for args in [
        &["--metadata", path, "--mmds-size-limit", "10"][..],
        &["--metadata", path, "--http-api-max-payload-size", "10"],
    ] {
        let output = run(&[&["--api-sock", &scratch.arg("x.sock")][..], args].concat());
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains("MMDS size limit of 10 bytes"), "{err}");
    }
    // Not JSON.
    fs::write(&metadata, b"{not json").unwrap();
    let output = run(&["--api-sock", &scratch.arg("y.sock"), "--metadata", path]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Invalid metadata file"));
}

#[test]
fn version_prints_the_version_in_firecrackers_shape() {
    let output = run(&["--version"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("ember v{}\n\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_unknown_flag_or_a_bad_id_is_a_clear_error() {
    let output = run(&["--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("unexpected argument '--no-such-flag'"),
        "{err}"
    );
    let output = run(&["--id", "has_underscore"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Invalid instance ID"));
}

#[test]
fn the_instance_id_is_what_get_reports() {
    let scratch = Scratch::new("id");
    let mut ember = Ember::start(&scratch, &["--id", "vm-7"]);
    let (status, body) = ember.request("GET", "/", None);
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["id"], "vm-7");
    ember.stop();
}

#[test]
fn metrics_from_the_flag_and_the_configuration_file_both_are_refused() {
    let scratch = Scratch::new("metrics-twice");
    let config = scratch.path("vm.json");
    let body = json!({
        "boot-source": {"kernel_image_path": scratch.arg("vmlinux")},
        "metrics": {"metrics_path": scratch.arg("a.json")},
    });
    fs::write(&config, body.to_string()).unwrap();
    let output = run(&[
        "--config-file",
        config.to_str().unwrap(),
        "--metrics-path",
        &scratch.arg("b.json"),
        "--no-api",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("Reinitialization of metrics not allowed."),
        "{err}"
    );
}

#[test]
fn a_boot_source_that_cannot_be_opened_is_refused_at_the_put() {
    let scratch = Scratch::new("boot-source");
    let mut ember = Ember::start(&scratch, &[]);
    let missing = scratch.arg("no-vmlinux");
    let (status, body) = ember.put("/boot-source", &json!({"kernel_image_path": missing}));
    assert_eq!(status, 400);
    assert!(
        fault(&body).starts_with("The kernel file cannot be opened: No such file"),
        "{body}"
    );
    let kernel = scratch.path("vmlinux");
    fs::write(&kernel, b"not run").unwrap();
    let (status, body) = ember.put(
        "/boot-source",
        &json!({"kernel_image_path": kernel, "initrd_path": scratch.arg("no-initrd")}),
    );
    assert_eq!(status, 400);
    assert!(
        fault(&body).starts_with("The initrd file cannot be opened"),
        "{body}"
    );
    // Nothing was recorded.
    let (_, config) = ember.request("GET", "/vm/config", None);
    let config: Value = serde_json::from_str(&config).unwrap();
    assert!(config["boot-source"].is_null(), "{config}");
    let (status, _) = ember.put("/boot-source", &json!({"kernel_image_path": kernel}));
    assert_eq!(status, 204);
    ember.stop();
}
