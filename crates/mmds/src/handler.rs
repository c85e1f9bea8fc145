//! The MMDS's answers to a guest's HTTP requests, as Firecracker gives them.
//!
//! - `GET path`: the value at `path` in the data store: IMDS text (`text/plain`) by default,
//!   its JSON with `Accept: application/json` (unless the store is in IMDS-compatible mode);
//!   404 when nothing is there, 501 when the value has no IMDS text (numbers, booleans, lists,
//!   `null`). Under V2 it needs a live token in `X-metadata-token` (or
//!   `X-aws-ec2-metadata-token`), else 401; under V1 a token is accepted, valid or not.
//! - `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (or
//!   `X-aws-ec2-metadata-token-ttl-seconds`) of 1 to 21600: a new session token, under either
//!   version. `X-Forwarded-For` makes it a 400: a token is for the guest itself, not for what
//!   it forwards.
//! - Any other method: 405 with `Allow: GET, PUT`.
//! - A malformed request: 400, and the connection is closed.

use std::sync::{Arc, Mutex, PoisonError};

use crate::data_store::{self, Mmds, MmdsVersion, OutputFormat};
use crate::http::{self, ContentType, Method, Parsed, Request, Response, StatusCode, Version};
use crate::{Handled, RequestHandler};

/// The path a guest `PUT`s to for a session token.
pub const PATH_TO_TOKEN: &str = "/latest/api/token";
/// The header carrying a session token.
pub const X_METADATA_TOKEN: &str = "X-metadata-token";
/// EC2's name for [`X_METADATA_TOKEN`], also accepted.
pub const X_AWS_EC2_METADATA_TOKEN: &str = "X-aws-ec2-metadata-token";
/// The header carrying a new token's time to live, in seconds.
pub const X_METADATA_TOKEN_TTL_SECONDS: &str = "X-metadata-token-ttl-seconds";
/// EC2's name for [`X_METADATA_TOKEN_TTL_SECONDS`], also accepted.
pub const X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The header that makes a token request a 400.
pub const X_FORWARDED_FOR: &str = "X-Forwarded-For";

