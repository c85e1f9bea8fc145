//! The API targets: bytes a client sends on the API socket, and a configuration file.

use ember_vmm::api::http::{self, HttpError, MAX_REQUEST_LEN, Response, StatusCode};
use ember_vmm::api::model::FullVmConfiguration;
use ember_vmm::api::routes::{self, ApiResponse};

/// What the API target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiOutcome {
    /// Requests the HTTP codec parsed, one after the other.
    pub requests: usize,
    /// Those that routed to an API request.
    pub routed: usize,
    /// The status of the error that ended the connection, if the codec refused the bytes.
    pub http_error: Option<u16>,
}

/// Serves `data` as the bytes a client sent on one connection: [`http::parse_request`] over
/// the buffer, as the server does with pipelined requests, and every request parsed through
/// [`routes::parse`].
///
/// A parsed request must have taken at least one byte and no more than the buffer holds and
/// [`MAX_REQUEST_LEN`], and parse the same from exactly the bytes it took; every error, of the
/// codec or of the routes, must encode as a response with its status, a `Content-Length` of its
/// body and a JSON `fault_message`.
///
/// # Panics
///
/// Only on a finding.
pub fn api_request(data: &[u8]) -> ApiOutcome {
    let mut outcome = ApiOutcome::default();
    let mut rest = data;
    loop {
        let (request, consumed) = match http::parse_request(rest) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => break,
            Err(err) => {
                check_http_error(&err);
                outcome.http_error = Some(err.status().code());
                break;
            }
        };
        assert!(consumed > 0, "a request of no bytes: {request:?}");
        assert!(
            consumed <= rest.len() && consumed <= MAX_REQUEST_LEN,
            "{consumed} bytes taken of {}",
            rest.len()
        );
        let again = http::parse_request(&rest[..consumed]);
        assert_eq!(
            again,
            Ok(Some((request.clone(), consumed))),
            "a request parses differently from the bytes it took"
        );
        outcome.requests += 1;
        match routes::parse(&request.method, &request.path, &request.body) {
            Ok(_) => outcome.routed += 1,
            Err(err) => {
                let status = err.status();
                check_fault(&ApiResponse::from(err).to_http(), status);
            }
        }
        rest = &rest[consumed..];
    }
    outcome
}

/// Checks the response the server sends for a codec error.
fn check_http_error(err: &HttpError) {
    let response = ApiResponse::fault(err.status(), err.to_string()).to_http();
    check_fault(&response, err.status());
}

/// Checks that `response` is a fault of `status` that encodes as HTTP with its body.
fn check_fault(response: &Response, status: StatusCode) {
    assert_eq!(response.status, status);
    assert_ne!(status, StatusCode::NoContent, "an error without a body");
    let body: serde_json::Value = serde_json::from_slice(&response.body).expect("a fault is JSON");
    assert!(
        body.get("fault_message").is_some_and(|m| m.is_string()),
        "a fault without a message: {body}"
    );
    for keep_alive in [false, true] {
        let bytes = response.encode(keep_alive);
        let status_line = format!("HTTP/1.1 {} ", status.code());
        assert!(bytes.starts_with(status_line.as_bytes()), "status line");
        let head_len = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("the head ends with an empty line")
            + 4;
        let head = std::str::from_utf8(&bytes[..head_len]).expect("the head is text");
        let length = format!("\r\nContent-Length: {}\r\n", response.body.len());
        assert!(head.contains(&length), "no Content-Length in {head:?}");
        assert_eq!(&bytes[head_len..], response.body.as_slice(), "the body");
    }
}

/// What the configuration file target made of an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// The bytes are not a JSON configuration ember reads.
    Unparsed,
    /// The configuration parsed, and `validate` refused it.
    Invalid,
    /// The configuration parsed and is valid.
    Valid,
}

