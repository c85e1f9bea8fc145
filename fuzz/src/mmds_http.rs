//! The MMDS target: the bytes a guest sends on one TCP connection to the metadata service,
//! answered by ember-mmds's HTTP parser and `MmdsHandler`.

use std::sync::{Arc, Mutex};

use ember_mmds::http::MAX_REQUEST_LEN;
use ember_mmds::{Handled, Mmds, MmdsHandler, MmdsVersion, RequestHandler};

/// What the MMDS target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmdsOutcome {
    /// Answers sent, one per request (or one for the bytes that ended the connection).
    pub answers: usize,
    /// The status of the last answer.
    pub last_status: Option<u16>,
    /// Whether the connection was closed.
    pub closed: bool,
}

/// The data store every input is answered from.
const STORE: &str = r#"{"latest": {"meta-data": {"ami-id": "ami-12345678",
    "network": {"interfaces": {"macs": {"02:29:96:8f:6a:2d": {"device-number": "1"}}}},
    "tags": ["a", "b"], "n": 43}, "user-data": "hello"}}"#;

/// Serves `data` as one guest connection: the first byte chooses the store's mode (bit 0: V2,
/// bit 1: IMDS-compatible), the second how many bytes arrive at a time (1 to 256), and the
/// rest is what the guest sends. Each arrival is added to the connection's buffer, and
/// [`MmdsHandler`] answers every whole request in it, as the network stack calls it.
///
/// Every answer must have taken at least one byte and no more than were received; be an
/// HTTP/1.x status line, headers with a `Content-Length` equal to the body's length, and the
/// body; and the buffer must never hold more than [`MAX_REQUEST_LEN`] bytes unanswered.
///
/// # Panics
///
/// Only on a finding.
pub fn mmds_request(data: &[u8]) -> MmdsOutcome {
    let mut outcome = MmdsOutcome::default();
    let (Some(&mode), Some(&chunk)) = (data.first(), data.get(1)) else {
        return outcome;
    };
    let stream = &data[2..];
    let chunk = usize::from(chunk).max(1);

    let mut mmds = Mmds::new(51200);
    mmds.put(serde_json::from_str(STORE).expect("the store is JSON"))
        .expect("the store fits");
    if mode & 1 != 0 {
        mmds.set_version(MmdsVersion::V2);
    }
    mmds.set_imds_compat(mode & 2 != 0);
    let mut handler = MmdsHandler::new(Arc::new(Mutex::new(mmds)));

    let mut received: Vec<u8> = Vec::new();
    for segment in stream.chunks(chunk) {
        received.extend_from_slice(segment);
        while !outcome.closed {
            match handler.handle(&received) {
                Handled::Incomplete => {
                    assert!(
                        received.len() < MAX_REQUEST_LEN,
                        "{} bytes held unanswered",
                        received.len()
                    );
                    break;
                }
                Handled::Response {
                    consumed,
                    bytes,
                    close,
                } => {
                    assert!(consumed > 0, "an answer that took no bytes");
                    assert!(
                        consumed <= received.len(),
                        "took {consumed} bytes of {}",
                        received.len()
                    );
                    outcome.last_status = Some(check_response(&bytes));
                    outcome.answers += 1;
                    outcome.closed = close;
                    received.drain(..consumed);
                }
            }
        }
        if outcome.closed {
            break;
        }
    }
    outcome
}

