//! A small logger for `ember`: leveled lines stamped with the time since process start, on
//! stderr until `PUT /logger` sends them to a file or named pipe.
//!
//! The console of the guest goes to stdout (or a file); the VMM's own messages go to stderr so the
//! two never interleave inside a line.
//!
//! A guest can make the VMM log (a device reset in a loop, a stream of malformed requests), and
//! a reader of the log can stop reading. Neither may fill the host's disk or stall a vCPU or a
//! device worker, so:
//!
//! - **Every call site is rate-limited**, at every level: a token bucket per source file and
//!   line lets [`BURST`] lines through at once, then one per [`REFILL`]. Lines beyond that are
//!   dropped and counted ([`LoggerStats::rate_limited_log_count`]); the next line of that call
//!   site that gets through says how many of its lines were suppressed. The table of buckets
//!   holds at most [`MAX_CALL_SITES`] call sites; lines of any further one share one bucket.
//! - **A file or named pipe is opened non-blocking** ([`open_sink`]), as Firecracker opens its
//!   log and metrics FIFOs. A named pipe with no reader is refused ([`Error::NoReader`]), since
//!   the open would otherwise wait for one. Regular files are appended to as before.
//! - **One line is one `write`**: a line is formatted into one reused buffer of at most
//!   [`MAX_LINE`] bytes (a longer one is cut and ends with `[truncated]`) and written with one
//!   `write(2)`. [`MAX_LINE`] is `PIPE_BUF`, so a pipe takes a line whole or not at all: a line
//!   that does not fit is dropped and counted ([`LoggerStats::missed_log_count`]), never waited
//!   for, and never interleaves with another. Should a sink take part of a line, the rest is
//!   dropped (and counted) and the next line starts on a line of its own.
//!
//! Standard error is written the same way. When it is a pipe (an orchestrator that captures
//! it, a shell pipeline), a reader that stops would make writes wait, and setting the
//! non-blocking flag on it would change the file description `ember` shares with the process
//! that started it; so [`init`] opens the pipe again, as a description of its own that does not
//! block ([`reopen_nonblocking`]), and writes there. Any other standard error (a terminal, a
//! file, a socket) is written as it is; the rate limit bounds what a guest can make `ember`
//! write there. So is a pipe where there is no `/proc` to open it again through (in a jail):
//! there, give the log a named pipe of its own (`PUT /logger`), or start the jail with its
//! standard error on `/dev/null` (the jailer's `--daemonize`).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines one call site may write at once before its rate limit applies.
pub const BURST: u32 = 10;

/// How often a rate-limited call site gets one more line.
pub const REFILL: Duration = Duration::from_secs(1);

/// The most call sites with a bucket of their own; lines of any other share one bucket.
pub const MAX_CALL_SITES: usize = 1024;

/// The longest line written, its newline included: `PIPE_BUF`, the most a pipe takes whole.
pub const MAX_LINE: usize = 4096;

/// What ends a line cut at [`MAX_LINE`].
const TRUNCATED: &str = " [truncated]";

/// Errors of the log and metrics sinks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A named pipe has no reader: opened non-blocking for writing, it cannot be opened before
    /// one.
    #[error(
        "Cannot open the {what} {}: no process has the named pipe open for reading; start its reader first",
        path.display()
    )]
    NoReader {
        /// What the file is for: `log file` or `metrics file`.
        what: &'static str,
        /// The named pipe.
        path: PathBuf,
    },
    /// A file cannot be opened or created.
    #[error("Cannot open the {what} {}", path.display())]
    Open {
        /// What the file is for: `log file` or `metrics file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`configure`] was called before [`init`].
    #[error("The logger is not installed")]
    NotInstalled,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Opens `path` for appending without ever blocking: a regular file is created if needed, a
/// named pipe must have a reader, and writes to a pipe that is full fail at once rather than
/// wait. `what` names the file in errors.
///
/// # Errors
///
/// [`Error::NoReader`] for a named pipe nobody reads, [`Error::Open`] when the file cannot be
/// opened or created.
pub fn open_sink(what: &'static str, path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| {
            let path = path.to_path_buf();
            if source.raw_os_error() == Some(libc::ENXIO) {
                Error::NoReader { what, path }
            } else {
                Error::Open { what, path, source }
            }
        })
}

