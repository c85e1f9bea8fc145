//! A small, strict HTTP/1.1 codec for the server side of the API socket.
//!
//! [`parse_request`] is a pure function over the bytes a client sent so far: it returns a complete
//! [`Request`] and how many bytes it took, `None` when more bytes are needed, or an [`HttpError`]
//! that ends the connection. [`RequestParser`] does the same for bytes that arrive in pieces,
//! examining each byte once however many pieces it takes. It never panics and does no unchecked arithmetic or indexing, as its
//! input comes straight from whoever can open the socket; a fuzz target can call it as it is.
//!
//! What it accepts:
//! - a request line `METHOD SP request-target SP HTTP/1.x` with any token as the method (routing
//!   decides which ones are served), an origin-form (`/drives/rootfs`) or absolute-form
//!   (`http://localhost/drives/rootfs`, as some clients send over a Unix socket) target whose
//!   `?query` is dropped, and HTTP/1.0 or HTTP/1.1;
//! - header lines ending in CR LF, at most [`MAX_HEAD_LEN`] bytes from the request line to the empty
//!   line; `Content-Length` (once, at most [`MAX_BODY_LEN`]), `Connection: close|keep-alive` and
//!   `Expect: 100-continue` are read, other headers are checked for form and ignored;
//! - a body of exactly `Content-Length` bytes. The bytes after it belong to the next request, so
//!   pipelined requests are parsed one after the other.
//!
//! What it refuses: a bare LF or CR, an obsolete folded header line, any `Transfer-Encoding`
//! (chunked bodies are not supported: 501), an expectation other than `100-continue` (417), a
//! malformed or repeated `Content-Length`, and a body larger than the limit, refused as soon as the
//! header is read with Firecracker's status and message (400, "Request payload with size N is larger
//! than the limit of 51200 allowed by server.").
//!
//! [`Response::encode`] writes a response the way Firecracker's API server does: the status line,
//! `Server: Firecracker API`, `Connection`, and for every status but 1xx and 204 a `Content-Type` and
//! `Content-Length`.

use std::fmt::{self, Write as _};

/// The most bytes of a request line and its headers, the empty line that ends them included.
pub const MAX_HEAD_LEN: usize = 8 * 1024;

/// The largest request body served: Firecracker's default `--http-api-max-payload-size`.
pub const MAX_BODY_LEN: usize = 51_200;

/// The most bytes one request can take: its head and its body at their limits.
pub const MAX_REQUEST_LEN: usize = MAX_HEAD_LEN + MAX_BODY_LEN;

/// The interim response to `Expect: 100-continue`, sent once the header is accepted and before
/// the body arrives.
pub const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The value of the `Server` header of every response, as Firecracker sends it.
pub const SERVER_NAME: &str = "Firecracker API";

/// Why bytes from a client are not an HTTP request ember serves.
///
/// Every one of them ends the connection: the codec cannot tell where the next request would
/// start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line and headers did not end within [`MAX_HEAD_LEN`] bytes.
    #[error("The request line and headers are larger than the limit of {limit} bytes.")]
    HeadTooLarge {
        /// The limit, [`MAX_HEAD_LEN`].
        limit: usize,
    },
    /// `Content-Length` is larger than the limit ([`MAX_BODY_LEN`] unless
    /// `--http-api-max-payload-size` sets another); the wording is Firecracker's.
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} allowed by server."
    )]
    PayloadTooLarge {
        /// The `Content-Length` the client gave.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// A line holds a CR that is not followed by LF, or ends with LF alone.
    #[error(
        "Every line of the request line and headers must end with CR LF, and hold no other CR or LF."
    )]
    BadLineEnding,
    /// The request line is not `METHOD SP request-target SP HTTP-version`.
    #[error("The request line is not of the form `METHOD /path HTTP/1.1`.")]
    InvalidRequestLine,
    /// The request target is not an absolute path (`/machine-config`) or an `http://` URI.
    #[error("The request target must be an absolute path such as /machine-config.")]
    InvalidTarget,
    /// The version is HTTP, but not 1.0 or 1.1.
    #[error("Only HTTP/1.0 and HTTP/1.1 are supported.")]
    UnsupportedVersion,
    /// A header line is not `name: value` with a token name and printable value.
    #[error("A header line is not of the form `Name: value`.")]
    InvalidHeader,
    /// `Content-Length` is not a decimal number that fits in 64 bits.
    #[error("The Content-Length header is not a decimal number.")]
    InvalidContentLength,
    /// `Content-Length` appears more than once.
    #[error("The Content-Length header is given more than once.")]
    DuplicateContentLength,
    /// The request has a `Transfer-Encoding` header.
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length header.")]
    TransferEncoding,
    /// The request has an `Expect` header other than `100-continue`.
    #[error("The only expectation supported is `Expect: 100-continue`.")]
    UnsupportedExpectation,
}