/// Checks that `bytes` is one whole HTTP/1.x response, and returns its status.
fn check_response(bytes: &[u8]) -> u16 {
    let head_len = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the head ends with an empty line")
        + 4;
    let head = std::str::from_utf8(&bytes[..head_len]).expect("the head is text");
    assert!(
        head.starts_with("HTTP/1.1 ") || head.starts_with("HTTP/1.0 "),
        "status line: {head:?}"
    );
    let status: u16 = head[9..12].parse().expect("a status code");
    assert!((200..600).contains(&status), "status {status}");
    let length: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .expect("a number");
    assert_eq!(length, bytes.len() - head_len, "Content-Length of {head:?}");
    assert!(
        head.contains("\r\nContent-Type: "),
        "no Content-Type in {head:?}"
    );
    if status == 405 {
        assert!(
            head.contains("\r\nAllow: GET, PUT\r\n"),
            "no Allow in {head:?}"
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, corpus_dir, replay};

    const fn mmds(answers: usize, last_status: u16, closed: bool) -> MmdsOutcome {
        MmdsOutcome {
            answers,
            last_status: Some(last_status),
            closed,
        }
    }

    /// The MMDS target's seeds and what it makes of them.
    const MMDS_SEEDS: &[(&str, MmdsOutcome)] = &[
        ("get-v1", mmds(1, 200, false)),
        ("get-json", mmds(1, 200, true)),
        ("get-list-imds", mmds(1, 501, false)),
        ("get-missing", mmds(1, 404, false)),
        ("byte-by-byte", mmds(1, 200, false)),
        ("pipelined", mmds(3, 200, false)),
        ("token-v2", mmds(1, 200, false)),
        ("get-v2-no-token", mmds(1, 401, false)),
        ("get-v2-bad-token", mmds(1, 401, false)),
        ("token-forwarded", mmds(1, 400, false)),
        ("token-bad-ttl", mmds(1, 400, false)),
        ("post", mmds(1, 405, false)),
        ("imds-compat", mmds(1, 200, false)),
        ("garbage", mmds(1, 400, true)),
        ("too-large", mmds(1, 400, true)),
        ("chunked", mmds(1, 400, true)),
        ("then-garbage", mmds(2, 400, true)),
    ];

    fn mmds_seeds() -> Seeds {
        let seed = |mode: u8, chunk: u8, s: &str| {
            let mut data = vec![mode, chunk];
            data.extend_from_slice(s.as_bytes());
            data
        };
        let get = "GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
        let token = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n";
        vec![
            ("get-v1", seed(0, 255, get)),
            (
                "get-json",
                seed(
                    0,
                    64,
                    "GET http://169.254.169.254/latest/meta-data HTTP/1.0\r\n\
                     Accept: application/json\r\n\r\n",
                ),
            ),
            (
                "get-list-imds",
                seed(0, 255, "GET /latest/meta-data/tags HTTP/1.1\r\n\r\n"),
            ),
            (
                "get-missing",
                seed(0, 255, "GET /latest/none HTTP/1.1\r\n\r\n"),
            ),
            ("byte-by-byte", seed(0, 1, get)),
            (
                "pipelined",
                seed(
                    0,
                    7,
                    &format!("{get}{}{get}", "GET /latest/ HTTP/1.1\r\n\r\n"),
                ),
            ),
            ("token-v2", seed(1, 255, token)),
            ("get-v2-no-token", seed(1, 255, get)),
            (
                "get-v2-bad-token",
                seed(
                    1,
                    255,
                    &get.replace("Host:", "X-metadata-token: 00\r\nHost:"),
                ),
            ),
            (
                "token-forwarded",
                seed(
                    1,
                    255,
                    &token.replace("\r\n\r\n", "\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"),
                ),
            ),
            ("token-bad-ttl", seed(0, 255, &token.replace(": 60", ": 0"))),
            (
                "post",
                seed(
                    0,
                    255,
                    "POST /latest HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                ),
            ),
            (
                "imds-compat",
                seed(
                    2,
                    255,
                    "GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n",
                ),
            ),
            ("garbage", seed(0, 255, "\u{16}\u{3}\u{1}\0\u{1}")),
            (
                "too-large",
                seed(
                    0,
                    200,
                    &format!("GET / HTTP/1.1\r\nA: {}\r\n", "x".repeat(5000)),
                ),
            ),
            (
                "chunked",
                seed(
                    0,
                    255,
                    "PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                ),
            ),
            (
                "then-garbage",
                seed(0, 255, &format!("{get}GET /\u{1} HTTP/1.1\r\n\r\n")),
            ),
        ]
    }

    #[test]
    fn mmds_request_corpus_replays() {
        replay("mmds_request", MMDS_SEEDS, mmds_request);
    }

    #[test]
    fn mmds_seeds_on_disk_are_the_generated_ones() {
        crate::tests::check_seeds(&[("mmds_request", mmds_seeds())]);
    }

    #[test]
    fn every_chunk_size_gives_the_same_answers() {
        for (name, data) in mmds_seeds() {
            let mut data = data;
            let whole = mmds_request(&data);
            for chunk in [1u8, 2, 3, 13, 255] {
                data[1] = chunk;
                assert_eq!(mmds_request(&data), whole, "{name} in chunks of {chunk}");
            }
        }
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_mmds_seed_corpus() {
        let dir = corpus_dir("mmds_request");
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in mmds_seeds() {
            fs::write(dir.join(name), data).unwrap();
        }
    }
}