/// The messages of the MMDS's error answers (their bodies).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `GET` under V2 without a token.
    #[error(
        "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to \
         specify the session token."
    )]
    NoTokenProvided,
    /// A `GET` under V2 with a token that is not live.
    #[error("MMDS token not valid.")]
    InvalidToken,
    /// A token request without a time to live.
    #[error(
        "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
         `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime."
    )]
    NoTtlProvided,
    /// A token request whose time to live is not a number.
    #[error("Invalid header. Reason: Invalid value. Key:{0}; Value:{1}")]
    InvalidTtlValue(String, String),
    /// A token request with `X-Forwarded-For`.
    #[error("Invalid header. Reason: Unsupported header name. Key: {0}")]
    ForwardedFor(String),
    /// Nothing at the path.
    #[error("Resource not found: {0}.")]
    ResourceNotFound(String),
    /// A method other than `GET` and `PUT`.
    #[error("Not allowed HTTP method.")]
    MethodNotAllowed,
}

/// Answers a guest's HTTP requests from a data store shared with the VMM's API and any other
/// network stack: one per network stack that serves MMDS.
#[derive(Debug, Clone)]
pub struct MmdsHandler {
    mmds: Arc<Mutex<Mmds>>,
}

impl MmdsHandler {
    /// A handler answering from `mmds`.
    pub fn new(mmds: Arc<Mutex<Mmds>>) -> Self {
        MmdsHandler { mmds }
    }

    /// The answer to one parsed request.
    pub fn respond(&self, request: &Request) -> Response {
        // A panic elsewhere while the store was locked leaves it whole (every change is made
        // on a copy, or is a single assignment): answering from it is still right.
        let mut mmds = self.mmds.lock().unwrap_or_else(PoisonError::into_inner);
        respond(&mut mmds, request)
    }
}

impl RequestHandler for MmdsHandler {
    fn handle(&mut self, received: &[u8]) -> Handled {
        match http::parse_request(received) {
            Ok(Parsed::Incomplete) => Handled::Incomplete,
            Ok(Parsed::Complete { request, consumed }) => {
                let response = self.respond(&request);
                let keep_alive = request.keep_alive();
                Handled::Response {
                    consumed,
                    bytes: response.to_bytes(request.version(), keep_alive),
                    close: !keep_alive,
                }
            }
            Err(err) => Handled::Response {
                consumed: received.len(),
                bytes: text(StatusCode::BadRequest, err.to_string())
                    .to_bytes(Version::Http11, false),
                close: true,
            },
        }
    }
}

fn text(status: StatusCode, body: String) -> Response {
    Response::new(status, ContentType::PlainText, body)
}

/// The value of the first of `names` the request has.
fn header<'a>(request: &'a Request, names: &[&'static str]) -> Option<(&'static str, &'a str)> {
    names
        .iter()
        .find_map(|&name| request.header(name).map(|value| (name, value)))
}

/// The answer to `request` from `mmds`.
pub fn respond(mmds: &mut Mmds, request: &Request) -> Response {
    match request.method() {
        Method::Get => respond_to_get(mmds, request),
        Method::Put => respond_to_put(mmds, request),
        _ => text(
            StatusCode::MethodNotAllowed,
            Error::MethodNotAllowed.to_string(),
        )
        .with_header("Allow", "GET, PUT"),
    }
}

fn respond_to_get(mmds: &Mmds, request: &Request) -> Response {
    if mmds.version() == MmdsVersion::V2 {
        match header(request, &[X_METADATA_TOKEN, X_AWS_EC2_METADATA_TOKEN]) {
            None => {
                return text(StatusCode::Unauthorized, Error::NoTokenProvided.to_string());
            }
            Some((_, token)) if !mmds.is_valid_token(token) => {
                return text(StatusCode::Unauthorized, Error::InvalidToken.to_string());
            }
            Some(_) => {}
        }
    }
    let wants_json = request
        .headers("accept")
        .flat_map(|v| v.split(','))
        .any(|range| {
            range
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    let (format, content_type) = if wants_json && !mmds.imds_compat() {
        (OutputFormat::Json, ContentType::Json)
    } else {
        (OutputFormat::Imds, ContentType::PlainText)
    };
    match mmds.get_path(request.path(), format) {
        Ok(body) => Response::new(StatusCode::Ok, content_type, body),
        Err(data_store::Error::UnsupportedValueType) => text(
            StatusCode::NotImplemented,
            data_store::Error::UnsupportedValueType.to_string(),
        ),
        Err(_) => text(
            StatusCode::NotFound,
            Error::ResourceNotFound(request.path().to_owned()).to_string(),
        ),
    }
}

fn respond_to_put(mmds: &mut Mmds, request: &Request) -> Response {
    if request.header(X_FORWARDED_FOR).is_some() {
        return text(
            StatusCode::BadRequest,
            Error::ForwardedFor(X_FORWARDED_FOR.to_owned()).to_string(),
        );
    }
    let is_token_path = request
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .eq(PATH_TO_TOKEN.split('/').filter(|s| !s.is_empty()));
    if !is_token_path {
        return text(
            StatusCode::NotFound,
            Error::ResourceNotFound(request.path().to_owned()).to_string(),
        );
    }
    let Some((name, value)) = header(
        request,
        &[
            X_METADATA_TOKEN_TTL_SECONDS,
            X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS,
        ],
    ) else {
        return text(StatusCode::BadRequest, Error::NoTtlProvided.to_string());
    };
    let Ok(ttl_seconds) = value.parse::<u32>() else {
        return text(
            StatusCode::BadRequest,
            Error::InvalidTtlValue(name.to_owned(), value.to_owned()).to_string(),
        );
    };
    match mmds.generate_token(ttl_seconds) {
        Ok(token) => Response::new(StatusCode::Ok, ContentType::PlainText, token)
            .with_header(name, &ttl_seconds.to_string()),
        Err(data_store::Error::Token(err @ crate::token::Error::InvalidTtl(_))) => {
            text(StatusCode::BadRequest, err.to_string())
        }
        Err(err) => text(StatusCode::InternalServerError, err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::token::ManualClock;

    struct Fixture {
        handler: MmdsHandler,
        mmds: Arc<Mutex<Mmds>>,
        clock: ManualClock,
    }

    fn fixture(version: MmdsVersion) -> Fixture {
        let clock = ManualClock::new();
        let mut mmds = Mmds::with_clock(51200, Box::new(clock.clone()));
        mmds.put(json!({
            "latest": {
                "meta-data": {
                    "ami-id": "ami-12345678",
                    "network": {"interfaces": {"macs": {"02:29:96:8f:6a:2d": {"device-number": "13345342"}}}},
                    "tags": ["a", "b"],
                    "n": 43
                },
                "user-data": "line 1\nline 2"
            }
        }))
        .unwrap();
        mmds.set_version(version);
        let mmds = Arc::new(Mutex::new(mmds));
        Fixture {
            handler: MmdsHandler::new(mmds.clone()),
            mmds,
            clock,
        }
    }

    /// The status, headers and body of the answer to `request`, and whether it closes.
    fn ask(handler: &mut MmdsHandler, request: &str) -> (u16, String, String, bool) {
        match handler.handle(request.as_bytes()) {
            Handled::Response {
                consumed,
                bytes,
                close,
            } => {
                assert_eq!(consumed, request.len());
                let text = String::from_utf8(bytes).unwrap();
                let (head, body) = text.split_once("\r\n\r\n").unwrap();
                let status = head[9..12].parse().unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(length, body.len());
                (status, format!("{head}\r\n"), body.to_owned(), close)
            }
            Handled::Incomplete => panic!("incomplete: {request:?}"),
        }
    }

    fn token(f: &mut Fixture, ttl: u32) -> String {
        let (status, head, body, _) = ask(
            &mut f.handler,
            &format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
            ),
        );
        assert_eq!(status, 200, "{body}");
        assert!(head.contains(&format!("X-metadata-token-ttl-seconds: {ttl}\r\n")));
        assert!(head.contains("Content-Type: text/plain"));
        body
    }

    #[test]
    fn v1_answers_imds_text_of_objects_and_strings() {
        let mut f = fixture(MmdsVersion::V1);
        let (status, head, body, close) = ask(&mut f.handler, "GET / HTTP/1.1\r\n\r\n");
        assert_eq!((status, body.as_str(), close), (200, "latest/", false));
        assert!(head.contains("Content-Type: text/plain\r\n"));
        let (_, _, body, _) = ask(&mut f.handler, "GET /latest/meta-data/ HTTP/1.1\r\n\r\n");
        assert_eq!(body, "ami-id\nn\nnetwork/\ntags");
        let (_, _, body, _) = ask(
            &mut f.handler,
            "GET http://169.254.169.254/latest//meta-data/ami-id HTTP/1.0\r\n\r\n",
        );
        assert_eq!(body, "ami-12345678");
        let (_, _, body, _) = ask(&mut f.handler, "GET /latest/user-data HTTP/1.1\r\n\r\n");
        assert_eq!(body, "line 1\nline 2");
        let (_, _, body, _) = ask(
            &mut f.handler,
            "GET /latest/meta-data/network/interfaces/macs/02:29:96:8f:6a:2d/device-number HTTP/1.1\r\n\r\n",
        );
        assert_eq!(body, "13345342");
    }

    #[test]
    fn accept_json_answers_the_json_value_and_lists_only_so() {
        let mut f = fixture(MmdsVersion::V1);
        let get =
            |path: &str, accept: &str| format!("GET {path} HTTP/1.1\r\nAccept: {accept}\r\n\r\n");
        let (status, head, body, _) = ask(
            &mut f.handler,
            &get("/latest/meta-data/tags", "application/json"),
        );
        assert_eq!((status, body.as_str()), (200, r#"["a","b"]"#));
        assert!(head.contains("Content-Type: application/json\r\n"));
        let (_, _, body, _) = ask(
            &mut f.handler,
            &get("/latest/meta-data/n", "text/html, application/json;q=0.9"),
        );
        assert_eq!(body, "43");
        let (_, _, body, _) = ask(&mut f.handler, &get("/latest/meta-data/tags/1", "*/*"));
        assert_eq!(body, "b");
        let (status, head, body, _) =
            ask(&mut f.handler, &get("/latest/meta-data/tags", "text/plain"));
        assert_eq!(
            (status, body.as_str()),
            (
                501,
                "Cannot retrieve value. The value has an unsupported type."
            )
        );
        assert!(head.starts_with("HTTP/1.1 501 Not Implemented\r\n"));
        // In IMDS-compatible mode, Accept is ignored.
        f.mmds.lock().unwrap().set_imds_compat(true);
        let (status, head, body, _) = ask(
            &mut f.handler,
            &get("/latest/meta-data/network", "application/json"),
        );
        assert_eq!((status, body.as_str()), (200, "interfaces/"));
        assert!(head.contains("Content-Type: text/plain\r\n"));
    }

    #[test]
    fn a_missing_path_is_404() {
        let mut f = fixture(MmdsVersion::V1);
        let (status, _, body, _) = ask(&mut f.handler, "GET /latest/nothing?x HTTP/1.1\r\n\r\n");
        assert_eq!(
            (status, body.as_str()),
            (404, "Resource not found: /latest/nothing.")
        );
        let mut empty = MmdsHandler::new(Arc::new(Mutex::new(Mmds::default())));
        let (status, _, _, _) = ask(&mut empty, "GET / HTTP/1.1\r\n\r\n");
        assert_eq!(status, 404);
    }

    #[test]
    fn v2_needs_a_live_token() {
        let mut f = fixture(MmdsVersion::V2);
        let (status, _, body, _) = ask(&mut f.handler, "GET /latest HTTP/1.1\r\n\r\n");
        assert_eq!(status, 401);
        assert!(body.starts_with("No MMDS token provided."));
        let (status, _, body, _) = ask(
            &mut f.handler,
            "GET /latest HTTP/1.1\r\nX-metadata-token: nope\r\n\r\n",
        );
        assert_eq!((status, body.as_str()), (401, "MMDS token not valid."));

        let t = token(&mut f, 10);
        let get = format!("GET /latest HTTP/1.1\r\nx-METADATA-token: {t}\r\n\r\n");
        let (status, _, body, _) = ask(&mut f.handler, &get);
        assert_eq!((status, body.as_str()), (200, "meta-data/\nuser-data"));
        let aws = format!("GET /latest HTTP/1.1\r\nX-aws-ec2-metadata-token: {t}\r\n\r\n");
        assert_eq!(ask(&mut f.handler, &aws).0, 200);

        f.clock.advance(Duration::from_secs(10));
        let (status, _, body, _) = ask(&mut f.handler, &get);
        assert_eq!((status, body.as_str()), (401, "MMDS token not valid."));
    }

    #[test]
    fn v1_gives_tokens_and_accepts_any_or_none() {
        let mut f = fixture(MmdsVersion::V1);
        let t = token(&mut f, 21600);
        for token in [t.as_str(), "not-a-token"] {
            let get = format!("GET /latest HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
            assert_eq!(ask(&mut f.handler, &get).0, 200);
        }
    }

    #[test]
    fn bad_token_requests_are_refused() {
        let mut f = fixture(MmdsVersion::V2);
        let cases = [
            (
                "PUT /latest/api/token HTTP/1.1\r\n\r\n",
                400,
                "Token time to live value not found.",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
                400,
                "Invalid time to live value provided for token: 0. Please provide a value \
                 between 1 and 21600.",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n",
                400,
                "Invalid time to live value provided for token: 21601.",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: -5\r\n\r\n",
                400,
                "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; \
                 Value:-5",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\
                 X-Forwarded-For: 10.0.0.1\r\n\r\n",
                400,
                "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
            ),
            (
                "PUT /latest/api/toke HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
                404,
                "Resource not found: /latest/api/toke.",
            ),
        ];
        for (request, status, message) in cases {
            let (got, _, body, _) = ask(&mut f.handler, request);
            assert_eq!(got, status, "{request:?}: {body}");
            assert!(body.starts_with(message), "{request:?}: {body}");
        }
        // The EC2 header name works too, and is the one echoed.
        let (status, head, _, _) = ask(
            &mut f.handler,
            "PUT //latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert!(head.contains("X-aws-ec2-metadata-token-ttl-seconds: 5\r\n"));
    }

    #[test]
    fn other_methods_are_405_with_allow() {
        let mut f = fixture(MmdsVersion::V1);
        for method in ["POST", "PATCH", "DELETE", "HEAD", "OPTIONS"] {
            let (status, head, body, _) = ask(
                &mut f.handler,
                &format!("{method} /latest HTTP/1.1\r\n\r\n"),
            );
            assert_eq!((status, body.as_str()), (405, "Not allowed HTTP method."));
            assert!(head.contains("Allow: GET, PUT\r\n"));
        }
    }

    #[test]
    fn malformed_requests_get_a_400_and_close() {
        let mut f = fixture(MmdsVersion::V1);
        let (status, head, body, close) = ask(&mut f.handler, "GET / HTTP/3\r\n\r\n");
        assert_eq!(
            (status, body.as_str(), close),
            (400, "Unsupported HTTP version.", true)
        );
        assert!(head.contains("Connection: close\r\n"));
        let junk = vec![b'x'; http::MAX_REQUEST_LEN];
        match f.handler.handle(&junk) {
            Handled::Response {
                consumed, close, ..
            } => {
                assert_eq!(consumed, junk.len());
                assert!(close);
            }
            Handled::Incomplete => panic!("a full buffer of junk is not incomplete"),
        }
    }

    #[test]
    fn keep_alive_is_as_requested_and_pipelined_requests_are_answered_in_order() {
        let mut f = fixture(MmdsVersion::V1);
        let (_, head, _, close) = ask(&mut f.handler, "GET / HTTP/1.0\r\n\r\n");
        assert!(close && head.starts_with("HTTP/1.0 200 OK\r\n"));
        let (_, head, _, close) = ask(
            &mut f.handler,
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(close && head.contains("Connection: close\r\n"));

        let two = b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\nGET /latest/user-data HTTP/1.1\r\n\r\nGET /";
        let mut rest: &[u8] = two;
        let mut bodies = Vec::new();
        while let Handled::Response {
            consumed,
            bytes,
            close,
        } = f.handler.handle(rest)
        {
            assert!(!close);
            let text = String::from_utf8(bytes).unwrap();
            bodies.push(text.split_once("\r\n\r\n").unwrap().1.to_owned());
            rest = &rest[consumed..];
        }
        assert_eq!(bodies, ["ami-12345678", "line 1\nline 2"]);
        assert_eq!(rest, b"GET /");
    }

    #[test]
    fn a_request_arriving_byte_by_byte_is_answered_once_whole() {
        let mut f = fixture(MmdsVersion::V1);
        let request = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\n\r\n";
        for n in 0..request.len() {
            assert_eq!(f.handler.handle(&request[..n]), Handled::Incomplete);
        }
        assert!(matches!(
            f.handler.handle(request),
            Handled::Response { consumed, .. } if consumed == request.len()
        ));
    }

    #[test]
    fn a_patch_is_seen_by_the_next_request() {
        let mut f = fixture(MmdsVersion::V1);
        f.mmds
            .lock()
            .unwrap()
            .patch(&json!({"latest": {"meta-data": {"ami-id": "ami-new"}}}))
            .unwrap();
        let (_, _, body, _) = ask(
            &mut f.handler,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n",
        );
        assert_eq!(body, "ami-new");
    }
}