impl HttpError {
    /// The status of the response that reports this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::TransferEncoding => StatusCode::NotImplemented,
            HttpError::UnsupportedExpectation => StatusCode::ExpectationFailed,
            HttpError::UnsupportedVersion => StatusCode::HttpVersionNotSupported,
            // Firecracker answers an oversized payload, and every other malformed request, with 400.
            HttpError::HeadTooLarge { .. }
            | HttpError::PayloadTooLarge { .. }
            | HttpError::BadLineEnding
            | HttpError::InvalidRequestLine
            | HttpError::InvalidTarget
            | HttpError::InvalidHeader
            | HttpError::InvalidContentLength
            | HttpError::DuplicateContentLength => StatusCode::BadRequest,
        }
    }
}

/// A request method: the three the API serves, or any other token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// Any other method token, as the client spelled it.
    Other(String),
}

impl Method {
    /// The method as it appears on the request line.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Other(token) => token,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HTTP version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: the connection closes after the response unless the client asks to keep it.
    Http10,
    /// HTTP/1.1: the connection stays open unless the client sends `Connection: close`.
    Http11,
}

/// The request line and headers of a request, as far as ember reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The path of the request target, without its query.
    pub path: String,
    /// The HTTP version.
    pub version: Version,
    /// The body's length from `Content-Length`, 0 without one; at most [`MAX_BODY_LEN`].
    pub content_length: usize,
    /// Whether the client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// How many bytes the head took, the empty line that ends it included.
    pub head_len: usize,
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path of the request target, without its query.
    pub path: String,
    /// The HTTP version.
    pub version: Version,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// The body, empty when the request has none.
    pub body: Vec<u8>,
}

/// Parses one request from the start of `buf`.
///
/// A one-shot [`RequestParser`]: a caller that receives a request in pieces keeps a
/// [`RequestParser`] instead, so that each byte is examined once.
///
/// # Returns
///
/// `Some((request, consumed))` once the whole request is in `buf`: the bytes after `consumed`
/// belong to the next one. `None` while the request is incomplete but valid so far.
///
/// # Errors
///
/// An [`HttpError`] as soon as the bytes cannot be the start of a request ember serves.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    RequestParser::new().parse(buf)
}

/// Parses the request line and headers at the start of `buf`.
///
/// Each complete line is checked as soon as it is in `buf`, so a malformed request is refused
/// without waiting for the rest of it.
///
/// # Returns
///
/// The head once the empty line that ends it is in `buf`, `None` before.
///
/// # Errors
///
/// An [`HttpError`] when the lines so far are not a valid head, or when the head does not end
/// within [`MAX_HEAD_LEN`] bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    RequestParser::new().parse_head(buf)
}

/// An incremental parser of one request, for bytes that arrive in pieces.
///
/// It remembers where it stopped: the start of the line being read, where the search for its LF
/// resumes, and what the lines before it said. Given the same buffer again with more bytes at its
/// end, it examines only the new ones, so a request that arrives one byte at a time costs work in
/// proportion to its length, not to its square. [`RequestParser::bytes_scanned`] counts that work.
///
/// ```
/// use ember_vmm::api::http::RequestParser;
///
/// let request = b"GET /version HTTP/1.1\r\n\r\n";
/// let mut parser = RequestParser::new();
/// for end in 1..request.len() {
///     assert!(parser.parse(&request[..end]).unwrap().is_none());
/// }
/// let (parsed, used) = parser.parse(request).unwrap().unwrap();
/// assert_eq!((parsed.path.as_str(), used), ("/version", request.len()));
/// assert_eq!(parser.bytes_scanned(), request.len());
/// ```
#[derive(Debug, Clone)]
pub struct RequestParser {
    /// Where the line being read starts.
    line_start: usize,
    /// Where the search for the end of the line resumes: every byte before it was examined.
    scan_from: usize,
    /// The request line, once it is complete.
    request_line: Option<(Method, String, Version)>,
    /// What the complete header lines said.
    headers: Headers,
    /// The head, once the empty line that ends it was read.
    head: Option<RequestHead>,
    /// Bytes of the head examined so far, over every call.
    scanned: usize,
    /// The largest body accepted (`--http-api-max-payload-size`).
    max_body: usize,
}

impl Default for RequestParser {
    fn default() -> RequestParser {
        RequestParser::with_body_limit(MAX_BODY_LEN)
    }
}

impl RequestParser {
    /// A parser at the start of a request, for bodies of at most [`MAX_BODY_LEN`] bytes.
    pub fn new() -> RequestParser {
        RequestParser::default()
    }

