//! A small, bounded HTTP/1.x request parser and response writer for the guest-facing MMDS.
//!
//! The guest is malicious: every request it sends is parsed from the bytes received so far on a
//! connection, again on each call, with nothing kept in between. [`parse_request`] answers
//! [`Parsed::Incomplete`] until a whole request is there (request line, headers and the
//! `Content-Length` body), and an [`Error`] as soon as the bytes cannot become a valid request,
//! or once they pass [`MAX_REQUEST_LEN`] without ending one. A request's head and body together
//! are never more than [`MAX_REQUEST_LEN`] bytes, nor its headers more than [`MAX_HEADERS`], so
//! neither the memory nor the time a request costs grows with what the guest sends.
//!
//! What is accepted: `METHOD SP target SP HTTP/1.0|HTTP/1.1`, the target in origin form
//! (`/path`) or absolute form (`http://host/path`), its query and fragment dropped; header lines
//! `Name: value`; lines ending in CRLF or a bare LF. Not accepted: `Transfer-Encoding` (no
//! chunked bodies), folded header lines, control characters.

use std::fmt::Write as _;

/// The most bytes a request may take, its head and body together.
pub const MAX_REQUEST_LEN: usize = 4096;
/// The most header lines a request may have.
pub const MAX_HEADERS: usize = 32;

/// Why the received bytes are not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is longer than [`MAX_REQUEST_LEN`].
    #[error("Request too large: a request may take at most {MAX_REQUEST_LEN} bytes.")]
    TooLarge,
    /// The request line is not `METHOD SP target SP version`.
    #[error("Invalid request line.")]
    InvalidRequestLine,
    /// The method is not an HTTP token.
    #[error("Invalid HTTP method.")]
    InvalidMethod,
    /// The target is neither `/path` nor `http://host/path`.
    #[error("Invalid URI.")]
    InvalidUri,
    /// The version is not HTTP/1.0 or HTTP/1.1.
    #[error("Unsupported HTTP version.")]
    UnsupportedVersion,
    /// A header line is not `Name: value`.
    #[error("Invalid header.")]
    InvalidHeader,
    /// More than [`MAX_HEADERS`] header lines.
    #[error("Too many headers: a request may have at most {MAX_HEADERS}.")]
    TooManyHeaders,
    /// `Content-Length` is not a number, or two disagree.
    #[error("Invalid Content-Length header.")]
    InvalidContentLength,
    /// The request has a `Transfer-Encoding`.
    #[error("Transfer-Encoding is not supported.")]
    UnsupportedTransferEncoding,
}

/// The module's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A request's method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// Any other method.
    Other,
}

/// A request's HTTP version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Version {
    /// HTTP/1.0: the connection closes after each answer unless asked to stay.
    Http10,
    /// HTTP/1.1: the connection stays unless asked to close.
    Http11,
}

impl Version {
    fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: Method,
    path: String,
    version: Version,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The target's path, without query or fragment; it starts with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The body (`Content-Length` bytes).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The value of the first header named `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The values of every header named `name` (case-insensitive).
    pub fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the connection stays open after the answer: HTTP/1.1 unless `Connection:
    /// close`, HTTP/1.0 only with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        let has = |token: &str| {
            self.headers("connection")
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        match self.version {
            Version::Http11 => !has("close"),
            Version::Http10 => has("keep-alive") && !has("close"),
        }
    }
}

/// What the received bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet, nothing wrong so far.
    Incomplete,
    /// A whole request, and how many of the bytes it took.
    Complete {
        /// The request.
        request: Request,
        /// The bytes it took, from the start of the input.
        consumed: usize,
    },
}