/// Reads `data` as a configuration file (`--config-file`): a [`FullVmConfiguration`] that is
/// then validated.
///
/// A valid configuration must serialize, and parse back to the same value, which is valid too:
/// `GET /vm/config` writes what a configuration file reads.
///
/// # Panics
///
/// Only on a finding.
pub fn config_file(data: &[u8]) -> ConfigOutcome {
    let Ok(config) = serde_json::from_slice::<FullVmConfiguration>(data) else {
        return ConfigOutcome::Unparsed;
    };
    if config.validate().is_err() {
        return ConfigOutcome::Invalid;
    }
    let json = serde_json::to_vec(&config).expect("a configuration serializes");
    let again: FullVmConfiguration = serde_json::from_slice(&json).unwrap_or_else(|err| {
        panic!(
            "a valid configuration does not read back: {err}: {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, config, "the configuration changes through JSON");
    again
        .validate()
        .expect("a valid configuration is valid once read back");
    ConfigOutcome::Valid
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, corpus_dir, replay};

    const fn api(requests: usize, routed: usize, http_error: Option<u16>) -> ApiOutcome {
        ApiOutcome {
            requests,
            routed,
            http_error,
        }
    }

    /// The API target's seeds and what it makes of them.
    const API_SEEDS: &[(&str, ApiOutcome)] = &[
        ("get-machine-config", api(1, 1, None)),
        ("put-boot-source", api(1, 1, None)),
        ("pipelined", api(3, 3, None)),
        ("absolute-form", api(1, 1, None)),
        ("unknown-path", api(1, 0, None)),
        ("bad-body", api(1, 0, None)),
        ("incomplete-body", api(0, 0, None)),
        ("chunked", api(0, 0, Some(501))),
        ("payload-too-large", api(0, 0, Some(400))),
        ("bare-lf", api(0, 0, Some(400))),
        ("http2", api(0, 0, Some(505))),
        ("expect-continue", api(1, 1, None)),
        ("then-garbage", api(1, 1, Some(400))),
        ("put-vsock", api(1, 1, None)),
        ("put-vsock-reserved-cid", api(1, 0, None)),
    ];

    /// A request with a JSON body.
    fn with_body(method: &str, path: &str, body: &str) -> String {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn api_seeds() -> Seeds {
        let get = "GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let boot = with_body(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 reboot=k"}"#,
        );
        let pipelined = [
            with_body("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
            with_body(
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": true, "is_read_only": false}"#,
            ),
            with_body("PATCH", "/vm", r#"{"state": "Paused"}"#),
        ]
        .concat();
        let text = |s: &str| s.as_bytes().to_vec();
        vec![
            ("get-machine-config", text(get)),
            ("put-boot-source", text(&boot)),
            ("pipelined", text(&pipelined)),
            (
                "absolute-form",
                text("GET http://localhost/version?x=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            ),
            ("unknown-path", text("GET /no-such-path HTTP/1.1\r\n\r\n")),
            (
                "bad-body",
                text(&with_body(
                    "PUT",
                    "/machine-config",
                    r#"{"vcpu_count": "two"}"#,
                )),
            ),
            (
                "incomplete-body",
                text("PUT /actions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"action_type\""),
            ),
            (
                "chunked",
                text("PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            ),
            (
                "payload-too-large",
                text("PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n"),
            ),
            ("bare-lf", text("GET / HTTP/1.1\nHost: x\n\n")),
            ("http2", text("GET / HTTP/2.0\r\n\r\n")),
            (
                "expect-continue",
                text(
                    &with_body("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).replacen(
                        "\r\n\r\n",
                        "\r\nExpect: 100-continue\r\n\r\n",
                        1,
                    ),
                ),
            ),
            ("then-garbage", text(&format!("{get}\x01\x02\r\n\r\n"))),
            (
                "put-vsock",
                text(&with_body(
                    "PUT",
                    "/vsock",
                    r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/v.sock"}"#,
                )),
            ),
            (
                "put-vsock-reserved-cid",
                text(&with_body(
                    "PUT",
                    "/vsock",
                    r#"{"guest_cid": 2, "uds_path": "/v.sock"}"#,
                )),
            ),
        ]
    }

    /// The configuration file target's seeds and what it makes of them.
    const CONFIG_SEEDS: &[(&str, ConfigOutcome)] = &[
        ("full", ConfigOutcome::Valid),
        ("minimal", ConfigOutcome::Valid),
        ("empty-object", ConfigOutcome::Valid),
        ("unsupported-null", ConfigOutcome::Valid),
        ("balloon", ConfigOutcome::Valid),
        ("vsock", ConfigOutcome::Valid),
        ("vsock-empty-path", ConfigOutcome::Invalid),
        ("unknown-key", ConfigOutcome::Unparsed),
        ("duplicate-drive", ConfigOutcome::Invalid),
        ("two-root-devices", ConfigOutcome::Invalid),
        ("zero-vcpus", ConfigOutcome::Invalid),
        ("not-json", ConfigOutcome::Unparsed),
    ];

    fn config_seeds() -> Seeds {
        let text = |s: &str| s.as_bytes().to_vec();
        let drive = |id: &str, root: bool| {
            format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{id}.img", "is_root_device": {root}, "is_read_only": false}}"#
            )
        };
        let full = format!(
            r#"{{
  "boot-source": {{"kernel_image_path": "vmlinux", "initrd_path": "initrd.img", "boot_args": "console=ttyS0 reboot=k panic=1"}},
  "drives": [{}, {}],
  "machine-config": {{"vcpu_count": 2, "mem_size_mib": 512, "smt": false}},
  "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
    "rx_rate_limiter": {{"bandwidth": {{"size": 1000000, "refill_time": 100}}, "ops": {{"size": 100, "refill_time": 1000}}}}}}],
  "logger": {{"log_path": "ember.log", "level": "Info", "show_level": true}},
  "metrics": {{"metrics_path": "metrics.json"}}
}}"#,
            drive("rootfs", true),
            drive("data", false)
        );
        vec![
            ("full", text(&full)),
            (
                "minimal",
                text(r#"{"boot-source": {"kernel_image_path": "vmlinux"}}"#),
            ),
            ("empty-object", text("{}")),
            (
                "unsupported-null",
                text(r#"{"balloon": null, "vsock": null, "pmem": [], "mmds-config": null}"#),
            ),
            (
                "balloon",
                text(
                    r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false, "stats_polling_interval_s": 1}}"#,
                ),
            ),
            (
                "vsock",
                text(r#"{"vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#),
            ),
            (
                "vsock-empty-path",
                text(r#"{"vsock": {"guest_cid": 3, "uds_path": ""}}"#),
            ),
            ("unknown-key", text(r#"{"drivez": []}"#)),
            (
                "duplicate-drive",
                text(&format!(
                    r#"{{"drives": [{}, {}]}}"#,
                    drive("a", false),
                    drive("a", false)
                )),
            ),
            (
                "two-root-devices",
                text(&format!(
                    r#"{{"drives": [{}, {}]}}"#,
                    drive("a", true),
                    drive("b", true)
                )),
            ),
            (
                "zero-vcpus",
                text(r#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#),
            ),
            ("not-json", text("{\"boot-source\": ")),
        ]
    }

    /// Each target's seeds, by target.
    fn all_seeds() -> [(&'static str, Seeds); 2] {
        [
            ("api_request", api_seeds()),
            ("config_file", config_seeds()),
        ]
    }

    #[test]
    fn api_request_corpus_replays() {
        replay("api_request", API_SEEDS, api_request);
    }

    #[test]
    fn config_file_corpus_replays() {
        replay("config_file", CONFIG_SEEDS, config_file);
    }

    #[test]
    fn api_seeds_on_disk_are_the_generated_ones() {
        crate::tests::check_seeds(&all_seeds());
    }

    #[test]
    fn every_prefix_of_a_pipelined_request_parses_or_waits() {
        let (_, data) = api_seeds()
            .into_iter()
            .find(|(name, _)| *name == "pipelined")
            .unwrap();
        for len in 0..=data.len() {
            let outcome = api_request(&data[..len]);
            assert_eq!(outcome.http_error, None, "{len} bytes");
            assert_eq!(outcome.requests, outcome.routed, "{len} bytes");
        }
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_api_seed_corpus() {
        for (target, seeds) in all_seeds() {
            let dir = corpus_dir(target);
            fs::create_dir_all(&dir).unwrap();
            for (name, data) in seeds {
                fs::write(dir.join(name), data).unwrap();
            }
        }
    }
}
