//! `ember-io-probe`: the guest side of ember's disk benchmarks.
//!
//! It reads or writes a block device (or a file) with `O_DIRECT`, so that every request reaches
//! the virtual disk rather than the guest's page cache, for a fixed time, and prints one line
//! of `key=value` results: bytes moved, requests, seconds, MiB/s and requests per second.
//! Requests go sequentially or to random aligned offsets; `--depth N` keeps N in flight, one
//! per thread, each thread doing its own synchronous `pread`/`pwrite`, as fio's `psync` engine
//! with N jobs does.
//!
//! ```text
//! ember-io-probe /dev/vdb --read --block 1M --seconds 5
//! ember-io-probe /dev/vdb --read --random --block 4K --depth 32 --seconds 5
//! ```

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: ember-io-probe PATH (--read | --write) [OPTION...]

options (sizes take K, M or G for KiB, MiB, GiB):
  --block SIZE     bytes per request, a multiple of 4K (default 4K)
  --random         requests at random block-aligned offsets (default: one after another)
  --depth N        requests in flight, one per thread (default 1)
  --seconds S      how long to run (default 5)
  --size SIZE      the part of PATH used, from its start (default: all of it)
  --buffered       without O_DIRECT (for file systems that refuse it)
";

/// The alignment of `O_DIRECT` buffers and offsets that every Linux block device accepts.
const ALIGN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    path: String,
    write: bool,
    block: usize,
    random: bool,
    depth: usize,
    seconds: u64,
    size: Option<u64>,
    buffered: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 1u64 << 10),
        Some((at, 'M' | 'm')) => (&text[..at], 1 << 20),
        Some((at, 'G' | 'g')) => (&text[..at], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("not a size: {text}"))
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut args = args.iter().map(String::as_str);
    let mut next = |what: &str| args.next().ok_or_else(|| format!("{what} is missing"));
    let path = next("PATH")?.to_string();
    let mut direction = None;
    let mut options = Options {
        path,
        write: false,
        block: ALIGN,
        random: false,
        depth: 1,
        seconds: 5,
        size: None,
        buffered: false,
    };
    while let Ok(flag) = next("an option") {
        match flag {
            "--read" => direction = Some(false),
            "--write" => direction = Some(true),
            "--block" => {
                options.block = usize::try_from(parse_size(next("SIZE")?)?)
                    .ok()
                    .filter(|&b| b > 0 && b % ALIGN == 0 && b <= 1 << 26)
                    .ok_or("--block must be a multiple of 4K, at most 64M")?;
            }
            "--random" => options.random = true,
            "--depth" => {
                options.depth = next("N")?
                    .parse()
                    .ok()
                    .filter(|&d| (1..=256).contains(&d))
                    .ok_or("--depth must be 1 to 256")?;
            }
            "--seconds" => {
                options.seconds = next("S")?
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or("--seconds must be a positive number")?;
            }
            "--size" => options.size = Some(parse_size(next("SIZE")?)?),
            "--buffered" => options.buffered = true,
            other => return Err(format!("unknown option: {other}")),
        }
    }
    options.write = direction.ok_or("--read or --write is missing")?;
    Ok(options)
}

