//! `ember-text-order`: finds the code an idle microVM runs and writes the files with which the
//! linker lays it out together at the start of `ember`'s text.
//!
//! Linux maps a process's file pages in 64 KiB windows around each page it touches
//! (fault-around), so start-up code scattered over the 2.7 MiB of text makes most of the text
//! resident in every process. This tool runs an `ember` built with `EMBER_TEXT_ORDER_TRACE`
//! set, which gives every function pages of its own, twice: started from flags and through the
//! API socket, each with an idle tiny guest. It runs a copy of the binary that is not cached,
//! with the disk's read-ahead off, so that the text pages resident afterwards are exactly the
//! pages the process touched, and the functions on them exactly the functions that ran.
//!
//! ```text
//! EMBER_TEXT_ORDER_TRACE=1 cargo build --release -p ember --target-dir target/text-order
//! cargo run --release -p ember-text-order -- \
//!     target/text-order/x86_64-unknown-linux-gnu/release/ember examples/ember
//! ```
//!
//! writes `text-order.ld` (Rust functions, as section patterns without the hashes that change
//! with the build's profile and dependencies) and `text-order.txt` (C functions, by name) into
//! `examples/ember`, whose `build.rs` hands both to the linker. It needs root: it sets the
//! read-ahead of the disk holding the binary to 0 for the runs, and restores it after.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ember_boot::test_utils::tiny_elf;

const USAGE: &str = "usage: ember-text-order EMBER_BINARY OUT_DIR";
const PAGE: u64 = 4096;
/// `mov rax, 0xd0000000; mov byte [rax], 123`: the boot timer's write, which ember logs.
const BOOT_TIMER_WRITE: [u8; 13] = [
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x00, 0x7b,
];
/// `cli; hlt; jmp .-1`: stop for good, without exits to the VMM.
const HALT_FOREVER: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
/// How long a microVM may take to boot its tiny guest.
const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [binary, out_dir] = args.as_slice() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match run(Path::new(binary), Path::new(out_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ember-text-order: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(binary: &Path, out_dir: &Path) -> Result<(), String> {
    let copy = binary.with_extension("text-order");
    fs::copy(binary, &copy).map_err(|e| format!("cannot copy {}: {e}", binary.display()))?;
    let result = trace(&copy).and_then(|runs| {
        let previous = Order::read(out_dir)?;
        let order = Order::next(&runs, runs.len() - 1);
        println!(
            "{} + {} Rust function patterns and {} C functions (before: {} + {} and {})",
            order.hot.len(),
            order.warm.len(),
            order.c.len(),
            previous.hot.len(),
            previous.warm.len(),
            previous.c.len()
        );
        order.write(out_dir)
    });
    let _ = fs::remove_file(&copy);
    result
}

/// The functions on the text pages an idle `binary` touches, in address order: started from
/// flags, its log in a file and in a pipe, and through the API.
fn trace(binary: &Path) -> Result<[Vec<String>; 3], String> {
    let dir = binary.with_extension("text-order.d");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let guest = dir.join("idle.elf");
    let code = [BOOT_TIMER_WRITE.as_slice(), &HALT_FOREVER].concat();
    fs::write(&guest, tiny_elf(&code)).map_err(|e| format!("cannot write the guest: {e}"))?;

    // Reading the binary caches it: before it is dropped from the cache.
    let text = Text::of(binary)?;
    let _read_ahead = ReadAhead::off_for(binary)?;
    evict(binary)?;
    let runs = [
        (
            "from flags",
            touched_from_flags(binary, &guest, Some(&dir.join("log")), &text)?,
        ),
        (
            "from flags, logging to a pipe",
            touched_from_flags(binary, &guest, None, &text)?,
        ),
        (
            "through the API",
            touched_through_api(binary, &guest, &dir, &text)?,
        ),
    ];
    let _ = fs::remove_dir_all(&dir);
    Ok(runs.map(|(how, pages)| {
        println!(
            "started {how}: {} KiB of text touched",
            pages.len() as u64 * PAGE / 1024
        );
        text.functions_on(&pages)
    }))
}

/// The microVM of the startup bench: flags, a tiny guest that halts, its log in `log` or in
/// a pipe.
fn touched_from_flags(
    binary: &Path,
    guest: &Path,
    log: Option<&Path>,
    text: &Text,
) -> Result<BTreeSet<u64>, String> {
    let mut ember = Ember::spawn(
        Command::new(binary).arg("--kernel").arg(guest).args([
            "--memory",
            "32",
            "--boot-timer",
            "--serial",
            "none",
        ]),
        log,
    )?;
    ember.wait_booted()?;
    text.resident_pages(ember.child.id())
}

/// The same microVM, configured and started through the API socket, as orchestrators do.
fn touched_through_api(
    binary: &Path,
    guest: &Path,
    dir: &Path,
    text: &Text,
) -> Result<BTreeSet<u64>, String> {
    let socket = dir.join("api.sock");
    let mut ember = Ember::spawn(
        Command::new(binary)
            .arg("--api-sock")
            .arg(&socket)
            .arg("--boot-timer"),
        None,
    )?;
    let deadline = Instant::now() + TIMEOUT;
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the API socket did not appear".into());
        }
        thread::sleep(Duration::from_millis(5));
    }
    let kernel = guest.to_str().ok_or("the guest's path is not UTF-8")?;
    request(
        &socket,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"{kernel}"}}"#),
    )?;
    request(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":32}"#,
    )?;
    request(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    )?;
    ember.wait_booted()?;
    request(&socket, "GET", "/machine-config", "")?;
    text.resident_pages(ember.child.id())
}

