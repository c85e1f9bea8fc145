//! A [`Write`] that never blocks its caller: what is written goes into a bounded buffer in memory,
//! and a thread of its own drains that buffer into the real sink with ordinary, blocking writes.
//!
//! The serial console's output is written by a vCPU thread while it holds the UART's lock.
//! Written straight to standard output or a file, it stalls that vCPU, and everything that waits
//! for the lock or for the vCPU (pause, stop), whenever the terminal is not read, the pipe is full
//! or the file system hangs. Put a [`BoundedWriter`] between the device and the sink instead:
//!
//! - a write takes at most what fits in [`Config::capacity`] bytes (the bytes waiting, the ones
//!   being written included); the rest is dropped and counted in
//!   [`BoundedWriterStats::dropped_full`]. It never does I/O, so it returns at once; it only takes
//!   a lock that the draining thread holds while it moves bytes in memory;
//! - the draining thread writes to the sink in chunks of up to 2 KiB, in order;
//! - a sink may take at most [`Config::max_bytes`] bytes over the writer's life (a size cap for
//!   a file the guest fills); bytes past it are dropped and counted in
//!   [`BoundedWriterStats::dropped_over_limit`];
//! - [`BoundedWriterThread::finish`] lets the thread write what is left for at most a given time,
//!   and returns without waiting longer for a sink that stalls.
//!
//! Once started (after what [`BoundedWriter::spawn_with`] runs first), the draining thread makes
//! only these system calls: `write` to the sink (and whatever its `flush` makes: nothing for a
//! file), and `futex` to sleep and be woken; at its end, those of dropping the sink (`close` for
//! a file) and of a thread's exit (`sigaltstack`, `munmap`, `madvise`, `exit`). The writing side
//! makes `futex` calls only.
//!
//! # Example
//!
//! ```
//! use std::io::Write;
//! use std::time::Duration;
//!
//! use ember_legacy::bounded_writer::{BoundedWriter, Config};
//!
//! let file = std::env::temp_dir().join(format!("bounded-writer-doc-{}", std::process::id()));
//! let sink = std::fs::File::create(&file)?;
//! let mut config = Config::default();
//! config.capacity = 16;
//! config.max_bytes = Some(8);
//! let (mut writer, mut thread) = BoundedWriter::spawn("doc_console", sink, config)?;
//! // What does not fit in the buffer is dropped at once, never waited for.
//! assert_eq!(writer.write(&[b'x'; 20])?, 20);
//! assert!(thread.finish(Duration::from_secs(5)));
//! let stats = writer.stats();
//! // The file took 8 bytes, its cap.
//! assert_eq!(stats.written, 8);
//! assert_eq!(stats.dropped_full + stats.dropped_over_limit, 12);
//! assert_eq!(std::fs::read(&file)?, b"xxxxxxxx");
//! # std::fs::remove_file(&file)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The buffer's size when nothing else is asked for: 64 KiB, a few screens of console output.
pub const DEFAULT_CAPACITY: usize = 64 * 1024;

/// The most bytes the draining thread hands the sink in one write: under a page, so that its
/// stack needs no more pages than a thread's first until it has bytes to write.
const CHUNK: usize = 2048;

/// How a [`BoundedWriter`] buffers and caps its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The most bytes waiting for the sink, those the thread is writing included.
    pub capacity: usize,
    /// The most bytes the sink is given over the writer's life; `None` for no limit.
    pub max_bytes: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            capacity: DEFAULT_CAPACITY,
            max_bytes: None,
        }
    }
}

/// Counters of a [`BoundedWriter`]: every byte written to it is, once the buffer is empty,
/// either written or dropped for one of three reasons.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BoundedWriterStats {
    /// Bytes the sink took.
    pub written: u64,
    /// Bytes dropped because the buffer was full (the sink did not keep up) or closed.
    pub dropped_full: u64,
    /// Bytes dropped because the sink had been given [`Config::max_bytes`].
    pub dropped_over_limit: u64,
    /// Bytes dropped because the sink failed to take them.
    pub dropped_on_error: u64,
    /// Writes or flushes of the sink that failed.
    pub errors: u64,
}

