//! A small logger for `ember`: leveled lines on stderr, stamped with the time since process start.
//!
//! The console of the guest goes to stdout (or a file); the VMM's own messages go to stderr so the
//! two never interleave inside a line.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
    level: LevelFilter,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        // A failed write to stderr has nowhere better to be reported.
        let _ = writeln!(
            std::io::stderr().lock(),
            "[{:>4}.{:06}] {level} [{name}] {}",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger; messages above `level` are dropped. `start` is the process start time.
pub fn init(start: Instant, level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| Logger { start, level });
    // Only fails when a logger is already installed, which leaves that one in place.
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