/// An `ember` process, killed when dropped.
struct Ember {
    child: Child,
    log: Log,
}

/// Where an `ember` writes its log: its own code differs for a pipe and for anything else.
enum Log {
    Pipe(BufReader<std::process::ChildStderr>),
    File(PathBuf),
}

impl Ember {
    /// Runs `command` with its log in the file `log`, or in a pipe where that is `None`.
    fn spawn(command: &mut Command, log: Option<&Path>) -> Result<Self, String> {
        let stderr = match log {
            Some(path) => Stdio::from(
                File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?,
            ),
            None => Stdio::piped(),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run ember: {e}"))?;
        let log = match (log, child.stderr.take()) {
            (Some(path), _) => Log::File(path.to_path_buf()),
            (None, Some(pipe)) => Log::Pipe(BufReader::new(pipe)),
            (None, None) => return Err("no stderr".into()),
        };
        Ok(Ember { child, log })
    }

    /// Reads the log until the guest's boot-timer write, then lets the threads go idle.
    fn wait_booted(&mut self) -> Result<(), String> {
        const MARK: &str = "Guest-boot-time";
        match &mut self.log {
            Log::Pipe(pipe) => {
                let mut line = String::new();
                while !line.contains(MARK) {
                    line.clear();
                    match pipe.read_line(&mut line) {
                        Ok(0) => return Err("ember exited before its guest booted".into()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("cannot read ember's log: {e}")),
                    }
                }
            }
            Log::File(path) => {
                let deadline = Instant::now() + TIMEOUT;
                while !fs::read_to_string(&*path).is_ok_and(|log| log.contains(MARK)) {
                    if Instant::now() > deadline {
                        return Err("the guest did not boot".into());
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        thread::sleep(Duration::from_millis(200));
        Ok(())
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one HTTP request over the API socket and checks that it succeeded.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> Result<(), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot connect to the API: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("cannot send {method} {path}: {e}"))?;
    let mut status = [0u8; 12];
    stream
        .read_exact(&mut status)
        .map_err(|e| format!("no answer to {method} {path}: {e}"))?;
    match &status[9..10] {
        b"2" => Ok(()),
        _ => Err(format!(
            "{method} {path} answered {}",
            String::from_utf8_lossy(&status)
        )),
    }
}

/// Sets the read-ahead of the disk that holds a file to 0, and restores it when dropped.
struct ReadAhead {
    knob: PathBuf,
    before: String,
}

impl ReadAhead {
    fn off_for(file: &Path) -> Result<Self, String> {
        let dev = fs::metadata(file).map_err(|e| e.to_string())?.dev();
        let block = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ));
        // A partition's queue is its disk's.
        let queue = if block.join("partition").exists() {
            block.join("../queue")
        } else {
            block.join("queue")
        };
        let knob = queue.join("read_ahead_kb");
        let before = fs::read_to_string(&knob).map_err(|e| {
            format!(
                "{} is not on a block device whose read-ahead can be set ({}: {e})",
                file.display(),
                knob.display()
            )
        })?;
        fs::write(&knob, "0").map_err(|e| format!("cannot set {}: {e}", knob.display()))?;
        Ok(ReadAhead { knob, before })
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        let _ = fs::write(&self.knob, self.before.trim());
    }
}

/// Writes `file` back and drops it from the page cache, and checks that nothing of it is left.
fn evict(file: &Path) -> Result<(), String> {
    let f = File::open(file).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    // SAFETY: fadvise on a file descriptor this function owns; it only drops cached pages.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("posix_fadvise: error {rc}"));
    }
    let len = usize::try_from(f.metadata().map_err(|e| e.to_string())?.len())
        .map_err(|e| e.to_string())?;
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped below; no reference
    // into it is made.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let mut cached = vec![0u8; len.div_ceil(PAGE as usize)];
    // SAFETY: `cached` has one byte per page of the mapping, as mincore writes.
    let rc = unsafe { libc::mincore(addr, len, cached.as_mut_ptr()) };
    // SAFETY: the mapping made above, of `len` bytes, that nothing else uses.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(format!("mincore: {}", std::io::Error::last_os_error()));
    }
    match cached.iter().filter(|&&b| b & 1 != 0).count() {
        0 => Ok(()),
        n => Err(format!(
            "{n} pages of {} stay cached (a memory-backed file system?)",
            file.display()
        )),
    }
}

/// The binary's executable segment and its functions.
struct Text {
    path: PathBuf,
    /// The segment's file offset and virtual address.
    offset: u64,
    vaddr: u64,
    /// Address, size and name, by address.
    functions: Vec<(u64, u64, String)>,
}

impl Text {
    fn of(binary: &Path) -> Result<Self, String> {
        let elf = fs::read(binary).map_err(|e| e.to_string())?;
        let (offset, vaddr) = executable_segment(&elf)
            .ok_or_else(|| format!("{} has no executable segment", binary.display()))?;
        let nm = Command::new("nm")
            .args(["--defined-only", "--print-size"])
            .arg(binary)
            .output()
            .map_err(|e| format!("cannot run nm (binutils): {e}"))?;
        if !nm.status.success() {
            return Err(format!("nm: {}", String::from_utf8_lossy(&nm.stderr)));
        }
        let mut functions: Vec<_> = String::from_utf8_lossy(&nm.stdout)
            .lines()
            .filter_map(parse_nm_line)
            .collect();
        functions.sort();
        // A trace build starts every function's section on a page of its own.
        let rust: Vec<_> = functions.iter().filter(|(_, _, n)| is_rust(n)).collect();
        let aligned = rust.iter().filter(|(addr, _, _)| addr % PAGE == 0).count();
        if aligned * 2 < rust.len() {
            return Err(format!(
                "{} does not give its functions pages of their own: build it with \
                 EMBER_TEXT_ORDER_TRACE=1",
                binary.display()
            ));
        }
        Ok(Text {
            path: fs::canonicalize(binary).map_err(|e| e.to_string())?,
            offset,
            vaddr,
            functions,
        })
    }