    /// A parser at the start of a request, for bodies of at most `max_body` bytes
    /// (Firecracker's `--http-api-max-payload-size`); a larger `Content-Length` is
    /// [`HttpError::PayloadTooLarge`].
    pub fn with_body_limit(max_body: usize) -> RequestParser {
        RequestParser {
            line_start: 0,
            scan_from: 0,
            request_line: None,
            headers: Headers::default(),
            head: None,
            scanned: 0,
            max_body,
        }
    }

    /// The largest body this parser accepts.
    pub fn body_limit(&self) -> usize {
        self.max_body
    }

    /// Parses the request at the start of `buf`.
    ///
    /// `buf` must start with the bytes given at the previous call (more may follow them); start
    /// a new parser, or call [`RequestParser::reset`], for the next request.
    ///
    /// # Returns
    ///
    /// `Some((request, consumed))` once the whole request is in `buf`: the bytes after
    /// `consumed` belong to the next one. `None` while the request is incomplete but valid so far.
    ///
    /// # Errors
    ///
    /// An [`HttpError`] as soon as the bytes cannot be the start of a request ember serves.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        let Some(head) = self.parse_head(buf)? else {
            return Ok(None);
        };
        // Both terms are bounded by the limits, so the sum cannot overflow; checked all the same.
        let end =
            head.head_len
                .checked_add(head.content_length)
                .ok_or(HttpError::PayloadTooLarge {
                    size: u64::MAX,
                    limit: self.max_body,
                })?;
        let Some(body) = buf.get(head.head_len..end) else {
            return Ok(None);
        };
        let request = Request {
            method: head.method,
            path: head.path,
            version: head.version,
            keep_alive: head.keep_alive,
            body: body.to_vec(),
        };
        Ok(Some((request, end)))
    }

    /// Parses the request line and headers at the start of `buf`, examining only the bytes that
    /// are new since the previous call.
    ///
    /// # Returns
    ///
    /// The head once the empty line that ends it is in `buf`, `None` before.
    ///
    /// # Errors
    ///
    /// An [`HttpError`] when the lines so far are not a valid head, or when the head does not end
    /// within [`MAX_HEAD_LEN`] bytes.
    pub fn parse_head(&mut self, buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
        if let Some(head) = &self.head {
            return Ok(Some(head.clone()));
        }
        let window = buf.get(..MAX_HEAD_LEN).unwrap_or(buf);
        while let Some(lf) = self.find_line_end(window)? {
            // The scan checked that the line ends with CR LF and holds no other CR or LF.
            let line_end = lf.checked_sub(1).ok_or(HttpError::BadLineEnding)?;
            let line = window
                .get(self.line_start..line_end)
                .ok_or(HttpError::BadLineEnding)?;
            let next_line = lf.checked_add(1).ok_or(HttpError::BadLineEnding)?;
            match &self.request_line {
                // A server should ignore empty lines before a request line (RFC 9112, section
                // 2.2): some clients send one after a body.
                None if line.is_empty() => {}
                None => self.request_line = Some(parse_request_line(line)?),
                Some(_) if !line.is_empty() => self.headers.parse_line(line, self.max_body)?,
                Some((method, path, version)) => {
                    let head = self.headers.head(method, path, *version, next_line);
                    self.head = Some(head.clone());
                    return Ok(Some(head));
                }
            }
            self.line_start = next_line;
        }
        if window.len() >= MAX_HEAD_LEN {
            return Err(HttpError::HeadTooLarge {
                limit: MAX_HEAD_LEN,
            });
        }
        Ok(None)
    }

    /// Looks for the LF that ends the line being read, among the bytes of `window` not yet
    /// examined, and checks the line endings on the way.
    ///
    /// Returns its offset in `window`, `None` when it is not there yet.
    fn find_line_end(&mut self, window: &[u8]) -> Result<Option<usize>, HttpError> {
        let start = self.scan_from;
        let Some(new) = window.get(start..) else {
            return Ok(None);
        };
        // The byte before the first new one, when it belongs to the line being read.
        let mut previous = start
            .checked_sub(1)
            .filter(|&before| before >= self.line_start)
            .and_then(|before| window.get(before).copied());
        for (offset, &byte) in new.iter().enumerate() {
            self.scanned = self.scanned.saturating_add(1);
            let at = start.checked_add(offset).ok_or(HttpError::BadLineEnding)?;
            self.scan_from = at.checked_add(1).ok_or(HttpError::BadLineEnding)?;
            let after_cr = previous == Some(b'\r');
            if byte == b'\n' {
                if !after_cr {
                    return Err(HttpError::BadLineEnding);
                }
                return Ok(Some(at));
            }
            // A CR must be followed by LF.
            if after_cr {
                return Err(HttpError::BadLineEnding);
            }
            previous = Some(byte);
        }
        Ok(None)
    }

    /// Forgets the request parsed so far, to parse the next one from the start of a buffer.
    pub fn reset(&mut self) {
        *self = RequestParser {
            scanned: self.scanned,
            ..RequestParser::with_body_limit(self.max_body)
        };
    }

    /// The head of the request, once it was parsed.
    pub fn head(&self) -> Option<&RequestHead> {
        self.head.as_ref()
    }

    /// How many bytes of request heads this parser has examined in all its calls: each byte
    /// once, however many calls it took to arrive.
    pub fn bytes_scanned(&self) -> usize {
        self.scanned
    }
}

