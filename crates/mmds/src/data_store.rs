//! The MMDS data store: one JSON document, its size limit, the MMDS version and the session
//! tokens.
//!
//! The operator fills the store ([`Mmds::put`] replaces it, [`Mmds::patch`] applies a JSON
//! merge patch, RFC 7396); the guest reads it by path ([`Mmds::get_path`]). The serialized
//! document never grows past the store's limit: a `put` or `patch` that would exceed it is
//! refused and leaves the store as it was.

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::token::{self, Clock, MonotonicClock, TokenAuthority};

/// The default limit of the serialized store, in bytes: Firecracker's default API payload limit.
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

/// Errors of the data store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `put` or `patch` would make the store larger than its limit.
    #[error("The MMDS patch request doesn't fit.")]
    DataStoreLimitExceeded,
    /// `patch` before any `put`.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// No value at the path.
    #[error("The MMDS resource does not exist.")]
    NotFound,
    /// The value at the path has no IMDS form (only objects and strings have one).
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
    /// A token could not be made.
    #[error("Token authority error")]
    Token(#[from] token::Error),
}

/// The module's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// The MMDS version: how guests are let in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MmdsVersion {
    /// Any `GET` is answered; a token is accepted but not required.
    #[default]
    V1,
    /// A `GET` needs a live session token in `X-metadata-token`.
    V2,
}

impl fmt::Display for MmdsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmdsVersion::V1 => f.write_str("V1"),
            MmdsVersion::V2 => f.write_str("V2"),
        }
    }
}

/// How a value is written in an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputFormat {
    /// The JSON text of the value (`Accept: application/json`).
    Json,
    /// IMDS text: a string as itself, an object as its keys one per line, the key of a nested
    /// object followed by `/`.
    Imds,
}

/// The microVM metadata service's state: the data store, its limit, the version and the
/// session tokens. A VMM shares one between its API and every network stack that serves it,
/// behind a `Mutex`.
#[derive(Debug)]
pub struct Mmds {
    /// `None` until the first `put`.
    data: Option<Value>,
    size_limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: TokenAuthority,
}