    /// The virtual addresses of the text pages resident in process `pid`.
    fn resident_pages(&self, pid: u32) -> Result<BTreeSet<u64>, String> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
        let pagemap =
            File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("pagemap: {e}"))?;
        let path = self.path.to_string_lossy();
        let mut pages = BTreeSet::new();
        for line in maps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [range, perms, offset, _, _, name] = fields[..] else {
                continue;
            };
            if name != path || !perms.contains('x') {
                continue;
            }
            let (start, end) = range.split_once('-').ok_or("bad maps line")?;
            let parse = |s: &str| u64::from_str_radix(s, 16).map_err(|e| e.to_string());
            let (start, end, offset) = (parse(start)?, parse(end)?, parse(offset)?);
            for page in (start..end).step_by(PAGE as usize) {
                let mut entry = [0u8; 8];
                pagemap
                    .read_exact_at(&mut entry, page / PAGE * 8)
                    .map_err(|e| format!("pagemap: {e}"))?;
                if u64::from_le_bytes(entry) >> 63 == 1 {
                    pages.insert(page - start + offset - self.offset + self.vaddr);
                }
            }
        }
        if pages.is_empty() {
            return Err(format!("no text of {path} is resident in {pid}"));
        }
        Ok(pages)
    }

    /// The names of the functions that overlap `pages`, in address order, each once.
    fn functions_on(&self, pages: &BTreeSet<u64>) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.functions
            .iter()
            .filter(|(addr, size, _)| {
                let first = addr / PAGE * PAGE;
                let last = (addr + size.max(&1) - 1) / PAGE * PAGE;
                pages.range(first..=last).next().is_some()
            })
            .filter(|(_, _, name)| seen.insert(name.clone()))
            .map(|(_, _, name)| name.clone())
            .collect()
    }
}