/// Parses the first request in `bytes`, the bytes received so far on one connection.
///
/// Whenever `bytes` holds [`MAX_REQUEST_LEN`] bytes or more, the answer is a request or an
/// error, never [`Parsed::Incomplete`]: a caller never needs to keep more.
///
/// Empty lines before the request line are skipped (RFC 9112 §2.2), and counted as consumed.
///
/// # Errors
/// An [`Error`] when `bytes` cannot start a valid request within [`MAX_REQUEST_LEN`] bytes.
pub fn parse_request(bytes: &[u8]) -> Result<Parsed> {
    // Leading empty lines count towards the limit too: nothing is kept past it.
    let full = bytes.len() >= MAX_REQUEST_LEN;
    let limit = bytes.len().min(MAX_REQUEST_LEN);
    let start = bytes[..limit]
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(limit);
    let input = &bytes[start..];
    let window = &bytes[start..limit];

    // Check the request line as soon as it is whole, so that garbage is refused early.
    let Some(line_end) = window.iter().position(|&b| b == b'\n') else {
        if full {
            return Err(Error::TooLarge);
        }
        return check_partial_line(window).map(|()| Parsed::Incomplete);
    };
    let (method, path, version) = parse_request_line(trim_cr(&window[..line_end]))?;

    let Some(head_len) = find_head_end(window) else {
        if full {
            return Err(Error::TooLarge);
        }
        // Check the header lines already whole.
        let whole = window.iter().rposition(|&b| b == b'\n').unwrap_or(line_end);
        parse_headers(&window[line_end.saturating_add(1)..whole.saturating_add(1)])?;
        return Ok(Parsed::Incomplete);
    };
    let headers = parse_headers(&window[line_end.saturating_add(1)..head_len])?;

    if headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(Error::UnsupportedTransferEncoding);
    }
    let mut content_length: Option<usize> = None;
    for (_, value) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::InvalidContentLength);
        }
        // Longer than any allowed length: the request is too large.
        let len = value.parse::<usize>().map_err(|_| Error::TooLarge)?;
        if content_length.is_some_and(|l| l != len) {
            return Err(Error::InvalidContentLength);
        }
        content_length = Some(len);
    }
    let body_len = content_length.unwrap_or(0);
    let total = head_len.checked_add(body_len).ok_or(Error::TooLarge)?;
    if start.saturating_add(total) > MAX_REQUEST_LEN {
        return Err(Error::TooLarge);
    }
    if input.len() < total {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Complete {
        request: Request {
            method,
            path,
            version,
            headers,
            body: input[head_len..total].to_vec(),
        },
        consumed: start.saturating_add(total),
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The length of the head up to and including the empty line that ends it.
fn find_head_end(window: &[u8]) -> Option<usize> {
    let mut line_start = 0usize;
    for (i, &b) in window.iter().enumerate() {
        if b == b'\n' {
            let line = &window[line_start..i];
            if line.is_empty() || line == b"\r" {
                return i.checked_add(1);
            }
            line_start = i.checked_add(1)?;
        }
    }
    None
}

/// Whether an HTTP token character (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Refuses a request line that cannot become valid, while it is still being received.
fn check_partial_line(line: &[u8]) -> Result<()> {
    let line = trim_cr(line);
    let method_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    if !line[..method_end].iter().all(|&b| is_tchar(b)) {
        return Err(Error::InvalidMethod);
    }
    if line.iter().any(|&b| b.is_ascii_control() || b >= 0x80) {
        return Err(Error::InvalidRequestLine);
    }
    Ok(())
}

fn parse_request_line(line: &[u8]) -> Result<(Method, String, Version)> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::InvalidRequestLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Error::InvalidMethod);
    }
    let method = match method {
        b"GET" => Method::Get,
        b"PUT" => Method::Put,
        _ => Method::Other,
    };
    let version = match version {
        b"HTTP/1.0" => Version::Http10,
        b"HTTP/1.1" => Version::Http11,
        _ if version.starts_with(b"HTTP/") => return Err(Error::UnsupportedVersion),
        _ => return Err(Error::InvalidRequestLine),
    };
    Ok((method, parse_target(target)?, version))
}

/// The path of an origin-form or absolute-form target, without query or fragment.
fn parse_target(target: &[u8]) -> Result<String> {
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(Error::InvalidUri);
    }
    let path = if target.starts_with(b"/") {
        target
    } else {
        let lower = target.to_ascii_lowercase();
        let rest = if lower.starts_with(b"http://") {
            &target[7..]
        } else {
            return Err(Error::InvalidUri);
        };
        let slash = rest
            .iter()
            .position(|&b| b == b'/')
            .ok_or(Error::InvalidUri)?;
        &rest[slash..]
    };
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    let path = &path[..end];
    if path.is_empty() {
        return Err(Error::InvalidUri);
    }
    // Visible ASCII only, checked above.
    String::from_utf8(path.to_vec()).map_err(|_| Error::InvalidUri)
}

