//! What the tests that run `ember` share: a scratch directory per test, and HTTP/1.1 over the
//! API socket as a client speaks it.

// Each test binary takes what it needs of this module.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a client waits for an answer: generous, since two cores run the tests, the guests'
/// vCPUs and `ember`'s threads.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits up to 10 s for the API socket of `child`, an `ember` just started, to accept.
///
/// # Panics
///
/// When `child` exits first (with its standard error, if it is piped), or the time runs out.
pub fn wait_for_api(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("ember exited ({status}) before serving its API: {err}");
        }
        assert!(Instant::now() < deadline, "the API socket never accepted");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A directory of its own for one test, removed when dropped. Its name holds the test binary's
/// name and the process ID, so tests of different binaries and runs never share one.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ember-{}-{}-{name}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The file `name`, written with `contents`.
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, contents).unwrap();
        path
    }

    /// The path of `name`, as a command line argument.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One response of the API.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    /// The `fault_message` of an error's body.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A request as a client writes it, with a JSON `body` if there is one.
pub fn encode(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    request.into_bytes()
}

/// Reads one response; bytes after it stay in `stream` for the next one.
pub fn read_response(stream: &mut impl BufRead) -> Response {
    let mut read_line = || {
        let mut line = String::new();
        let n = stream.read_line(&mut line).expect("a response");
        assert!(n > 0, "connection closed inside a response head");
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    let status_line = read_line();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let header = read_line();
        if header.is_empty() {
            break;
        }
        let (n, v) = header.split_once(':').unwrap();
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; length];
    stream
        .read_exact(&mut body)
        .expect("the whole body of a response");
    Response {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// Sends `request` on a new connection to the API at `socket` and reads one response.
pub fn send(socket: &Path, request: &[u8]) -> Response {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    read_response(&mut BufReader::new(stream))
}

/// One request, with a JSON `body` if there is one, on a new connection to the API at
/// `socket`.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Response {
    send(
        socket,
        &encode(method, path, body.map(Value::to_string).as_deref()),
    )
}