/// The file offset and virtual address of the first executable `PT_LOAD` of an ELF64 image.
fn executable_segment(elf: &[u8]) -> Option<(u64, u64)> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    (0..phnum).find_map(|i| {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        const PT_LOAD: u32 = 1;
        const PF_X: u32 = 1;
        (u32_at(ph)? == PT_LOAD && u32_at(ph + 4)? & PF_X != 0)
            .then(|| Some((u64_at(ph + 8)?, u64_at(ph + 16)?)))?
    })
}

/// A function of `nm --defined-only --print-size`: address, size and name.
fn parse_nm_line(line: &str) -> Option<(u64, u64, String)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (addr, size, kind, name) = match fields[..] {
        [addr, size, kind, name] => (addr, Some(size), kind, name),
        [addr, kind, name] => (addr, None, kind, name),
        _ => return None,
    };
    // Text, weak and indirect (ifunc resolver) symbols.
    if !matches!(kind, "t" | "T" | "w" | "W" | "i") {
        return None;
    }
    let size = match size {
        Some(size) => u64::from_str_radix(size, 16).ok()?,
        None => 1,
    };
    Some((u64::from_str_radix(addr, 16).ok()?, size, name.to_string()))
}

/// Whether `name` is a Rust symbol, legacy (`_ZN`) or v0 (`_R`) mangled.
fn is_rust(name: &str) -> bool {
    name.starts_with("_ZN") || name.starts_with("_R")
}

/// A linker-script pattern for a Rust function's name: its hashes, which change with the
/// build's profile, flags and dependencies, become wildcards, as does the suffix LTO gives
/// local functions.
fn name_pattern(name: &str) -> String {
    // An LTO suffix (`.llvm.N`, `.N`) ends the name: a wildcard stands for it.
    let (mut rest, suffix) = match lto_suffix(name) {
        Some(at) => (&name[..at], "*"),
        None => (name, ""),
    };
    let mut pattern = String::with_capacity(name.len());
    while !rest.is_empty() {
        // Legacy: `17h` and 16 hex digits and `E` close the path.
        if let Some(tail) = rest.strip_prefix("17h")
            && tail.len() >= 17
            && tail.as_bytes()[..16].iter().all(u8::is_ascii_hexdigit)
            && tail.as_bytes()[16] == b'E'
        {
            pattern.push_str("17h*E");
            rest = &tail[17..];
            continue;
        }
        // v0: `Cs` and a base-62 crate disambiguator and `_` start a crate root.
        if let Some(tail) = rest.strip_prefix("Cs")
            && let Some(end) = tail.find(|c: char| !c.is_ascii_alphanumeric())
            && end > 0
            && tail.as_bytes()[end] == b'_'
        {
            pattern.push_str("Cs*_");
            rest = &tail[end + 1..];
            continue;
        }
        let mut chars = rest.chars();
        pattern.extend(chars.next());
        rest = chars.as_str();
    }
    pattern + suffix
}