/// Whether `b` may appear in a token (RFC 9110, section 5.6.2): method and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses `METHOD SP request-target SP HTTP-version`.
fn parse_request_line(line: &[u8]) -> Result<(Method, String, Version), HttpError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::InvalidRequestLine);
    };
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return Err(HttpError::InvalidRequestLine);
    }
    let method = match method {
        b"GET" => Method::Get,
        b"PUT" => Method::Put,
        b"PATCH" => Method::Patch,
        // Only token characters, so ASCII: the lossy conversion changes nothing.
        other => Method::Other(String::from_utf8_lossy(other).into_owned()),
    };
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(HttpError::UnsupportedVersion);
        }
        _ => return Err(HttpError::InvalidRequestLine),
    };
    Ok((method, parse_target(target)?, version))
}

/// The path of a request target, without its query.
fn parse_target(target: &[u8]) -> Result<String, HttpError> {
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(HttpError::InvalidTarget);
    }
    let path = match strip_prefix_ignore_case(target, b"http://") {
        // Absolute form: the path starts at the first `/` after the authority.
        Some(authority_and_path) => {
            match authority_and_path
                .iter()
                .position(|&b| b == b'/' || b == b'?')
            {
                Some(start) => match authority_and_path.get(start..) {
                    Some(path) if path.starts_with(b"/") => path,
                    _ => b"/",
                },
                None => b"/",
            }
        }
        None if target.starts_with(b"/") => target,
        None => return Err(HttpError::InvalidTarget),
    };
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    // Only printable ASCII, so the lossy conversion changes nothing.
    Ok(String::from_utf8_lossy(path).into_owned())
}

/// `bytes` without `prefix`, compared without regard to ASCII case.
fn strip_prefix_ignore_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let (head, tail) = bytes.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then_some(tail)
}

/// `bytes` without the spaces and tabs around it.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |last| last.saturating_add(1));
    bytes.get(start..end).unwrap_or_default()
}

/// What the headers of a request say, as far as ember reads them.
#[derive(Debug, Default, Clone)]
struct Headers {
    content_length: usize,
    seen_content_length: bool,
    expect_continue: bool,
    close: bool,
    keep_alive: bool,
}

impl Headers {
    /// The head of a request with these headers, whose empty line ends before `head_len`.
    fn head(&self, method: &Method, path: &str, version: Version, head_len: usize) -> RequestHead {
        let keep_alive = match version {
            Version::Http11 => !self.close,
            Version::Http10 => self.keep_alive && !self.close,
        };
        RequestHead {
            method: method.clone(),
            path: path.to_string(),
            version,
            content_length: self.content_length,
            // A 100-continue expectation in an HTTP/1.0 request is to be ignored (RFC 9110,
            // section 10.1.1).
            expect_continue: self.expect_continue && version == Version::Http11,
            keep_alive,
            head_len,
        }
    }

    /// Checks one header line and records what it says.
    fn parse_line(&mut self, line: &[u8], max_body: usize) -> Result<(), HttpError> {
        // An obsolete line folding (a line that starts with white space) is refused (RFC 9112,
        // section 5.2).
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(HttpError::InvalidHeader);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HttpError::InvalidHeader)?;
        let (name, colon_value) = line
            .split_at_checked(colon)
            .ok_or(HttpError::InvalidHeader)?;
        let value = trim_ows(colon_value.get(1..).unwrap_or_default());
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err(HttpError::InvalidHeader);
        }
        // Visible characters, spaces, tabs and obs-text (RFC 9110, section 5.5).
        if !value
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80)
        {
            return Err(HttpError::InvalidHeader);
        }

        if name.eq_ignore_ascii_case(b"content-length") {
            if self.seen_content_length {
                return Err(HttpError::DuplicateContentLength);
            }
            self.seen_content_length = true;
            let size = parse_decimal(value).ok_or(HttpError::InvalidContentLength)?;
            self.content_length = usize::try_from(size)
                .ok()
                .filter(|&len| len <= max_body)
                .ok_or(HttpError::PayloadTooLarge {
                    size,
                    limit: max_body,
                })?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if name.eq_ignore_ascii_case(b"expect") {
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err(HttpError::UnsupportedExpectation);
            }
            self.expect_continue = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(trim_ows) {
                if option.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                }
            }
        }
        Ok(())
    }
}