/// Parses whole header lines (each ending in `\n`), the empty line that ends the head allowed
/// last.
fn parse_headers(block: &[u8]) -> Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    for line in block.split_inclusive(|&b| b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            // The unfinished last line, when the block has one: not checked yet.
            break;
        };
        let line = trim_cr(line);
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(Error::TooManyHeaders);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Error::InvalidHeader)?;
        let (name, value) = (&line[..colon], &line[colon.saturating_add(1)..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(Error::InvalidHeader);
        }
        if value
            .iter()
            .any(|&b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
        {
            return Err(Error::InvalidHeader);
        }
        let value = String::from_utf8_lossy(value)
            .trim_matches([' ', '\t'])
            .to_owned();
        // A token character only, checked above.
        let name = String::from_utf8_lossy(name).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

/// An answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusCode {
    /// 200.
    Ok,
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 500.
    InternalServerError,
    /// 501.
    NotImplemented,
}

impl StatusCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            StatusCode::Ok => 200,
            StatusCode::BadRequest => 400,
            StatusCode::Unauthorized => 401,
            StatusCode::NotFound => 404,
            StatusCode::MethodNotAllowed => 405,
            StatusCode::InternalServerError => 500,
            StatusCode::NotImplemented => 501,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            StatusCode::Ok => "OK",
            StatusCode::BadRequest => "Bad Request",
            StatusCode::Unauthorized => "Unauthorized",
            StatusCode::NotFound => "Not Found",
            StatusCode::MethodNotAllowed => "Method Not Allowed",
            StatusCode::InternalServerError => "Internal Server Error",
            StatusCode::NotImplemented => "Not Implemented",
        }
    }
}

/// An answer's media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContentType {
    /// `text/plain`.
    PlainText,
    /// `application/json`.
    Json,
}

impl ContentType {
    fn as_str(self) -> &'static str {
        match self {
            ContentType::PlainText => "text/plain",
            ContentType::Json => "application/json",
        }
    }
}

/// An answer to write back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: StatusCode,
    content_type: ContentType,
    body: String,
    headers: Vec<(String, String)>,
}

