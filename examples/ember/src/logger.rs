//! A small logger for `ember`: leveled lines stamped with the time since process start, on
//! stderr until `PUT /logger` sends them to a file or named pipe.
//!
//! The console of the guest goes to stdout (or a file); the VMM's own messages go to stderr so the
//! two never interleave inside a line.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// How lines are written, and where.
struct Settings {
    level: LevelFilter,
    show_level: bool,
    show_origin: bool,
    /// Only records whose module path starts with this are written.
    module: Option<String>,
    out: Box<dyn Write + Send>,
}

struct Logger {
    start: Instant,
    settings: Mutex<Settings>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Logger {
    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)
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
        let elapsed = self.start.elapsed();
        let mut settings = self.settings();
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
        let origin = if settings.show_origin {
            format!(
                "{}:{} ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            )
        } else {
            String::new()
        };
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        // A failed write of a log line has nowhere better to be reported.
        let _ = writeln!(
            settings.out,
            "[{:>4}.{:06}] {level}[{name}] {origin}{}",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = self.settings().out.flush();
    }
}

/// Installs the logger on stderr; messages above `level` are dropped. `start` is the process
/// start time.
pub fn init(start: Instant, level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| Logger {
        start,
        settings: Mutex::new(Settings {
            level,
            show_level: true,
            show_origin: false,
            module: None,
            out: Box::new(io::stderr()),
        }),
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
/// When the log file cannot be opened; nothing changes then.
pub fn configure(config: &Config<'_>) -> io::Result<()> {
    let out: Option<Box<dyn Write + Send>> = match config.path {
        Some(path) => Some(Box::new(
            OpenOptions::new().append(true).create(true).open(path)?,
        )),
        None => None,
    };
    let Some(logger) = LOGGER.get() else {
        return Err(io::Error::other("the logger is not installed"));
    };
    let mut settings = logger.settings();
    if let Some(out) = out {
        settings.out = out;
    }
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