/// `fd` opened again for writing, non-blocking, as a file description of its own, when it is a
/// pipe or named pipe (through `/proc/self/fd`, which opens the pipe itself, not a duplicate of
/// the descriptor); `None` for anything else, or when `/proc` is not there.
pub fn reopen_nonblocking(fd: BorrowedFd<'_>) -> Option<File> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if !std::fs::metadata(&path).ok()?.file_type().is_fifo() {
        return None;
    }
    OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()
}

/// The logger's counters, with Firecracker's names where it has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoggerStats {
    /// Lines dropped, whole or in part, because the sink did not take them at once (a pipe
    /// whose reader does not keep up).
    pub missed_log_count: u64,
    /// Lines the sink failed to take for another reason.
    pub log_fails: u64,
    /// Lines a call site's rate limit suppressed.
    pub rate_limited_log_count: u64,
}

/// The logger's counters, all zero when it is not installed.
pub fn stats() -> LoggerStats {
    LOGGER.get().map(Logger::stats).unwrap_or_default()
}

/// How lines are written, and where.
struct Settings {
    level: LevelFilter,
    show_level: bool,
    show_origin: bool,
    /// Only records whose module path starts with this are written.
    module: Option<String>,
    out: Box<dyn Write + Send>,
}

/// One call site's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When tokens were last added.
    refilled: Instant,
    /// Lines suppressed since the last one written.
    suppressed: u64,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            tokens: BURST,
            refilled: now,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`; if so, how many were suppressed before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let periods =
            now.saturating_duration_since(self.refilled).as_nanos() / REFILL.as_nanos().max(1);
        if periods > 0 {
            let added = u32::try_from(periods).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(added).min(BURST);
            // A bucket that is not full keeps the part of a period that has passed.
            self.refilled = if self.tokens == BURST {
                now
            } else {
                REFILL
                    .checked_mul(added)
                    .and_then(|d| self.refilled.checked_add(d))
                    .unwrap_or(now)
            };
        }
        if self.tokens == 0 {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The buckets of the call sites, by a hash of file and line (two sites that collide share
/// one), at most [`MAX_CALL_SITES`] of them.
#[derive(Debug)]
struct RateLimits {
    sites: HashMap<u64, Bucket>,
    /// The bucket of the call sites that found the table full.
    overflow: Option<Bucket>,
}

impl RateLimits {
    fn new() -> Self {
        RateLimits {
            sites: HashMap::new(),
            overflow: None,
        }
    }

    fn admit(&mut self, record: &Record<'_>, now: Instant) -> Option<u64> {
        let mut hasher = DefaultHasher::new();
        record
            .file()
            .or(record.module_path())
            .unwrap_or_default()
            .hash(&mut hasher);
        record.line().hash(&mut hasher);
        let key = hasher.finish();
        let full = self.sites.len() >= MAX_CALL_SITES;
        let bucket = match self.sites.get_mut(&key) {
            Some(bucket) => bucket,
            None if full => self.overflow.get_or_insert_with(|| Bucket::new(now)),
            None => self.sites.entry(key).or_insert_with(|| Bucket::new(now)),
        };
        bucket.admit(now)
    }
}

/// Everything a line is written with, behind one lock.
struct State {
    settings: Settings,
    limits: RateLimits,
    /// The line being written, kept to reuse its allocation.
    line: Vec<u8>,
    /// The sink took only part of the last line: the next one starts with a newline.
    cut: bool,
}

struct Logger {
    start: Instant,
    state: Mutex<State>,
    missed: AtomicU64,
    fails: AtomicU64,
    rate_limited: AtomicU64,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// A `fmt::Write` into a buffer that stops at a limit, cutting at a character boundary.
struct Bounded<'a> {
    buf: &'a mut Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.limit.saturating_sub(self.buf.len());
        if s.len() <= room {
            self.buf.extend_from_slice(s.as_bytes());
            return Ok(());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.buf.extend_from_slice(&s.as_bytes()[..cut]);
        self.truncated = true;
        // Stops the formatting: nothing more fits.
        Err(fmt::Error)
    }
}

impl Logger {
    fn new(start: Instant, level: LevelFilter, out: Box<dyn Write + Send>) -> Self {
        Logger {
            start,
            state: Mutex::new(State {
                settings: Settings {
                    level,
                    show_level: true,
                    show_origin: false,
                    module: None,
                    out,
                },
                limits: RateLimits::new(),
                line: Vec::new(),
                cut: false,
            }),
            missed: AtomicU64::new(0),
            fails: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> LoggerStats {
        LoggerStats {
            missed_log_count: self.missed.load(Ordering::Relaxed),
            log_fails: self.fails.load(Ordering::Relaxed),
            rate_limited_log_count: self.rate_limited.load(Ordering::Relaxed),
        }
    }

    /// Writes `record` as it would be at `now`, if its level, module and call site's rate
    /// limit let it through.
    fn log_at(&self, record: &Record<'_>, now: Instant) {
        let mut state = self.state();
        let State {
            settings,
            limits,
            line,
            cut,
        } = &mut *state;
        if record.level() > settings.level {
            return;
        }
        if let Some(module) = &settings.module {
            if !record
                .module_path()
                .unwrap_or_default()
                .starts_with(module.as_str())
            {
                return;
            }
        }
        let Some(suppressed) = limits.admit(record, now) else {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            return;
        };
        line.clear();
        if *cut {
            line.push(b'\n');
        }
        let mut bounded = Bounded {
            buf: line,
            // Room for the marker and the newline; the newline that ends a cut line is counted
            // in, so that a line never exceeds `MAX_LINE`.
            limit: MAX_LINE - TRUNCATED.len() - 2,
            truncated: false,
        };
        let elapsed = now.saturating_duration_since(self.start);
        let level = if settings.show_level {
            match record.level() {
                Level::Error => "ERROR ",
                Level::Warn => "WARN  ",
                Level::Info => "INFO  ",
                Level::Debug => "DEBUG ",
                Level::Trace => "TRACE ",
            }
        } else {
            ""
        };
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        // An error only says the line is full, which `truncated` records.
        let _ = write!(
            bounded,
            "[{:>4}.{:06}] {level}[{name}] ",
            elapsed.as_secs(),
            elapsed.subsec_micros()
        );
        if settings.show_origin {
            let _ = write!(
                bounded,
                "{}:{} ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            );
        }
        if suppressed > 0 {
            let _ = write!(bounded, "[{suppressed} lines from here were suppressed] ");
        }
        let _ = bounded.write_fmt(*record.args());
        let truncated = bounded.truncated;
        if truncated {
            line.extend_from_slice(TRUNCATED.as_bytes());
        }
        line.push(b'\n');
        // One `write`: a pipe takes the line whole or refuses it.
        match settings.out.write(line) {
            Ok(n) if n == line.len() => *cut = false,
            Ok(n) => {
                self.missed.fetch_add(1, Ordering::Relaxed);
                *cut = *cut || n > 0;
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.fails.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        self.log_at(record, Instant::now());
    }

    fn flush(&self) {
        let _ = self.state().settings.out.flush();
    }
}

/// Installs the logger on stderr (reopened non-blocking when it is a pipe); messages above
/// `level` are dropped. `start` is the process start time.
pub fn init(start: Instant, level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| {
        let out: Box<dyn Write + Send> = match reopen_nonblocking(io::stderr().as_fd()) {
            Some(pipe) => Box::new(pipe),
            None => Box::new(io::stderr()),
        };
        Logger::new(start, level, out)
    });
    // Only fails when a logger is already installed, which leaves that one in place.
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// What `PUT /logger` changes; `None` keeps the current setting.
#[derive(Debug, Default)]
pub struct Config<'a> {
    /// A file (appended to) or named pipe for the log.
    pub path: Option<&'a Path>,
    /// The most verbose level written.
    pub level: Option<LevelFilter>,
    /// Whether lines show their level.
    pub show_level: Option<bool>,
    /// Whether lines show the source file and line.
    pub show_origin: Option<bool>,
    /// Only messages of this module path (and below) are written.
    pub module: Option<&'a str>,
}

/// Changes where and how the log is written.
///
/// # Errors
///
/// When the log file cannot be opened ([`open_sink`]); nothing changes then.
pub fn configure(config: &Config<'_>) -> Result<()> {
    let out: Option<Box<dyn Write + Send>> = match config.path {
        Some(path) => Some(Box::new(open_sink("log file", path)?)),
        None => None,
    };
    let Some(logger) = LOGGER.get() else {
        return Err(Error::NotInstalled);
    };
    let mut state = logger.state();
    if let Some(out) = out {
        state.settings.out = out;
        state.cut = false;
    }
    let settings = &mut state.settings;
    if let Some(level) = config.level {
        settings.level = level;
        log::set_max_level(level);
    }
    if let Some(show) = config.show_level {
        settings.show_level = show;
    }
    if let Some(show) = config.show_origin {
        settings.show_origin = show;
    }
    if let Some(module) = config.module {
        settings.module = Some(module.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::Arc;

    use super::*;

    /// A sink that keeps what it is given, and takes at most `accept` bytes per write (all when
    /// `None`), or refuses every write with `refuse`.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        accept: Option<usize>,
        refuse: Option<io::ErrorKind>,
        writes: Arc<AtomicU64>,
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if let Some(kind) = self.refuse {
                return Err(kind.into());
            }
            let n = self.accept.map_or(buf.len(), |n| n.min(buf.len()));
            self.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn logger(sink: &Sink) -> (Logger, Instant) {
        let start = Instant::now();
        (
            Logger::new(start, LevelFilter::Trace, Box::new(sink.clone())),
            start,
        )
    }

    fn log(logger: &Logger, line: u32, now: Instant, args: fmt::Arguments<'_>) {
        logger.log_at(
            &Record::builder()
                .level(Level::Warn)
                .file(Some("src/device.rs"))
                .line(Some(line))
                .module_path(Some("ember_vmm::device"))
                .args(args)
                .build(),
            now,
        );
    }

    #[test]
    fn ten_thousand_lines_from_one_call_site_write_the_burst_then_a_suppression_note() {
        let sink = Sink::default();
        let (logger, start) = logger(&sink);
        for i in 0..10_000 {
            // Within the same second.
            let now = start + Duration::from_micros(i);
            log(&logger, 7, now, format_args!("guest reset the device"));
        }
        assert_eq!(sink.text().lines().count(), BURST as usize);
        assert_eq!(
            logger.stats().rate_limited_log_count,
            10_000 - u64::from(BURST)
        );

        // Another call site is unaffected.
        log(&logger, 8, start, format_args!("another site"));
        assert_eq!(sink.text().lines().count(), BURST as usize + 1);

        // A second later, one more line, which says how many were suppressed.
        log(
            &logger,
            7,
            start + REFILL,
            format_args!("guest reset the device"),
        );
        let text = sink.text();
        let last = text.lines().last().unwrap();
        assert!(
            last.contains("[9990 lines from here were suppressed] guest reset the device"),
            "{last}"
        );
        assert_eq!(text.lines().count(), BURST as usize + 2);
        // The next second gives one line, no note.
        log(&logger, 7, start + 2 * REFILL, format_args!("again"));
        log(&logger, 7, start + 2 * REFILL, format_args!("again"));
        let text = sink.text();
        assert!(text.ends_with("] again\n"), "{text}");
        assert!(!text.lines().last().unwrap().contains("suppressed"));
        assert_eq!(text.lines().count(), BURST as usize + 3);
    }

    #[test]
    fn the_table_of_call_sites_is_bounded_and_the_rest_share_a_bucket() {
        let sink = Sink::default();
        let (logger, start) = logger(&sink);
        let sites = u32::try_from(MAX_CALL_SITES).unwrap() + 100;
        for line in 0..sites {
            log(&logger, line, start, format_args!("site"));
        }
        let state = logger.state();
        assert_eq!(state.limits.sites.len(), MAX_CALL_SITES);
        drop(state);
        // The 100 sites past the table shared one bucket of `BURST` lines.
        assert_eq!(sink.text().lines().count(), MAX_CALL_SITES + BURST as usize);
    }

    #[test]
    fn one_line_is_one_write_cut_to_max_line_with_a_marker() {
        let sink = Sink::default();
        let (logger, start) = logger(&sink);
        let long = "é".repeat(10_000);
        log(&logger, 1, start, format_args!("{long}"));
        log(&logger, 2, start, format_args!("short {}", 42));
        assert_eq!(sink.writes.load(Ordering::Relaxed), 2);
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].len() < MAX_LINE, "{}", lines[0].len());
        assert!(lines[0].len() > MAX_LINE - 20, "{}", lines[0].len());
        assert!(lines[0].ends_with("é [truncated]"));
        assert!(lines[1].ends_with("] short 42"), "{}", lines[1]);
    }

    #[test]
    fn a_sink_that_would_block_drops_the_line_and_counts_it() {
        let sink = Sink {
            refuse: Some(io::ErrorKind::WouldBlock),
            ..Sink::default()
        };
        let (logger, start) = logger(&sink);
        log(&logger, 1, start, format_args!("dropped"));
        log(&logger, 2, start, format_args!("dropped"));
        assert_eq!(logger.stats().missed_log_count, 2);
        assert_eq!(logger.stats().log_fails, 0);

        let failing = Sink {
            refuse: Some(io::ErrorKind::PermissionDenied),
            ..Sink::default()
        };
        let (logger, start) = self::logger(&failing);
        log(&logger, 1, start, format_args!("failed"));
        assert_eq!(logger.stats().log_fails, 1);
    }

    #[test]
    fn a_short_write_drops_the_rest_and_the_next_line_starts_afresh() {
        let mut sink = Sink {
            accept: Some(5),
            ..Sink::default()
        };
        let (logger, start) = logger(&sink);
        log(&logger, 1, start, format_args!("first"));
        assert_eq!(logger.stats().missed_log_count, 1);
        sink.accept = None;
        logger.state().settings.out = Box::new(sink.clone());
        log(&logger, 2, start, format_args!("second"));
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0].len(), 5);
        assert!(lines[1].starts_with('[') && lines[1].ends_with("second"));
    }

    /// A named pipe at a fresh path.
    fn fifo(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ember-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        path
    }

    #[test]
    fn a_named_pipe_without_a_reader_is_a_clear_error() {
        let path = fifo("log-no-reader");
        let err = open_sink("log file", &path).unwrap_err();
        assert!(matches!(err, Error::NoReader { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("no process has the named pipe open for reading"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_pipe_reopened_does_not_block_and_leaves_the_original_blocking() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just created both descriptors, and nothing else owns them.
        let (reader, writer) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let mut pipe = reopen_nonblocking(writer.as_fd()).expect("a pipe is reopened");
        // A pipe nobody reads fills up, and then a write fails at once instead of waiting.
        let chunk = [b'x'; 4096];
        let full = (0..1024).find_map(|_| pipe.write(&chunk).err());
        assert_eq!(full.map(|e| e.kind()), Some(io::ErrorKind::WouldBlock));
        // SAFETY: F_GETFL on an open descriptor only reads its flags.
        let flags = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "the original stays blocking");
        drop(reader);
        // Anything else is left as it is.
        let file = tempfile_in_tmp();
        assert!(reopen_nonblocking(file.as_fd()).is_none());
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("ember-log-reopen-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn a_named_pipe_nobody_reads_costs_dropped_lines_never_a_blocked_writer() {
        let path = fifo("log-stalled");
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let out = open_sink("log file", &path).unwrap();
        let start = Instant::now();
        let logger = Logger::new(start, LevelFilter::Trace, Box::new(out));
        // Far more than a pipe holds (64 KiB by default), from call sites that are not limited.
        let text = "x".repeat(1000);
        for line in 0..1000 {
            log(&logger, line, start, format_args!("{text}"));
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        let missed = logger.stats().missed_log_count;
        assert!(missed > 0);
        // What the pipe holds is whole lines.
        let mut read = Vec::new();
        let _ = reader.read_to_end(&mut read);
        let read = String::from_utf8(read).unwrap();
        assert_eq!(read.lines().count() as u64, 1000 - missed);
        assert!(read.lines().all(|l| l.ends_with(&text)));
        std::fs::remove_file(&path).unwrap();
    }
}