impl BoundedWriterStats {
    /// Bytes dropped, for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_full
            .saturating_add(self.dropped_over_limit)
            .saturating_add(self.dropped_on_error)
    }
}

/// What the writers and the draining thread share.
#[derive(Debug)]
struct State {
    /// Bytes waiting for the thread.
    buf: VecDeque<u8>,
    /// Bytes the thread took out of `buf` and is writing.
    in_flight: usize,
    /// The thread waits for bytes, and must be woken for new ones.
    waiting: bool,
    /// No more bytes are taken; the thread ends once it has written what it has.
    closing: bool,
    /// The thread has ended.
    finished: bool,
    stats: BoundedWriterStats,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    state: Mutex<State>,
    /// Wakes the thread: bytes came, or the writer closes.
    wake: Condvar,
    /// Wakes [`BoundedWriterThread::finish`]: the thread ended.
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every point a panic could leave it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing end: a [`Write`] that never blocks on the sink (see the [module](self)).
///
/// Clones write into the same buffer.
#[derive(Debug, Clone)]
pub struct BoundedWriter {
    shared: Arc<Shared>,
}

/// The draining thread of a [`BoundedWriter`]: [`finish`](Self::finish) it when the writer is
/// done. Dropping it closes the writer without waiting for the thread.
#[derive(Debug)]
pub struct BoundedWriterThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BoundedWriter {
    /// Starts a thread named `name` that writes to `sink` what is written to the returned
    /// writer.
    ///
    /// # Errors
    ///
    /// When the thread cannot be started.
    pub fn spawn<W: Write + Send + 'static>(
        name: &str,
        sink: W,
        config: Config,
    ) -> io::Result<(BoundedWriter, BoundedWriterThread)> {
        Self::spawn_with(name, sink, config, || Ok(()))
    }

    /// Like [`spawn`](Self::spawn), and the thread runs `on_start` before it writes anything:
    /// where a VMM installs the thread's seccomp filter, for one. This waits for `on_start`.
    ///
    /// # Errors
    ///
    /// When the thread cannot be started, or `on_start` fails (the thread then ends).
    pub fn spawn_with<W, F>(
        name: &str,
        sink: W,
        config: Config,
        on_start: F,
    ) -> io::Result<(BoundedWriter, BoundedWriterThread)>
    where
        W: Write + Send + 'static,
        F: FnOnce() -> io::Result<()> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            capacity: config.capacity,
            state: Mutex::new(State {
                buf: VecDeque::new(),
                in_flight: 0,
                waiting: false,
                closing: false,
                finished: false,
                stats: BoundedWriterStats::default(),
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let drainer = shared.clone();
        let (started, start_result) = mpsc::sync_channel::<io::Result<()>>(1);
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let result = on_start();
                let failed = result.is_err();
                // `spawn_with` waits for this.
                let _ = started.send(result);
                if !failed {
                    drain(&drainer, sink, config.max_bytes);
                }
            })?;
        let result = start_result
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")));
        if let Err(err) = result {
            // The thread ends at once; it holds nothing of the caller's.
            let _ = thread.join();
            return Err(err);
        }
        Ok((
            BoundedWriter {
                shared: shared.clone(),
            },
            BoundedWriterThread {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// The writer's counters.
    pub fn stats(&self) -> BoundedWriterStats {
        self.shared.lock().stats
    }
}

impl Write for BoundedWriter {
    /// Takes what fits in the buffer and drops the rest, counting it; reports all of `buf` as
    /// written, since a caller could do nothing better with the rest than drop it too.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let room = if state.closing {
            0
        } else {
            self.shared
                .capacity
                .saturating_sub(state.buf.len().saturating_add(state.in_flight))
        };
        let taken = room.min(buf.len());
        state.buf.extend(&buf[..taken]);
        let dropped = u64::try_from(buf.len() - taken).unwrap_or(u64::MAX);
        state.stats.dropped_full = state.stats.dropped_full.saturating_add(dropped);
        // Waking the thread costs a system call: only when it sleeps.
        let wake = taken > 0 && std::mem::take(&mut state.waiting);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    /// Does nothing: the thread writes as soon as it can, and the caller must not wait for it.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BoundedWriterThread {
    /// The writer's counters.
    pub fn stats(&self) -> BoundedWriterStats {
        self.shared.lock().stats
    }

    /// Closes the writer (what is written to it from now on is dropped) and gives the thread up
    /// to `timeout` to write what it holds. Returns whether it did; when it did not (the sink
    /// stalls), the thread is left to end on its own, or with the process.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        self.close();
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .done
            .wait_timeout_while(state, timeout, |state| !state.finished)
            .unwrap_or_else(PoisonError::into_inner);
        let finished = state.finished;
        drop(state);
        if finished {
            if let Some(thread) = self.thread.take() {
                // The thread has returned from its loop; joining only reaps it. A panic of its
                // own has nothing left to report.
                let _ = thread.join();
            }
        }
        finished
    }

    fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
    }
}