/// A zeroed buffer aligned for `O_DIRECT`.
struct Buffer {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by one thread at a time.
unsafe impl Send for Buffer {}

impl Buffer {
    fn new(len: usize) -> Result<Self, String> {
        let layout = Layout::from_size_align(len, ALIGN).map_err(|e| e.to_string())?;
        // SAFETY: the layout's size is not zero (a block is at least 4 KiB).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {len} bytes"));
        }
        Ok(Buffer { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes that `self` owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout by `Buffer::new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The next value of a xorshift64* generator: random offsets, the same for every run.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// What one thread did: requests and bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    requests: u64,
    bytes: u64,
}

/// Runs one thread's requests until `stop`: thread `index` of `options.depth`, on `blocks`
/// blocks of the device.
fn worker(
    file: &File,
    options: &Options,
    index: usize,
    blocks: u64,
    stop: &AtomicBool,
) -> Result<Tally, String> {
    let mut buffer = Buffer::new(options.block)?;
    let buf = buffer.as_mut_slice();
    buf.fill(0x5a);
    let block = options.block as u64;
    let depth = options.depth as u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index as u64 + 1);
    // Sequential threads each take every depth-th block, from their own.
    let mut sequential = index as u64;
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let at = if options.random {
            next_random(&mut seed) % blocks
        } else {
            let at = sequential % blocks;
            sequential = sequential.wrapping_add(depth);
            at
        };
        let offset = at * block;
        let result = if options.write {
            file.write_all_at(buf, offset)
        } else {
            file.read_exact_at(buf, offset)
        };
        result.map_err(|e| format!("{} at offset {offset}: {e}", options.path))?;
        tally.requests += 1;
        tally.bytes += block;
    }
    Ok(tally)
}

fn run(options: &Options) -> Result<String, String> {
    let mut open = OpenOptions::new();
    open.read(true).write(options.write);
    if !options.buffered {
        open.custom_flags(libc::O_DIRECT);
    }
    let file = open
        .open(&options.path)
        .map_err(|e| format!("cannot open {}: {e}", options.path))?;
    // A block device's size is where its end is; a file's, its length.
    let len = options.size.map_or_else(
        || {
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| format!("cannot size {}: {e}", options.path))
        },
        Ok,
    )?;
    let blocks = len / options.block as u64;
    if blocks == 0 {
        return Err(format!(
            "{} holds no whole block of {} bytes",
            options.path, options.block
        ));
    }
    let file = Arc::new(file);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..options.depth)
        .map(|index| {
            let (file, stop, options) = (file.clone(), stop.clone(), options.clone());
            thread::spawn(move || worker(&file, &options, index, blocks, &stop))
        })
        .collect();
    thread::sleep(Duration::from_secs(options.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for thread in threads {
        let tally = thread
            .join()
            .map_err(|_| "a thread panicked".to_string())??;
        total.requests += tally.requests;
        total.bytes += tally.bytes;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "requests={} bytes={} secs={secs:.2} mib_s={:.1} iops={:.0}",
        total.requests,
        total.bytes,
        total.bytes as f64 / secs / f64::from(1u32 << 20),
        total.requests as f64 / secs
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("ember-io-probe: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("ember-io-probe: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_parse_and_bad_ones_are_refused() {
        let options = parse_args(&args(
            "/dev/vdb --read --random --block 4K --depth 32 --seconds 2",
        ))
        .unwrap();
        assert_eq!(
            (
                options.write,
                options.random,
                options.block,
                options.depth,
                options.seconds
            ),
            (false, true, 4096, 32, 2)
        );
        assert!(
            parse_args(&args("/dev/vdb --write --block 1M"))
                .unwrap()
                .write
        );
        for bad in [
            "/dev/vdb",
            "/dev/vdb --read --block 512",
            "/dev/vdb --read --depth 0",
            "/dev/vdb --read --seconds 0",
            "/dev/vdb --read --frobnicate",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn writes_reach_the_file_and_reads_count_what_they_moved() {
        let dir = std::env::temp_dir().join(format!("ember-io-probe-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 1 << 20]).unwrap();
        let path = dir.to_str().unwrap();
        let line = run(&parse_args(&args(&format!(
            "{path} --write --block 64K --seconds 1 --buffered"
        )))
        .unwrap())
        .unwrap();
        assert!(line.starts_with("requests="), "{line}");
        let requests: usize = line["requests=".len()..line.find(' ').unwrap()]
            .parse()
            .unwrap();
        assert!(requests > 0, "{line}");
        // One thread writes the blocks in order, from the first, and wraps after the 16th.
        let data = std::fs::read(&dir).unwrap();
        let written = requests.min(16) * 65536;
        assert!(data[..written].iter().all(|&b| b == 0x5a));
        assert!(data[written..].iter().all(|&b| b == 0));
        let line = run(&parse_args(&args(&format!(
            "{path} --read --random --depth 2 --seconds 1 --buffered"
        )))
        .unwrap())
        .unwrap();
        assert!(line.contains("mib_s="), "{line}");
        std::fs::remove_file(&dir).unwrap();
    }
}