impl Default for Mmds {
    fn default() -> Self {
        Self::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store whose serialized content may hold at most `size_limit` bytes, version V1,
    /// its tokens on the system's monotonic clock.
    pub fn new(size_limit: usize) -> Self {
        Self::with_clock(size_limit, Box::new(MonotonicClock))
    }

    /// As [`Mmds::new`], with the tokens' expiry measured on `clock`.
    pub fn with_clock(size_limit: usize, clock: Box<dyn Clock>) -> Self {
        Mmds {
            data: None,
            size_limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: TokenAuthority::new(clock),
        }
    }

    /// The limit of the serialized store, in bytes.
    pub fn size_limit(&self) -> usize {
        self.size_limit
    }

    /// Sets the limit of the serialized store. The content already there stays.
    pub fn set_size_limit(&mut self, size_limit: usize) {
        self.size_limit = size_limit;
    }

    /// The MMDS version.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// Sets the MMDS version. Tokens already given stay valid.
    pub fn set_version(&mut self, version: MmdsVersion) {
        self.version = version;
    }

    /// Whether answers are always IMDS text, whatever the request's `Accept` says (as EC2's
    /// IMDS answers).
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// Sets whether answers are always IMDS text.
    pub fn set_imds_compat(&mut self, imds_compat: bool) {
        self.imds_compat = imds_compat;
    }

    /// Whether a `put` has filled the store.
    pub fn is_initialized(&self) -> bool {
        self.data.is_some()
    }

    /// The store's content, `None` before the first `put`.
    pub fn value(&self) -> Option<&Value> {
        self.data.as_ref()
    }

    /// Replaces the store's content with `data`.
    ///
    /// # Errors
    /// [`Error::DataStoreLimitExceeded`] when `data` serialized is larger than the limit; the
    /// store is then unchanged.
    pub fn put(&mut self, data: Value) -> Result<()> {
        self.check_size(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// Applies `patch` to the store as a JSON merge patch (RFC 7396): an object's members are
    /// merged key by key, a `null` member removes the key, anything else replaces the target.
    ///
    /// # Errors
    /// [`Error::NotInitialized`] before the first `put`; [`Error::DataStoreLimitExceeded`]
    /// when the result would be larger than the limit. The store is then unchanged.
    pub fn patch(&mut self, patch: &Value) -> Result<()> {
        let current = self.data.as_ref().ok_or(Error::NotInitialized)?;
        let mut patched = current.clone();
        merge_patch(&mut patched, patch);
        self.check_size(&patched)?;
        self.data = Some(patched);
        Ok(())
    }

    /// The value at `path`, written in `format` (or as IMDS text whatever `format` is, under
    /// [`Mmds::imds_compat`]).
    ///
    /// `path` is the request's path: `/` for the whole store, then keys (and array indices)
    /// separated by `/` as in a JSON pointer (RFC 6901, `~0` for `~` and `~1` for `/`). Empty
    /// segments (`//`, a trailing `/`) are ignored.
    ///
    /// # Errors
    /// [`Error::NotFound`] when nothing is at `path` (or the store was never filled);
    /// [`Error::UnsupportedValueType`] for IMDS text of a value other than an object or a
    /// string.
    pub fn get_path(&self, path: &str, format: OutputFormat) -> Result<String> {
        let data = self.data.as_ref().ok_or(Error::NotFound)?;
        let value = lookup(data, path).ok_or(Error::NotFound)?;
        match (format, self.imds_compat) {
            (OutputFormat::Json, false) => Ok(value.to_string()),
            _ => format_imds(value),
        }
    }

    /// Makes a session token valid for `ttl_seconds` seconds.
    ///
    /// # Errors
    /// [`Error::Token`] when the time to live is not within 1..=21600 or no random bytes
    /// could be read.
    pub fn generate_token(&mut self, ttl_seconds: u32) -> Result<String> {
        Ok(self.tokens.generate(ttl_seconds)?)
    }

    /// Whether `token` is a live session token.
    pub fn is_valid_token(&self, token: &str) -> bool {
        self.tokens.is_valid(token)
    }

    fn check_size(&self, value: &Value) -> Result<()> {
        let mut counter = ByteCounter {
            len: 0,
            limit: self.size_limit,
        };
        // The only error is the counter's own, when the limit is passed: it stops the
        // serialization there rather than writing the rest.
        serde_json::to_writer(&mut counter, value).map_err(|_| Error::DataStoreLimitExceeded)
    }
}

/// A writer that counts bytes and fails once they pass `limit`.
struct ByteCounter {
    len: usize,
    limit: usize,
}

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.len = self.len.saturating_add(buf.len());
        if self.len > self.limit {
            return Err(io::Error::other("over the limit"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Applies `patch` to `target` as RFC 7396 says.
///
/// The recursion is as deep as `patch`'s objects are nested; JSON parsed by serde_json nests at
/// most 128 levels.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.as_str()).or_insert(Value::Null), value);
        }
    }
}

/// The value at the request path `path`, segments split on `/`, empty ones skipped.
fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = root;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        let key = unescape(segment);
        current = match current {
            Value::Object(map) => map.get(key.as_ref())?,
            Value::Array(list) => {
                // RFC 6901: an index is digits without a leading zero.
                if key.is_empty()
                    || !key.bytes().all(|b| b.is_ascii_digit())
                    || (key.len() > 1 && key.starts_with('0'))
                {
                    return None;
                }
                list.get(key.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(current)
}

/// A JSON pointer segment's key: `~1` is `/`, `~0` is `~`.
fn unescape(segment: &str) -> std::borrow::Cow<'_, str> {
    if segment.contains('~') {
        segment.replace("~1", "/").replace("~0", "~").into()
    } else {
        segment.into()
    }
}

/// IMDS text: an object's keys one per line (a nested object's with a trailing `/`), a string as
/// itself.
fn format_imds(value: &Value) -> Result<String> {
    match value {
        Value::Object(map) => {
            let keys: Vec<String> = map
                .iter()
                .map(|(key, value)| {
                    if value.is_object() {
                        format!("{key}/")
                    } else {
                        key.clone()
                    }
                })
                .collect();
            Ok(keys.join("\n"))
        }
        Value::String(s) => Ok(s.clone()),
        _ => Err(Error::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn filled(data: Value) -> Mmds {
        let mut mmds = Mmds::default();
        mmds.put(data).unwrap();
        mmds
    }

    fn patched(target: Value, patch: Value) -> Value {
        let mut target = target;
        merge_patch(&mut target, &patch);
        target
    }

    #[test]
    fn merge_patch_follows_the_examples_of_rfc_7396() {
        // RFC 7396, Appendix A: (original, patch, result).
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (original, patch, result) in cases {
            assert_eq!(
                patched(original.clone(), patch.clone()),
                result,
                "{original} + {patch}"
            );
        }
    }

    #[test]
    fn patch_before_put_is_refused() {
        let mut mmds = Mmds::default();
        assert!(matches!(
            mmds.patch(&json!({"a": "b"})),
            Err(Error::NotInitialized)
        ));
        assert!(!mmds.is_initialized());
        assert_eq!(mmds.value(), None);
    }

    #[test]
    fn put_replaces_and_patch_merges() {
        let mut mmds = filled(json!({"a": {"b": "c"}, "d": "e"}));
        mmds.put(json!({"x": "y"})).unwrap();
        assert_eq!(mmds.value(), Some(&json!({"x": "y"})));
        mmds.patch(&json!({"x": null, "z": {"w": "v"}})).unwrap();
        assert_eq!(mmds.value(), Some(&json!({"z": {"w": "v"}})));
    }

    #[test]
    fn a_put_or_patch_past_the_limit_is_refused_and_changes_nothing() {
        let mut mmds = Mmds::new(20);
        // `{"a":"0123456789"}` is 18 bytes.
        mmds.put(json!({"a": "0123456789"})).unwrap();
        let big = json!({"a": "0123456789abc"});
        assert!(matches!(
            mmds.put(big.clone()),
            Err(Error::DataStoreLimitExceeded)
        ));
        assert!(matches!(
            mmds.patch(&json!({"b": "c"})),
            Err(Error::DataStoreLimitExceeded)
        ));
        assert_eq!(mmds.value(), Some(&json!({"a": "0123456789"})));
        // Exactly at the limit fits: `{"a":"0123456789ab"}` is 20 bytes.
        mmds.patch(&json!({"a": "0123456789ab"})).unwrap();
        // A patch that shrinks the store is fine even when the patch itself is large.
        mmds.set_size_limit(2);
        assert!(mmds.patch(&json!({"a": null})).is_ok());
        assert_eq!(mmds.value(), Some(&json!({})));
    }

    #[test]
    fn imds_text_lists_keys_with_a_slash_after_nested_objects() {
        let mmds = filled(json!({
            "latest": {"meta-data": {"ami-id": "ami-1", "network": {"mac": "aa"}, "n": 1}},
            "user-data": "hello\nworld",
        }));
        assert_eq!(
            mmds.get_path("/", OutputFormat::Imds).unwrap(),
            "latest/\nuser-data"
        );
        assert_eq!(
            mmds.get_path("/latest/meta-data", OutputFormat::Imds)
                .unwrap(),
            "ami-id\nn\nnetwork/"
        );
        assert_eq!(
            mmds.get_path("/latest/meta-data/ami-id", OutputFormat::Imds)
                .unwrap(),
            "ami-1"
        );
        assert_eq!(
            mmds.get_path("/user-data", OutputFormat::Imds).unwrap(),
            "hello\nworld"
        );
    }

    #[test]
    fn json_answers_are_the_value_itself() {
        let mmds = filled(json!({"a": {"b": "c"}, "n": 43, "l": ["x", "y"]}));
        assert_eq!(
            mmds.get_path("/a", OutputFormat::Json).unwrap(),
            r#"{"b":"c"}"#
        );
        assert_eq!(mmds.get_path("/a/b", OutputFormat::Json).unwrap(), r#""c""#);
        assert_eq!(mmds.get_path("/n", OutputFormat::Json).unwrap(), "43");
        assert_eq!(
            mmds.get_path("/l", OutputFormat::Json).unwrap(),
            r#"["x","y"]"#
        );
    }

    #[test]
    fn lists_are_read_by_index_and_have_no_imds_text() {
        let mmds = filled(json!({"l": ["x", {"k": "v"}], "n": 1, "t": true, "z": null}));
        assert_eq!(mmds.get_path("/l/0", OutputFormat::Imds).unwrap(), "x");
        assert_eq!(mmds.get_path("/l/1/", OutputFormat::Imds).unwrap(), "k");
        assert_eq!(mmds.get_path("/l/1/k", OutputFormat::Imds).unwrap(), "v");
        for path in ["/l", "/l/", "/n", "/t", "/z"] {
            assert!(
                matches!(
                    mmds.get_path(path, OutputFormat::Imds),
                    Err(Error::UnsupportedValueType)
                ),
                "{path}"
            );
        }
        for path in [
            "/l/2",
            "/l/01",
            "/l/-1",
            "/l/+1",
            "/l/x",
            "/l/99999999999999999999999",
        ] {
            assert!(
                matches!(
                    mmds.get_path(path, OutputFormat::Json),
                    Err(Error::NotFound)
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn paths_skip_empty_segments_and_unescape_tildes() {
        let mmds = filled(json!({"a": {"b/c": "slash", "d~e": "tilde"}}));
        assert_eq!(
            mmds.get_path("//a///b~1c", OutputFormat::Imds).unwrap(),
            "slash"
        );
        assert_eq!(
            mmds.get_path("/a/d~0e/", OutputFormat::Imds).unwrap(),
            "tilde"
        );
        assert!(matches!(
            mmds.get_path("/a/missing", OutputFormat::Imds),
            Err(Error::NotFound)
        ));
        assert!(matches!(
            mmds.get_path("/a/b~1c/deeper", OutputFormat::Imds),
            Err(Error::NotFound)
        ));
    }

    #[test]
    fn an_empty_store_answers_not_found() {
        let mmds = Mmds::default();
        assert!(matches!(
            mmds.get_path("/", OutputFormat::Json),
            Err(Error::NotFound)
        ));
    }

    #[test]
    fn imds_compat_answers_imds_text_whatever_the_format() {
        let mut mmds = filled(json!({"a": {"b": "c"}, "n": 1}));
        mmds.set_imds_compat(true);
        assert_eq!(mmds.get_path("/a", OutputFormat::Json).unwrap(), "b");
        assert!(matches!(
            mmds.get_path("/n", OutputFormat::Json),
            Err(Error::UnsupportedValueType)
        ));
    }

    #[test]
    fn the_version_defaults_to_v1_and_prints_as_firecracker_spells_it() {
        let mut mmds = Mmds::default();
        assert_eq!(mmds.version(), MmdsVersion::V1);
        mmds.set_version(MmdsVersion::V2);
        assert_eq!(mmds.version().to_string(), "V2");
        assert_eq!(
            serde_json::from_str::<MmdsVersion>(r#""V1""#).unwrap(),
            MmdsVersion::V1
        );
        assert!(serde_json::from_str::<MmdsVersion>(r#""v2""#).is_err());
    }

    #[test]
    fn tokens_come_from_the_store_and_expire_on_its_clock() {
        let clock = token::ManualClock::new();
        let mut mmds = Mmds::with_clock(100, Box::new(clock.clone()));
        let token = mmds.generate_token(5).unwrap();
        assert!(mmds.is_valid_token(&token));
        clock.advance(std::time::Duration::from_secs(5));
        assert!(!mmds.is_valid_token(&token));
        assert!(matches!(mmds.generate_token(0), Err(Error::Token(_))));
    }
}