impl Drop for BoundedWriterThread {
    fn drop(&mut self) {
        self.close();
    }
}

/// The draining thread's loop: moves chunks out of the buffer and writes them to `sink`, until
/// the writer closes and the buffer is empty.
fn drain<W: Write>(shared: &Shared, mut sink: W, max_bytes: Option<u64>) {
    let mut allowed = max_bytes;
    loop {
        let mut state = shared.lock();
        while state.buf.is_empty() {
            if state.closing {
                state.finished = true;
                drop(state);
                shared.done.notify_all();
                return;
            }
            state.waiting = true;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let mut chunk = [0u8; CHUNK];
        let len = state.buf.len().min(CHUNK);
        for (slot, byte) in chunk.iter_mut().zip(state.buf.drain(..len)) {
            *slot = byte;
        }
        state.in_flight = len;
        drop(state);

        let outcome = write_chunk(&mut sink, &chunk[..len], &mut allowed);

        let mut state = shared.lock();
        state.in_flight = 0;
        let stats = &mut state.stats;
        stats.written = stats.written.saturating_add(outcome.written);
        stats.dropped_over_limit = stats.dropped_over_limit.saturating_add(outcome.over_limit);
        stats.dropped_on_error = stats.dropped_on_error.saturating_add(outcome.failed);
        stats.errors = stats.errors.saturating_add(outcome.errors);
    }
}

/// What became of one chunk.
#[derive(Debug, Default)]
struct ChunkOutcome {
    written: u64,
    over_limit: u64,
    failed: u64,
    errors: u64,
}

/// Writes `bytes` to `sink`, no more than `allowed` (which shrinks by what was written), and
/// flushes it.
fn write_chunk<W: Write>(sink: &mut W, bytes: &[u8], allowed: &mut Option<u64>) -> ChunkOutcome {
    let to_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let mut outcome = ChunkOutcome::default();
    let len = match *allowed {
        Some(left) => usize::try_from(left).map_or(bytes.len(), |left| left.min(bytes.len())),
        None => bytes.len(),
    };
    outcome.over_limit = to_u64(bytes.len() - len);
    let mut rest = &bytes[..len];
    while !rest.is_empty() {
        match sink.write(rest) {
            Ok(0) => break,
            Ok(n) => {
                let n = n.min(rest.len());
                outcome.written = outcome.written.saturating_add(to_u64(n));
                rest = &rest[n..];
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if !rest.is_empty() {
        outcome.failed = to_u64(rest.len());
        outcome.errors = 1;
    }
    if len > 0 && sink.flush().is_err() {
        outcome.errors = outcome.errors.saturating_add(1);
    }
    if let Some(left) = allowed.as_mut() {
        *left = left.saturating_sub(outcome.written);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Instant;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    /// A pipe: (read end, write end), the write end blocking and holding `size` bytes.
    fn pipe(size: i32) -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors `pipe2` writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: `pipe2` succeeded: both descriptors are open and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours.
        let set = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, size) };
        assert!(set >= size, "cannot size the pipe");
        (File::from(read), File::from(write))
    }

    #[test]
    fn a_write_to_a_sink_that_blocks_forever_returns_at_once_and_counts_what_is_dropped() {
        let (reader, sink) = pipe(4096);
        let config = Config {
            capacity: 1024,
            max_bytes: None,
        };
        let (mut writer, mut thread) = BoundedWriter::spawn("test_console", sink, config).unwrap();
        let total = 1024 * 1024;
        let started = Instant::now();
        // One byte at a time, as a guest transmits.
        for _ in 0..total {
            assert_eq!(writer.write(b"x").unwrap(), 1);
            writer.flush().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "writes waited for the sink: {:?}",
            started.elapsed()
        );
        // What was not dropped is in the pipe (4 KiB at most) or in the buffer (1 KiB at most).
        let stats = writer.stats();
        assert!(stats.dropped_full >= total - 1024 - 4096, "{stats:?}");
        assert!(stats.written <= 4096, "{stats:?}");

        // Finishing does not wait for the stalled sink beyond its bound.
        let started = Instant::now();
        assert!(!thread.finish(Duration::from_millis(100)));
        assert!(started.elapsed() < Duration::from_secs(5));
        // A closed writer takes nothing more.
        let before = writer.stats().dropped_full;
        writer.write_all(b"late").unwrap();
        assert_eq!(writer.stats().dropped_full, before + 4);
        // The reader going away fails the blocked write, which lets the thread end.
        drop(reader);
    }

    #[test]
    fn bytes_reach_the_sink_in_order_and_finish_waits_for_them() {
        let file = TempFile::new().unwrap();
        let sink = File::create(file.as_path()).unwrap();
        let (mut writer, mut thread) =
            BoundedWriter::spawn("test_console", sink, Config::default()).unwrap();
        let text: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for piece in text.chunks(7) {
            writer.write_all(piece).unwrap();
        }
        assert!(thread.finish(Duration::from_secs(10)));
        assert_eq!(std::fs::read(file.as_path()).unwrap(), text);
        let stats = writer.stats();
        assert_eq!(stats.written, 20_000);
        assert_eq!(stats.dropped(), 0);
    }

    #[test]
    fn a_sink_that_reached_its_cap_stops_growing() {
        let file = TempFile::new().unwrap();
        let sink = File::create(file.as_path()).unwrap();
        let config = Config {
            capacity: DEFAULT_CAPACITY,
            max_bytes: Some(10_000),
        };
        let (mut writer, mut thread) = BoundedWriter::spawn("test_console", sink, config).unwrap();
        for _ in 0..100 {
            writer.write_all(&[b'y'; 1000]).unwrap();
        }
        assert!(thread.finish(Duration::from_secs(10)));
        assert_eq!(std::fs::metadata(file.as_path()).unwrap().len(), 10_000);
        let stats = writer.stats();
        assert_eq!(stats.written, 10_000);
        assert_eq!(
            stats.dropped_over_limit + stats.dropped_full,
            100_000 - 10_000
        );
    }

    #[test]
    fn on_start_runs_first_in_the_named_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (_writer, mut thread) =
            BoundedWriter::spawn_with("named_console", io::sink(), Config::default(), move || {
                let name = thread::current().name().map(str::to_string);
                tx.send(name).unwrap();
                Ok(())
            })
            .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("named_console"));
        assert!(thread.finish(Duration::from_secs(10)));
    }

    #[test]
    fn a_failing_on_start_is_the_spawns_error() {
        let err =
            BoundedWriter::spawn_with("failing_console", io::sink(), Config::default(), || {
                Err(io::Error::other("no filter"))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "no filter");
    }

    #[test]
    fn a_failing_sink_counts_its_errors_and_lost_bytes() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, mut thread) =
            BoundedWriter::spawn("test_console", Broken, Config::default()).unwrap();
        writer.write_all(b"lost").unwrap();
        assert!(thread.finish(Duration::from_secs(10)));
        let stats = writer.stats();
        assert_eq!((stats.written, stats.dropped_on_error), (0, 4));
        assert_eq!(stats.errors, 1);
    }
}