/// `digits` as a number: one or more ASCII digits, no sign, no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The statuses the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    /// 200 OK: the answer carries a body.
    Ok,
    /// 204 No Content: the request was carried out.
    NoContent,
    /// 400 Bad Request: the request is malformed, unknown or was refused.
    BadRequest,
    /// 408 Request Timeout: a request did not arrive in time.
    RequestTimeout,
    /// 413 Payload Too Large: a `PUT` or `PATCH /mmds` would make the MMDS data store larger
    /// than its limit (Firecracker's status).
    PayloadTooLarge,
    /// 417 Expectation Failed: an `Expect` other than `100-continue`.
    ExpectationFailed,
    /// 500 Internal Server Error: the VMM did not answer.
    InternalServerError,
    /// 501 Not Implemented: a `Transfer-Encoding`.
    NotImplemented,
    /// 503 Service Unavailable: too many connections, or the server is stopping.
    ServiceUnavailable,
    /// 505 HTTP Version Not Supported: an HTTP version other than 1.0 and 1.1.
    HttpVersionNotSupported,
}

impl StatusCode {
    /// The three-digit code.
    pub fn code(self) -> u16 {
        match self {
            StatusCode::Ok => 200,
            StatusCode::NoContent => 204,
            StatusCode::BadRequest => 400,
            StatusCode::RequestTimeout => 408,
            StatusCode::PayloadTooLarge => 413,
            StatusCode::ExpectationFailed => 417,
            StatusCode::InternalServerError => 500,
            StatusCode::NotImplemented => 501,
            StatusCode::ServiceUnavailable => 503,
            StatusCode::HttpVersionNotSupported => 505,
        }
    }

