//! ember-mmds used as another VMM would: one store shared by the VMM's API thread and the
//! network stacks of two interfaces, each with its own handler, guests on several connections.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ember_mmds::token::ManualClock;
use ember_mmds::{Handled, Mmds, MmdsHandler, MmdsVersion, RequestHandler};
use serde_json::json;

/// A guest connection as a network stack keeps it: the bytes received, not yet consumed.
struct Connection {
    received: Vec<u8>,
    answers: Vec<String>,
    closed: bool,
}

impl Connection {
    fn new() -> Self {
        Connection {
            received: Vec::new(),
            answers: Vec::new(),
            closed: false,
        }
    }

    /// Receives `segment` and answers every whole request, as the stack does.
    fn receive(&mut self, handler: &mut dyn RequestHandler, segment: &[u8]) {
        self.received.extend_from_slice(segment);
        while !self.closed {
            match handler.handle(&self.received) {
                Handled::Incomplete => break,
                Handled::Response {
                    consumed,
                    bytes,
                    close,
                } => {
                    self.received.drain(..consumed);
                    self.answers.push(String::from_utf8(bytes).unwrap());
                    self.closed = close;
                }
            }
        }
    }
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").unwrap().1
}

fn status(answer: &str) -> &str {
    &answer[9..12]
}

#[test]
fn two_interfaces_share_one_store_and_its_tokens() {
    let clock = ManualClock::new();
    let mmds = Arc::new(Mutex::new(Mmds::with_clock(1024, Box::new(clock.clone()))));
    mmds.lock().unwrap().set_version(MmdsVersion::V2);
    mmds.lock()
        .unwrap()
        .put(json!({"latest": {"meta-data": {"instance-id": "i-1"}}}))
        .unwrap();
    let mut eth0 = MmdsHandler::new(mmds.clone());
    let mut eth1 = MmdsHandler::new(mmds.clone());

    // A token from one interface is good on the other: the store holds the tokens.
    let mut c = Connection::new();
    c.receive(
        &mut eth0,
        b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 30\r\n\r\n",
    );
    let token = body(&c.answers[0]).to_owned();
    let get =
        format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    let mut d = Connection::new();
    // One byte at a time, as a slow guest sends it.
    for byte in get.as_bytes() {
        d.receive(&mut eth1, std::slice::from_ref(byte));
    }
    assert_eq!(d.answers.len(), 1);
    assert_eq!(body(&d.answers[0]), "i-1");

    // The API thread patches; the next request sees it.
    let api = {
        let mmds = mmds.clone();
        thread::spawn(move || {
            mmds.lock()
                .unwrap()
                .patch(&json!({"latest": {"meta-data": {"instance-id": "i-2"}}}))
                .unwrap();
        })
    };
    api.join().unwrap();
    d.receive(&mut eth1, get.as_bytes());
    assert_eq!(body(&d.answers[1]), "i-2");

    // A patch past the store's limit is refused and changes nothing the guest sees.
    let big = "x".repeat(2048);
    assert!(mmds.lock().unwrap().patch(&json!({"big": big})).is_err());
    d.receive(&mut eth1, get.as_bytes());
    assert_eq!(body(&d.answers[2]), "i-2");

    // Once the token expires, V2 refuses.
    clock.advance(Duration::from_secs(30));
    d.receive(&mut eth1, get.as_bytes());
    assert_eq!(status(&d.answers[3]), "401");
    assert!(!d.closed);
}

#[test]
fn a_guest_sending_garbage_is_answered_400_and_disconnected() {
    let mmds = Arc::new(Mutex::new(Mmds::new(1024)));
    let mut handler = MmdsHandler::new(mmds);
    let mut c = Connection::new();
    c.receive(
        &mut handler,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    );
    assert_eq!(c.answers.len(), 1);
    assert_eq!(status(&c.answers[0]), "400");
    assert!(c.closed);

    // A head that never ends is cut off at the request limit.
    let mut c = Connection::new();
    c.receive(&mut handler, b"GET / HTTP/1.1\r\n");
    for _ in 0..ember_mmds::http::MAX_REQUEST_LEN {
        if c.closed {
            break;
        }
        c.receive(&mut handler, b"X-A: b\r\n");
    }
    assert!(c.closed);
    assert_eq!(status(&c.answers[0]), "400");
}