impl Response {
    /// An answer with `status` and `body` of `content_type`.
    pub fn new(status: StatusCode, content_type: ContentType, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header line. `name` and `value` must be header-safe (no CR or LF); the caller
    /// gives only its own constants and numbers.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The answer's bytes: status line for `version`, `Server`, `Connection` (`keep-alive` or
    /// `close`), `Content-Type`, `Content-Length`, the added headers, and the body.
    pub fn to_bytes(&self, version: Version, keep_alive: bool) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "{} {} {}\r\nServer: ember\r\nConnection: {}\r\nContent-Type: {}\r\n\
             Content-Length: {}\r\n",
            version.as_str(),
            self.status.code(),
            self.status.reason(),
            if keep_alive { "keep-alive" } else { "close" },
            self.content_type.as_str(),
            self.body.len(),
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> (Request, usize) {
        match parse_request(bytes) {
            Ok(Parsed::Complete { request, consumed }) => (request, consumed),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn a_simple_get_is_parsed() {
        let req = b"GET /latest/meta-data?x=1 HTTP/1.1\r\nHost: 169.254.169.254\r\n\
                    Accept: application/json\r\n\r\n";
        let (r, consumed) = complete(req);
        assert_eq!(consumed, req.len());
        assert_eq!(r.method(), Method::Get);
        assert_eq!(r.path(), "/latest/meta-data");
        assert_eq!(r.version(), Version::Http11);
        assert_eq!(r.header("accept"), Some("application/json"));
        assert_eq!(r.header("HOST"), Some("169.254.169.254"));
        assert!(r.keep_alive());
        assert!(r.body().is_empty());
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete_and_the_whole_is_complete() {
        let req = b"PUT http://169.254.169.254/latest/api/token HTTP/1.1\r\n\
                    X-metadata-token-ttl-seconds: 60\r\nContent-Length: 5\r\n\r\nhello";
        for n in 0..req.len() {
            assert_eq!(parse_request(&req[..n]), Ok(Parsed::Incomplete), "{n}");
        }
        let (r, consumed) = complete(req);
        assert_eq!(consumed, req.len());
        assert_eq!(r.method(), Method::Put);
        assert_eq!(r.path(), "/latest/api/token");
        assert_eq!(r.body(), b"hello");
    }

    #[test]
    fn pipelined_requests_are_taken_one_at_a_time() {
        let req = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n";
        let (a, n) = complete(req);
        assert_eq!(a.path(), "/a");
        let (b, m) = complete(&req[n..]);
        assert_eq!(b.path(), "/b");
        assert_eq!(n + m, req.len());
    }

    #[test]
    fn bare_line_feeds_and_leading_empty_lines_are_accepted() {
        let req = b"\r\n\nGET / HTTP/1.0\nConnection: keep-alive\n\n";
        let (r, consumed) = complete(req);
        assert_eq!(consumed, req.len());
        assert_eq!(r.path(), "/");
        assert!(r.keep_alive());
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let cases: [(&[u8], bool); 5] = [
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                b"GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        ];
        for (req, keep) in cases {
            assert_eq!(complete(req).0.keep_alive(), keep);
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        let cases: [(&[u8], Error); 17] = [
            (b"GET /\r\n\r\n", Error::InvalidRequestLine),
            (b"GET  / HTTP/1.1\r\n\r\n", Error::InvalidRequestLine),
            (b"GET / HTTP/1.1 x\r\n\r\n", Error::InvalidRequestLine),
            (b"G(T / HTTP/1.1\r\n\r\n", Error::InvalidMethod),
            (b"G\x00", Error::InvalidMethod),
            (b"GET / HTTP/2.0\r\n\r\n", Error::UnsupportedVersion),
            (b"GET / FTP/1.0\r\n\r\n", Error::InvalidRequestLine),
            (b"GET x HTTP/1.1\r\n\r\n", Error::InvalidUri),
            (b"GET http:// HTTP/1.0\r\n\r\n", Error::InvalidUri),
            (b"GET ftp://a/b HTTP/1.0\r\n\r\n", Error::InvalidUri),
            (b"GET /?q HTTP/1.0\r\nNoColon\r\n\r\n", Error::InvalidHeader),
            (
                b"GET / HTTP/1.0\r\n folded: x\r\n\r\n",
                Error::InvalidHeader,
            ),
            (b"GET / HTTP/1.0\r\nA: \x01\r\n\r\n", Error::InvalidHeader),
            (
                b"GET / HTTP/1.0\r\nContent-Length: -1\r\n\r\n",
                Error::InvalidContentLength,
            ),
            (
                b"GET / HTTP/1.0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                Error::InvalidContentLength,
            ),
            (
                b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Error::UnsupportedTransferEncoding,
            ),
            (
                b"GET / HTTP/1.0\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                Error::TooLarge,
            ),
        ];
        for (req, err) in cases {
            assert_eq!(
                parse_request(req),
                Err(err),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn a_bad_request_line_is_refused_before_the_head_ends() {
        assert_eq!(parse_request(b"GET /\x01"), Err(Error::InvalidRequestLine));
        assert_eq!(
            parse_request(b"GET / HTTP/9\r\nA: b"),
            Err(Error::UnsupportedVersion)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nbad\r\nA: "),
            Err(Error::InvalidHeader)
        );
    }

    #[test]
    fn requests_are_bounded_in_size_and_headers() {
        // A head that never ends.
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        while req.len() < MAX_REQUEST_LEN {
            req.extend_from_slice(b"A: b\r\n");
            let expected = if req.len() >= MAX_REQUEST_LEN {
                Err(Error::TooLarge)
            } else if req.len() > 16 + MAX_HEADERS * 6 {
                Err(Error::TooManyHeaders)
            } else {
                Ok(Parsed::Incomplete)
            };
            assert_eq!(parse_request(&req), expected, "{}", req.len());
        }
        // A request line that never ends.
        let long = vec![b'G'; MAX_REQUEST_LEN];
        assert_eq!(parse_request(&long), Err(Error::TooLarge));
        // A body past the limit is refused from its Content-Length.
        let req = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_REQUEST_LEN}\r\n\r\n");
        assert_eq!(parse_request(req.as_bytes()), Err(Error::TooLarge));
        // Empty lines alone, as many as fit, then too many.
        assert_eq!(parse_request(&[b'\n'; 10]), Ok(Parsed::Incomplete));
        assert_eq!(
            parse_request(&[b'\n'; MAX_REQUEST_LEN]),
            Err(Error::TooLarge)
        );
        // Exactly at the limit is fine.
        let head = "PUT / HTTP/1.1\r\nContent-Length: 4056\r\n\r\n";
        let mut req = head.as_bytes().to_vec();
        req.resize(MAX_REQUEST_LEN, b'x');
        assert_eq!(head.len() + 4056, MAX_REQUEST_LEN);
        assert_eq!(complete(&req).1, MAX_REQUEST_LEN);
    }

    #[test]
    fn responses_carry_length_type_and_connection() {
        let r = Response::new(StatusCode::MethodNotAllowed, ContentType::PlainText, "no")
            .with_header("Allow", "GET, PUT");
        assert_eq!(
            String::from_utf8(r.to_bytes(Version::Http11, false)).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nServer: ember\r\nConnection: close\r\n\
             Content-Type: text/plain\r\nContent-Length: 2\r\nAllow: GET, PUT\r\n\r\nno"
        );
        let r = Response::new(StatusCode::Ok, ContentType::Json, "\"é\"");
        let text = String::from_utf8(r.to_bytes(Version::Http10, true)).unwrap();
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"));
        assert!(text.contains("Connection: keep-alive\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Content-Length: 4\r\n"));
    }
}