    /// The reason phrase of the status line.
    pub fn reason(self) -> &'static str {
        match self {
            StatusCode::Ok => "OK",
            StatusCode::NoContent => "No Content",
            StatusCode::BadRequest => "Bad Request",
            StatusCode::RequestTimeout => "Request Timeout",
            StatusCode::PayloadTooLarge => "Payload Too Large",
            StatusCode::ExpectationFailed => "Expectation Failed",
            StatusCode::InternalServerError => "Internal Server Error",
            StatusCode::NotImplemented => "Not Implemented",
            StatusCode::ServiceUnavailable => "Service Unavailable",
            StatusCode::HttpVersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// A response, ready to be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body; ignored for 204.
    pub body: Vec<u8>,
}

impl Response {
    /// The bytes of the response.
    ///
    /// # Arguments
    ///
    /// * `keep_alive` - whether the connection stays open after it: `Connection: keep-alive`,
    ///   else `Connection: close`.
    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: {SERVER_NAME}\r\nConnection: {connection}\r\n",
            self.status.code(),
            self.status.reason(),
        );
        // A 204 carries neither a body nor a Content-Length (RFC 9110, section 8.6).
        if self.status == StatusCode::NoContent {
            out.push_str("\r\n");
            return out.into_bytes();
        }
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
            self.content_type,
            self.body.len()
        );
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(bytes: &[u8]) -> Request {
        let (request, used) = parse_request(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        request
    }

    #[test]
    fn a_get_without_body_parses() {
        let request = parse_one(b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(request.method, Method::Get);
        assert_eq!(request.path, "/machine-config");
        assert_eq!(request.version, Version::Http11);
        assert!(request.keep_alive);
        assert!(request.body.is_empty());
    }

    #[test]
    fn a_put_with_body_parses() {
        let request = parse_one(
            b"PUT /boot-source HTTP/1.1\r\nContent-Type: application/json\r\n\
              Content-Length: 7\r\n\r\n{\"a\":1}",
        );
        assert_eq!(request.method, Method::Put);
        assert_eq!(request.body, b"{\"a\":1}");
    }

    #[test]
    fn any_token_method_parses_and_keeps_its_spelling() {
        let request = parse_one(b"DELETE /drives/a HTTP/1.1\r\n\r\n");
        assert_eq!(request.method, Method::Other("DELETE".into()));
        assert_eq!(request.method.to_string(), "DELETE");
        assert_eq!(
            parse_one(b"PATCH /vm HTTP/1.1\r\n\r\n").method,
            Method::Patch
        );
        // Methods are case-sensitive.
        assert_eq!(
            parse_one(b"get / HTTP/1.1\r\n\r\n").method,
            Method::Other("get".into())
        );
    }

    #[test]
    fn the_query_is_dropped_and_absolute_targets_give_their_path() {
        assert_eq!(
            parse_one(b"GET /vm/config?x=1&y HTTP/1.1\r\n\r\n").path,
            "/vm/config"
        );
        assert_eq!(
            parse_one(b"GET http://localhost/machine-config HTTP/1.1\r\n\r\n").path,
            "/machine-config"
        );
        assert_eq!(
            parse_one(b"GET HTTP://localhost:80 HTTP/1.1\r\n\r\n").path,
            "/"
        );
        assert_eq!(
            parse_one(b"GET http://localhost?q HTTP/1.1\r\n\r\n").path,
            "/"
        );
    }

    #[test]
    fn bad_targets_are_refused() {
        for line in [
            &b"GET machine-config HTTP/1.1\r\n\r\n"[..],
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET /a\x7fb HTTP/1.1\r\n\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse_request(line),
                Err(HttpError::InvalidTarget),
                "{line:?}"
            );
        }
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        for line in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 \r\n\r\n",
            b" GET / HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"\x00\x01\x02\r\n\r\n",
        ] {
            assert_eq!(
                parse_request(line),
                Err(HttpError::InvalidRequestLine),
                "{line:?}"
            );
        }
    }

    #[test]
    fn other_http_versions_are_refused_with_505() {
        for line in [&b"GET / HTTP/2.0\r\n\r\n"[..], b"GET / HTTP/0.9\r\n\r\n"] {
            let err = parse_request(line).unwrap_err();
            assert_eq!(err, HttpError::UnsupportedVersion);
            assert_eq!(err.status(), StatusCode::HttpVersionNotSupported);
        }
    }

    #[test]
    fn http10_closes_unless_asked_to_keep_alive() {
        let request = parse_one(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(request.version, Version::Http10);
        assert!(!request.keep_alive);
        assert!(parse_one(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn connection_close_is_honoured() {
        assert!(!parse_one(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parse_one(b"GET / HTTP/1.1\r\nconnection: TE, Close\r\n\r\n").keep_alive);
        assert!(parse_one(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn header_names_are_case_insensitive_and_values_trimmed() {
        let request = parse_one(b"PUT /x HTTP/1.1\r\ncOnTeNt-LeNgTh: \t 2 \t\r\n\r\n{}");
        assert_eq!(request.body, b"{}");
    }

    #[test]
    fn pipelined_requests_parse_one_after_the_other() {
        let bytes = b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\
                      GET /b HTTP/1.1\r\n\r\n\
                      PATCH /c HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz";
        let mut rest = &bytes[..];
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let (request, used) = parse_request(rest).unwrap().unwrap();
            seen.push((request.method, request.path, request.body));
            rest = &rest[used..];
        }
        assert_eq!(
            seen,
            vec![
                (Method::Put, "/a".to_string(), b"{}".to_vec()),
                (Method::Get, "/b".to_string(), Vec::new()),
                (Method::Patch, "/c".to_string(), b"xyz".to_vec()),
            ]
        );
    }

    #[test]
    fn empty_lines_before_a_request_are_skipped() {
        let bytes = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (_, used) = parse_request(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn every_prefix_of_a_request_needs_more_bytes() {
        let bytes = b"PUT /drives/rootfs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 21\r\n\
                      Accept: */*\r\n\r\n{\"drive_id\":\"rootfs\"}";
        for len in 0..bytes.len() {
            assert_eq!(
                parse_request(&bytes[..len]),
                Ok(None),
                "prefix of {len} bytes"
            );
        }
        let request = parse_one(bytes);
        assert_eq!(request.body, b"{\"drive_id\":\"rootfs\"}");
    }

    #[test]
    fn the_head_is_complete_before_the_body() {
        let bytes = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(parse_request(bytes), Ok(None));
        let head = parse_head(bytes).unwrap().unwrap();
        assert!(head.expect_continue);
        assert_eq!(head.content_length, 5);
        assert_eq!(head.head_len, bytes.len());
        // Nothing of the head is there for a prefix.
        assert_eq!(parse_head(&bytes[..bytes.len() - 1]), Ok(None));
    }

    #[test]
    fn expect_100_continue_is_ignored_in_http10() {
        let head =
            parse_head(b"PUT /x HTTP/1.0\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(!head.expect_continue);
    }

    #[test]
    fn other_expectations_are_refused_with_417() {
        let err = parse_request(b"PUT /x HTTP/1.1\r\nExpect: 200-ok\r\n\r\n").unwrap_err();
        assert_eq!(err, HttpError::UnsupportedExpectation);
        assert_eq!(err.status(), StatusCode::ExpectationFailed);
    }

    #[test]
    fn the_largest_head_is_accepted() {
        let mut bytes = b"GET / HTTP/1.1\r\nX: ".to_vec();
        bytes.resize(MAX_HEAD_LEN - 4, b'a');
        bytes.extend_from_slice(b"\r\n\r\n");
        assert_eq!(bytes.len(), MAX_HEAD_LEN);
        parse_one(&bytes);
    }

    #[test]
    fn a_head_over_the_limit_is_refused() {
        let mut bytes = b"GET / HTTP/1.1\r\nX: ".to_vec();
        bytes.resize(MAX_HEAD_LEN - 3, b'a');
        bytes.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_request(&bytes),
            Err(HttpError::HeadTooLarge {
                limit: MAX_HEAD_LEN
            })
        );
        // Refused as soon as the limit is reached without an end.
        assert_eq!(
            parse_request(&bytes[..MAX_HEAD_LEN]),
            Err(HttpError::HeadTooLarge {
                limit: MAX_HEAD_LEN
            })
        );
        assert_eq!(parse_request(&bytes[..MAX_HEAD_LEN - 1]), Ok(None));
        // An endless request line too.
        assert!(matches!(
            parse_request(&[b'A'; MAX_HEAD_LEN + 10]),
            Err(HttpError::HeadTooLarge { .. })
        ));
    }

    #[test]
    fn the_largest_body_is_accepted() {
        let mut bytes =
            format!("PUT /x HTTP/1.1\r\nContent-Length: {MAX_BODY_LEN}\r\n\r\n").into_bytes();
        bytes.resize(bytes.len() + MAX_BODY_LEN, b'x');
        assert_eq!(parse_one(&bytes).body.len(), MAX_BODY_LEN);
    }

    #[test]
    fn a_parser_with_another_body_limit_applies_it_and_keeps_it_across_requests() {
        let mut parser = RequestParser::with_body_limit(4);
        assert_eq!(parser.body_limit(), 4);
        let fits = b"PUT /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
        let (request, used) = parser.parse(fits).unwrap().unwrap();
        assert_eq!((request.body.as_slice(), used), (&b"abcd"[..], fits.len()));
        parser.reset();
        assert_eq!(parser.body_limit(), 4);
        let over = b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde";
        assert_eq!(
            parser.parse(over).unwrap_err(),
            HttpError::PayloadTooLarge { size: 5, limit: 4 }
        );
        // 0: only requests without a body.
        let mut parser = RequestParser::with_body_limit(0);
        assert!(parser.parse(b"GET / HTTP/1.1\r\n\r\n").unwrap().is_some());
        parser.reset();
        assert!(
            parser
                .parse(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\n\r\n")
                .is_err()
        );
        assert_eq!(RequestParser::new().body_limit(), MAX_BODY_LEN);
    }

    #[test]
    fn a_body_over_the_limit_is_refused_before_it_arrives() {
        let bytes = b"PUT /x HTTP/1.1\r\nContent-Length: 51201\r\n";
        let err = parse_request(bytes).unwrap_err();
        assert_eq!(
            err,
            HttpError::PayloadTooLarge {
                size: 51201,
                limit: MAX_BODY_LEN
            }
        );
        assert_eq!(err.status(), StatusCode::BadRequest);
        assert_eq!(
            err.to_string(),
            "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
        );
        // Even a Content-Length that does not fit in a usize on any machine.
        let err = parse_request(b"PUT /x HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n")
            .unwrap_err();
        assert!(matches!(
            err,
            HttpError::PayloadTooLarge { size: u64::MAX, .. }
        ));
    }

    #[test]
    fn bad_content_lengths_are_refused() {
        for value in [
            "",
            "-1",
            "+1",
            "1 2",
            "0x10",
            "1.0",
            "18446744073709551616",
            "٣",
        ] {
            let bytes = format!("PUT /x HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(
                parse_request(bytes.as_bytes()),
                Err(HttpError::InvalidContentLength),
                "{value:?}"
            );
        }
        assert_eq!(
            parse_request(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
            Err(HttpError::DuplicateContentLength)
        );
    }

    #[test]
    fn transfer_encoding_is_refused_with_501() {
        for value in ["chunked", "identity", "gzip, chunked"] {
            let bytes = format!("PUT /x HTTP/1.1\r\nTransfer-Encoding: {value}\r\n\r\n");
            let err = parse_request(bytes.as_bytes()).unwrap_err();
            assert_eq!(err, HttpError::TransferEncoding);
            assert_eq!(err.status(), StatusCode::NotImplemented);
        }
    }

    #[test]
    fn bare_line_feeds_and_carriage_returns_are_refused() {
        for bytes in [
            &b"GET / HTTP/1.1\n\n"[..],
            b"GET / HTTP/1.1\r\nA: b\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            b"GET /\r HTTP/1.1",
        ] {
            assert_eq!(
                parse_request(bytes),
                Err(HttpError::BadLineEnding),
                "{bytes:?}"
            );
        }
        // A CR last may still be followed by its LF.
        assert_eq!(parse_request(b"GET / HTTP/1.1\r"), Ok(None));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for line in [
            &b"NoColon"[..],
            b": empty-name",
            b"Sp ace: x",
            b"Name : x",
            b" folded: x",
            b"\tfolded: x",
            b"Ctl: a\x01b",
            b"Nul: a\x00b",
        ] {
            let mut bytes = b"GET / HTTP/1.1\r\n".to_vec();
            bytes.extend_from_slice(line);
            bytes.extend_from_slice(b"\r\n\r\n");
            assert_eq!(
                parse_request(&bytes),
                Err(HttpError::InvalidHeader),
                "{line:?}"
            );
        }
        // Values may hold obs-text.
        parse_one(b"GET / HTTP/1.1\r\nUser-Agent: caf\xc3\xa9\r\n\r\n");
    }

    /// Feeds `bytes` to one parser a byte at a time, as a client that writes one byte per
    /// `write` does; returns the last outcome and the parser.
    fn feed_byte_by_byte(
        bytes: &[u8],
    ) -> (Result<Option<(Request, usize)>, HttpError>, RequestParser) {
        let mut parser = RequestParser::new();
        let mut outcome = Ok(None);
        for end in 0..=bytes.len() {
            outcome = parser.parse(&bytes[..end]);
            if !matches!(outcome, Ok(None)) {
                break;
            }
        }
        (outcome, parser)
    }

    #[test]
    fn a_head_fed_one_byte_at_a_time_is_scanned_once() {
        // The largest head: a request line, then headers up to the limit.
        let mut head = b"PUT /machine-config HTTP/1.1\r\nContent-Length: 2\r\n".to_vec();
        while head.len() + 40 < MAX_HEAD_LEN {
            head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let request = [head.as_slice(), b"{}"].concat();
        let (outcome, parser) = feed_byte_by_byte(&request);
        let (parsed, used) = outcome.unwrap().unwrap();
        assert_eq!(
            (parsed.body.as_slice(), used),
            (b"{}".as_slice(), request.len())
        );
        // Linear: each byte of the head once, where parsing the whole buffer again at every
        // byte would examine about head.len()^2 / 2 of them.
        assert_eq!(parser.bytes_scanned(), head.len());
    }

    #[test]
    fn the_incremental_parser_agrees_with_the_one_shot_parser() {
        let requests: [&[u8]; 8] = [
            b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad\rHeader: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n",
        ];
        for request in requests {
            let mut expected = Ok(None);
            for end in 0..=request.len() {
                expected = parse_request(&request[..end]);
                if !matches!(expected, Ok(None)) {
                    break;
                }
            }
            let (outcome, _) = feed_byte_by_byte(request);
            assert_eq!(outcome, expected, "{}", String::from_utf8_lossy(request));
        }
    }

    #[test]
    fn a_reset_parser_parses_the_next_request() {
        let bytes = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let mut parser = RequestParser::new();
        let (first, used) = parser.parse(bytes).unwrap().unwrap();
        assert_eq!(first.path, "/a");
        assert!(parser.head().is_some());
        parser.reset();
        assert!(parser.head().is_none());
        let (second, _) = parser.parse(&bytes[used..]).unwrap().unwrap();
        assert_eq!(second.path, "/b");
        assert_eq!(parser.bytes_scanned(), bytes.len());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every error path is reachable from these.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"GETPUT /:\r\n 0123456789HTTP/1.1Content-Length\x00\xff";
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 200) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let _ = parse_request(&bytes);
            let _ = parse_request(&[b"PUT /x HTTP/1.1\r\n".as_slice(), &bytes].concat());
            let _ = feed_byte_by_byte(&bytes);
        }
    }

    #[test]
    fn responses_are_encoded_like_firecrackers() {
        let response = Response {
            status: StatusCode::BadRequest,
            content_type: "application/json",
            body: b"{\"fault_message\":\"x\"}".to_vec(),
        };
        assert_eq!(
            String::from_utf8(response.encode(true)).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"fault_message\":\"x\"}"
        );
        let no_content = Response {
            status: StatusCode::NoContent,
            content_type: "application/json",
            body: b"ignored".to_vec(),
        };
        assert_eq!(
            String::from_utf8(no_content.encode(false)).unwrap(),
            "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn every_status_has_its_code_and_reason() {
        for (status, code) in [
            (StatusCode::Ok, 200),
            (StatusCode::NoContent, 204),
            (StatusCode::BadRequest, 400),
            (StatusCode::RequestTimeout, 408),
            (StatusCode::ExpectationFailed, 417),
            (StatusCode::InternalServerError, 500),
            (StatusCode::NotImplemented, 501),
            (StatusCode::ServiceUnavailable, 503),
            (StatusCode::HttpVersionNotSupported, 505),
            (StatusCode::PayloadTooLarge, 413),
        ] {
            assert_eq!(status.code(), code);
            assert!(!status.reason().is_empty());
        }
    }
}