/// Where the suffix that LTO gives a local function (`.llvm.N` or `.N`) starts.
fn lto_suffix(name: &str) -> Option<usize> {
    if let Some(at) = name.find(".llvm.") {
        return Some(at);
    }
    let at = name.rfind('.')?;
    let digits = &name[at + 1..];
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(at)
}

/// The functions to lay out together: Rust ones as name patterns, C ones by name. The Rust
/// functions that every start runs go before the rest of the text, next to the C functions
/// that the ordering file puts first in it, and those that only a start through the API runs
/// go after it.
#[derive(Debug, Default, PartialEq)]
struct Order {
    hot: Vec<String>,
    warm: Vec<String>,
    c: Vec<String>,
}

/// An output section of the script: its name, and where it goes.
const SECTIONS: [(&str, &str); 2] = [
    (".text.hot", "INSERT BEFORE .text;"),
    (".text.warm", "INSERT AFTER .text;"),
];

impl Order {
    /// The order `out_dir` holds; empty where it has none.
    fn read(out_dir: &Path) -> Result<Self, String> {
        let read = |file: &str| match fs::read_to_string(out_dir.join(file)) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(format!("cannot read {file}: {e}")),
        };
        let mut order = Order::default();
        let mut section = None;
        for line in read("text-order.ld")?.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_suffix(" : {") {
                section = match name {
                    ".text.hot" => Some(&mut order.hot),
                    ".text.warm" => Some(&mut order.warm),
                    _ => None,
                };
            } else if let Some(pattern) = line.strip_prefix("*(.text.")
                && let Some(section) = section.as_mut()
            {
                section.extend(pattern.split(' ').next().map(String::from));
            }
        }
        order.c = read("text-order.txt")?.lines().map(String::from).collect();
        Ok(order)
    }

    /// The functions of `runs`, each once, those of the first run first; Rust functions that
    /// only the `warm` run ran go apart.
    fn next(runs: &[Vec<String>], warm: usize) -> Order {
        let mut seen = BTreeSet::new();
        let mut order = Order::default();
        for (run, functions) in runs.iter().enumerate() {
            for name in functions {
                let rust = is_rust(name);
                let key = if rust {
                    name_pattern(name)
                } else {
                    name.clone()
                };
                if !seen.insert(key.clone()) {
                    continue;
                }
                match (rust, run == warm) {
                    (false, _) => order.c.push(key),
                    (true, false) => order.hot.push(key),
                    (true, true) => order.warm.push(key),
                }
            }
        }
        order
    }

    /// Writes `text-order.ld` and `text-order.txt` into `out_dir`.
    fn write(&self, out_dir: &Path) -> Result<(), String> {
        let mut script = String::from(
            "/* The functions an idle ember runs, laid out together: written by\n   \
             ember-text-order (tools/text-order), read by examples/ember/build.rs. */\n",
        );
        for ((name, insert), patterns) in SECTIONS.iter().zip([&self.hot, &self.warm]) {
            script.push_str(&format!("SECTIONS\n{{\n  {name} : {{\n"));
            for pattern in patterns {
                script.push_str(&format!(
                    "    *(.text.{pattern} .text.unlikely.{pattern})\n"
                ));
            }
            script.push_str(&format!("  }}\n}}\n{insert}\n"));
        }
        let names: String = self.c.iter().map(|name| format!("{name}\n")).collect();
        for (file, text) in [("text-order.ld", &script), ("text-order.txt", &names)] {
            let path = out_dir.join(file);
            fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_lto_suffixes_become_wildcards() {
        assert_eq!(
            name_pattern("_ZN10ember_boot4acpi4fadt17h3d0746bfc6fc50e9E"),
            "_ZN10ember_boot4acpi4fadt17h*E"
        );
        assert_eq!(
            name_pattern("_RNvNtNtCsjrHSEGnQ3l9_3std6thread7current12init_current"),
            "_RNvNtNtCs*_3std6thread7current12init_current"
        );
        assert_eq!(
            name_pattern("_RNvMs5_NtNtCsjrHSEGnQ3l9_3std2io5errorNtB5_5Error4kind.711"),
            "_RNvMs5_NtNtCs*_3std2io5errorNtB5_5Error4kind*"
        );
        assert_eq!(
            name_pattern("_ZN4core3fmt5write17h0123456789abcdefE.llvm.123456"),
            "_ZN4core3fmt5write17h*E*"
        );
        // Not hashes: too short, not hex, no closing `E`.
        assert_eq!(name_pattern("_ZN3foo17habcE"), "_ZN3foo17habcE");
        assert_eq!(
            name_pattern("_ZN3foo17hxyz0123456789abcdE"),
            "_ZN3foo17hxyz0123456789abcdE"
        );
        assert_eq!(name_pattern("_RNvCs_3foo"), "_RNvCs_3foo");
    }

    #[test]
    fn an_order_lists_each_function_once_the_api_run_s_rust_apart_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("ember-text-order-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(Order::read(&dir).unwrap(), Order::default());
        let rust = |name: &str| format!("_ZN4test{}{name}17h0123456789abcdefE", name.len());
        let flags = vec![rust("start"), "memcpy".to_string(), rust("idle")];
        let api = vec![rust("idle"), rust("serve"), "strlen".to_string()];
        let order = Order::next(&[flags, api], 1);
        assert_eq!(order.c, ["memcpy", "strlen"]);
        assert_eq!(order.hot, ["_ZN4test5start17h*E", "_ZN4test4idle17h*E"]);
        assert_eq!(order.warm, ["_ZN4test5serve17h*E"]);
        order.write(&dir).unwrap();
        assert_eq!(Order::read(&dir).unwrap(), order);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nm_lines_give_functions_only() {
        assert_eq!(
            parse_nm_line("0000000000099000 0000000000000012 t _exit"),
            Some((0x99000, 0x12, "_exit".into()))
        );
        assert_eq!(
            parse_nm_line("0000000000455a80 i memcpy"),
            Some((0x455a80, 1, "memcpy".into()))
        );
        assert_eq!(
            parse_nm_line("000000000034ec50 0000000000000008 d some_data"),
            None
        );
        assert_eq!(parse_nm_line("garbage"), None);
    }

    #[test]
    fn functions_on_touched_pages_are_listed_once_in_address_order() {
        let text = Text {
            path: PathBuf::new(),
            offset: 0,
            vaddr: 0,
            functions: vec![
                (0x1000, 0x10, "a".into()),
                (0x1ff0, 0x20, "spans".into()),
                (0x3000, 0x10, "cold".into()),
                (0x4000, 0x10, "a".into()),
            ],
        };
        let pages = BTreeSet::from([0x1000, 0x4000]);
        assert_eq!(text.functions_on(&pages), ["a", "spans"]);
        assert_eq!(text.functions_on(&BTreeSet::from([0x2000])), ["spans"]);
    }

    #[test]
    fn the_executable_segment_of_a_binary_is_found() {
        let elf = tiny_elf(&HALT_FOREVER);
        let (offset, vaddr) = executable_segment(&elf).unwrap();
        assert_eq!(vaddr, ember_boot::test_utils::TINY_LOAD_ADDR);
        assert_eq!(&elf[offset as usize..], HALT_FOREVER);
        assert_eq!(executable_segment(b"\x7fELF\x01"), None);
        assert_eq!(executable_segment(&elf[..0x30]), None);
    }
}
