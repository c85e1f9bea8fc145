//! seccomp filters: each of ember's threads may make only the system calls its work needs.
//!
//! The filters are written in seccompiler's JSON format in `seccomp/x86_64.json`, one per
//! [`ThreadKind`], each rule with a comment saying why it is there. The build compiles them to
//! BPF (`build.rs`) and the binary carries them ([`Filters::builtin`]); `--seccomp-filter PATH`
//! replaces them with a compiled file ([`Filters::from_file`]) in the same format, Firecracker's:
//!
//! ```text
//! u64 LE: number of filters
//! per filter:
//!     u64 LE: length of the thread kind's name, then the name (UTF-8)
//!     u64 LE: number of BPF instructions, then each as struct sock_filter:
//!             code u16 LE, jt u8, jf u8, k u32 LE
//! ```
//!
//! (bincode with fixed-width integers of a `HashMap<String, Vec<sock_filter>>`). A file must
//! hold a filter for every kind of [`ThreadKind::ALL`] and nothing else.
//!
//! Each thread installs its own filter when it starts, before it touches anything a guest or a
//! client controls ([`Filters::install`], or the hooks [`Filters::thread_hook`] and
//! [`Filters::worker_hook`]). Filters are inherited by the threads a thread creates, and stack:
//! a thread runs under its own filter and every filter of the thread that created it. ember's
//! device workers are started by the vCPU that activates the device, so the `vcpu` filter also
//! allows what starting a worker and the worker's own work need; the main thread installs the
//! `vmm` filter only once the vCPUs run, so that they do not inherit it.
//!
//! A call a filter does not allow raises `SIGSYS` (the filters' mismatch action is `trap`).
//! The handler [`install_sigsys_handler`] sets up writes one line to stderr naming the thread
//! and the system call's number, counts the fault, and ends the process with the status
//! [`EXIT_CODE_BAD_SYSCALL`] (148, as Firecracker).

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ember_vcpu::ThreadHook;
use ember_virtio::WorkerHook;

/// The exit status of a process a seccomp filter stopped: Firecracker's.
pub const EXIT_CODE_BAD_SYSCALL: i32 = 148;

/// The largest filter file read: six filters of the kernel's maximum length (4096
/// instructions of 8 bytes) fit with room to spare.
pub const MAX_FILTER_FILE_LEN: u64 = 256 * 1024;

/// The most instructions the kernel accepts in one filter (`BPF_MAXINSNS`).
pub const MAX_PROGRAM_LEN: usize = 4096;

/// The filters built into the binary: each thread kind's name and program, in its read-only
/// data, which every ember process on a host shares.
static BUILTIN: &[(&str, &[SockFilter])] =
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// How many system calls the filters refused; the process ends at the first, so this is read
/// only in tests and by a handler that would let the process go on.
static NUM_FAULTS: AtomicU64 = AtomicU64::new(0);

/// Errors of loading and installing filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter file could not be opened or read.
    #[error("Cannot read the seccomp filter file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The filter file is larger than [`MAX_FILTER_FILE_LEN`].
    #[error("The seccomp filter file is larger than {MAX_FILTER_FILE_LEN} bytes")]
    TooLarge,
    /// The file ends inside a field.
    #[error("The seccomp filter file ends inside {0}")]
    Truncated(&'static str),
    /// A count or length is larger than what the rest of the file can hold.
    #[error(
        "The seccomp filter file gives {what} {count}, more than its remaining {left} bytes hold"
    )]
    CountTooLarge {
        /// What was counted.
        what: &'static str,
        /// The count the file gives.
        count: u64,
        /// The bytes left after it.
        left: usize,
    },
    /// A thread kind's name is not UTF-8.
    #[error("A thread kind's name in the seccomp filter file is not UTF-8")]
    NameNotUtf8,
    /// The file names a thread kind ember does not have.
    #[error(
        "The seccomp filter file has a filter for `{0}`, which is not a thread kind of ember (vmm, api, vcpu, block, net, console)"
    )]
    UnknownThread(String),
    /// The file holds two filters for one kind.
    #[error("The seccomp filter file has two filters for the `{0}` threads")]
    DuplicateThread(ThreadKind),
    /// The file has no filter for a kind.
    #[error("The seccomp filter file has no filter for the `{0}` threads")]
    MissingThread(ThreadKind),
    /// A filter is empty or longer than the kernel accepts.
    #[error(
        "The seccomp filter of the `{kind}` threads has {len} instructions; the kernel takes 1 to {MAX_PROGRAM_LEN}"
    )]
    BadLength {
        /// The thread kind.
        kind: ThreadKind,
        /// The number of instructions.
        len: u64,
    },
    /// Bytes follow the last filter.
    #[error("The seccomp filter file has {0} bytes after its last filter")]
    TrailingBytes(usize),
    /// The kernel refused a filter.
    #[error("Cannot install the seccomp filter of the `{kind}` threads")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("Cannot set PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] io::Error),
    /// The `SIGSYS` handler could not be installed.
    #[error("Cannot install the SIGSYS handler")]
    SigsysHandler(#[source] io::Error),
    /// The thread of [`prepare_runtime`] could not run.
    #[error("Cannot prepare the C library's runtime for the seccomp filters")]
    Prepare(#[source] io::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The kinds of threads ember runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// `vmm`: the main thread, once the vCPUs run: the event loop, the API's requests.
    Vmm,
    /// `api`: the `ember_api` thread, which serves the API socket.
    Api,
    /// `vcpu`: the `ember_vcpu{N}` threads, which run the guest and emulate devices.
    Vcpu,
    /// `block`: the worker of a virtio block device (`ember-blk-{id}`).
    Block,
    /// `net`: the worker of a virtio network device (`ember-net`).
    Net,
    /// `rng`: an entropy device's worker.
    Rng,
    /// `console`: a thread that writes the serial console's output to stdout or a file.
    Console,
    /// `balloon`: the worker of the virtio balloon (`ember-balloon`), which gives guest pages
    /// back with `madvise(MADV_DONTNEED)` and polls statistics on a timerfd.
    Balloon,
    /// `vsock`: the worker of the virtio-vsock device (`ember-vsock`), which accepts host
    /// connections on its Unix socket and connects to `<uds_path>_PORT` for the guest.
    Vsock,
}

impl ThreadKind {
    /// Every kind; a filter file has a filter for each.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::Console,
        ThreadKind::Balloon,
        ThreadKind::Vsock,
    ];

    /// The kind's name in a filter file.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "block",
            ThreadKind::Net => "net",
            ThreadKind::Rng => "rng",
            ThreadKind::Console => "console",
            ThreadKind::Balloon => "balloon",
            ThreadKind::Vsock => "vsock",
        }
    }

    /// The kind named `name` in a filter file.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The kind of the device worker thread named `thread`: `ember-blk...` is a block device's,
    /// `ember-net...` a network device's, `ember-rng...` an entropy device's, `ember-balloon`
    /// the balloon's, `ember-vsock` the vsock device's.
    pub fn of_worker(thread: &str) -> Option<ThreadKind> {
        if thread.starts_with("ember-blk") {
            Some(ThreadKind::Block)
        } else if thread.starts_with("ember-net") {
            Some(ThreadKind::Net)
        } else if thread.starts_with("ember-rng") {
            Some(ThreadKind::Rng)
        } else if thread.starts_with("ember-balloon") {
            Some(ThreadKind::Balloon)
        } else if thread.starts_with("ember-vsock") {
            Some(ThreadKind::Vsock)
        } else {
            None
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    /// The operation.
    pub code: u16,
    /// The jump offset when true.
    pub jt: u8,
    /// The jump offset when false.
    pub jf: u8,
    /// The operand.
    pub k: u32,
}

/// The kernel's `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// A compiled filter for each [`ThreadKind`].
#[derive(Clone, PartialEq, Eq)]
pub struct Filters {
    /// The built-in programs are borrowed from the binary; a file's are its own.
    programs: BTreeMap<ThreadKind, Cow<'static, [SockFilter]>>,
}

impl fmt::Debug for Filters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (kind, program) in &self.programs {
            map.entry(&kind.name(), &program.len());
        }
        map.finish()
    }
}

/// Reads the fields of a filter file, front to back.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.bytes.len() < len {
            return Err(Error::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let bytes = self.take(8, what)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(raw))
    }

    /// A count of items of `item_len` bytes each, checked against the bytes left.
    fn count(&mut self, what: &'static str, item_len: usize) -> Result<usize> {
        let count = self.u64(what)?;
        let left = self.bytes.len();
        let fits = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(item_len))
            .is_some_and(|len| len <= left);
        if !fits {
            return Err(Error::CountTooLarge { what, count, left });
        }
        // Checked just above.
        usize::try_from(count).map_err(|_| Error::CountTooLarge { what, count, left })
    }
}

impl Filters {
    /// The filters built into the binary from `seccomp/x86_64.json`, borrowed from its
    /// read-only data rather than copied into the heap. The build compiled one for every kind
    /// (the tests check them as [`parse`](Self::parse) checks a file's).
    pub fn builtin() -> Filters {
        let programs = BUILTIN
            .iter()
            .filter_map(|&(name, program)| {
                Some((ThreadKind::from_name(name)?, Cow::Borrowed(program)))
            })
            .collect();
        Filters { programs }
    }

    /// Reads a compiled filter file (the format of the [module documentation](self)).
    ///
    /// # Errors
    ///
    /// [`Error::Read`] when the file cannot be read, [`Error::TooLarge`] when it is over
    /// [`MAX_FILTER_FILE_LEN`], and the errors of [`parse`](Self::parse).
    pub fn from_file(path: &Path) -> Result<Filters> {
        let read_error = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        // One byte more than the limit tells a file over it, without reading all of it.
        file.take(MAX_FILTER_FILE_LEN.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if u64::try_from(bytes.len()).map_or(true, |len| len > MAX_FILTER_FILE_LEN) {
            return Err(Error::TooLarge);
        }
        Filters::parse(&bytes)
    }

    /// Parses filters in the file format.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] over [`MAX_FILTER_FILE_LEN`]; [`Error::Truncated`],
    /// [`Error::CountTooLarge`] or [`Error::TrailingBytes`] when the layout is wrong;
    /// [`Error::NameNotUtf8`], [`Error::UnknownThread`], [`Error::DuplicateThread`] or
    /// [`Error::MissingThread`] when the kinds are not exactly [`ThreadKind::ALL`];
    /// [`Error::BadLength`] for an empty filter or one longer than [`MAX_PROGRAM_LEN`].
    pub fn parse(bytes: &[u8]) -> Result<Filters> {
        if u64::try_from(bytes.len()).map_or(true, |len| len > MAX_FILTER_FILE_LEN) {
            return Err(Error::TooLarge);
        }
        let mut reader = Reader { bytes };
        // A filter takes at least 16 bytes: its name's length and its instruction count.
        let count = reader.count("the number of filters", 16)?;
        let mut programs = BTreeMap::new();
        for _ in 0..count {
            let name_len = reader.count("the length of a thread kind's name", 1)?;
            let name = reader.take(name_len, "a thread kind's name")?;
            let name = std::str::from_utf8(name).map_err(|_| Error::NameNotUtf8)?;
            let kind = ThreadKind::from_name(name)
                .ok_or_else(|| Error::UnknownThread(name.to_string()))?;
            let len = reader.count("the number of instructions", 8)?;
            if len == 0 || len > MAX_PROGRAM_LEN {
                return Err(Error::BadLength {
                    kind,
                    len: u64::try_from(len).unwrap_or(u64::MAX),
                });
            }
            let mut program = Vec::with_capacity(len);
            for _ in 0..len {
                let raw = reader.take(8, "an instruction")?;
                program.push(SockFilter {
                    code: u16::from_le_bytes([raw[0], raw[1]]),
                    jt: raw[2],
                    jf: raw[3],
                    k: u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
                });
            }
            if programs.insert(kind, Cow::Owned(program)).is_some() {
                return Err(Error::DuplicateThread(kind));
            }
        }
        if !reader.bytes.is_empty() {
            return Err(Error::TrailingBytes(reader.bytes.len()));
        }
        if let Some(missing) = ThreadKind::ALL
            .into_iter()
            .find(|kind| !programs.contains_key(kind))
        {
            return Err(Error::MissingThread(missing));
        }
        Ok(Filters { programs })
    }

    /// The filters in the file format, kinds sorted by name (as the build writes them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let put = |bytes: &mut Vec<u8>, n: usize| {
            // A usize always fits in a u64 on the 64-bit hosts ember runs on.
            bytes.extend_from_slice(&u64::try_from(n).unwrap_or(u64::MAX).to_le_bytes());
        };
        put(&mut bytes, self.programs.len());
        let mut sorted: Vec<_> = self.programs.iter().collect();
        sorted.sort_by_key(|(kind, _)| kind.name());
        for (kind, program) in sorted {
            put(&mut bytes, kind.name().len());
            bytes.extend_from_slice(kind.name().as_bytes());
            put(&mut bytes, program.len());
            for insn in program.iter() {
                bytes.extend_from_slice(&insn.code.to_le_bytes());
                bytes.extend_from_slice(&[insn.jt, insn.jf]);
                bytes.extend_from_slice(&insn.k.to_le_bytes());
            }
        }
        bytes
    }

    /// The filter of `kind`.
    pub fn program(&self, kind: ThreadKind) -> &[SockFilter] {
        // `parse`, the only constructor, checked that every kind has one; an empty program is
        // refused by `install`.
        self.programs.get(&kind).map_or(&[], |program| program)
    }

    /// Installs the filter of `kind` on the calling thread, and remembers the kind and the
    /// thread's name for the `SIGSYS` handler's line.
    ///
    /// # Errors
    ///
    /// [`Error::Install`] when the kernel refuses the filter.
    pub fn install(&self, kind: ThreadKind) -> Result<()> {
        remember_thread(kind);
        install_program(self.program(kind)).map_err(|source| Error::Install { kind, source })
    }

    /// A hook for a vCPU or the API thread that installs the filter of `kind` on the thread it
    /// runs on.
    pub fn thread_hook(self: &Arc<Self>, kind: ThreadKind) -> ThreadHook {
        let filters = Arc::clone(self);
        Box::new(move || filters.install(kind).map_err(io::Error::other))
    }

    /// A hook for device workers that installs the filter of the worker's kind, found from its thread name ([`ThreadKind::of_worker`]); a worker of
    /// an unknown kind is refused.
    pub fn worker_hook(self: &Arc<Self>) -> WorkerHook {
        let filters = Arc::clone(self);
        Arc::new(move |thread: &str| {
            let kind = ThreadKind::of_worker(thread).ok_or_else(|| {
                io::Error::other(format!(
                    "no seccomp filter for the device worker thread `{thread}`"
                ))
            })?;
            filters.install(kind).map_err(io::Error::other)
        })
    }
}

/// Installs `program` as a seccomp filter of the calling thread, on top of those it has.
///
/// `PR_SET_NO_NEW_PRIVS` must be set already ([`set_no_new_privs`]), or the caller must have
/// `CAP_SYS_ADMIN`.
///
/// # Errors
///
/// When the program is empty or longer than [`MAX_PROGRAM_LEN`] (`EINVAL`), or the kernel
/// refuses it.
pub fn install_program(program: &[SockFilter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .ok()
        .filter(|&len| len > 0 && usize::from(len) <= MAX_PROGRAM_LEN)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = SockFprog {
        len,
        filter: program.as_ptr(),
    };
    // SAFETY: `prog` points at `len` valid instructions, which the kernel copies before the
    // call returns; no flags are given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &prog as *const SockFprog,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `PR_SET_NO_NEW_PRIVS` on the calling thread, which threads it creates inherit: no
/// `execve` can give the process more privileges (set-user-ID, file capabilities), and an
/// unprivileged process may install seccomp filters.
///
/// # Errors
///
/// [`Error::NoNewPrivs`] when `prctl` fails.
pub fn set_no_new_privs() -> Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes no pointers.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if ret != 0 {
        return Err(Error::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(())
}

/// Has the C library do now, before any filter is installed, what it does once per process
/// the first time the heap of a thread other than the main one shrinks: glibc then reads
/// `/proc/sys/vm/overcommit_memory` (`check_may_shrink_heap`) and keeps the answer. Without
/// this, the first worker whose buffers grow and are freed (the vsock device's, under a flood)
/// would open that file under a filter that refuses `openat`, and end the process.
///
/// A thread of its own allocates blocks over glibc's trim threshold (128 KiB) in all, each
/// under its `mmap` threshold so that they come from the thread's heap, and frees them, last
/// first: the heap's free top passes the threshold and glibc shrinks it. The blocks are never
/// written, so that the part of the heap glibc keeps (its top pad, 128 KiB) is not resident.
///
/// # Errors
///
/// [`Error::Prepare`] when the thread cannot be started or panics.
pub fn prepare_runtime() -> Result<()> {
    /// One block: under glibc's default `mmap` threshold (128 KiB).
    const BLOCK: usize = 96 << 10;
    /// Blocks, so that what is freed is well over the trim threshold.
    const BLOCKS: usize = 8;
    let thread = std::thread::Builder::new()
        .name("ember-prepare".into())
        .spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|_| Vec::with_capacity(BLOCK)).collect();
            std::hint::black_box(&mut blocks);
            while let Some(block) = blocks.pop() {
                drop(std::hint::black_box(block));
            }
        })
        .map_err(Error::Prepare)?;
    thread
        .join()
        .map_err(|_| Error::Prepare(io::Error::other("the thread panicked")))
}

/// How many system calls a filter refused (`seccomp.num_faults`).
pub fn num_faults() -> u64 {
    NUM_FAULTS.load(Ordering::Relaxed)
}

/// The longest thread name the `SIGSYS` handler's line shows; ember's are shorter.
const THREAD_NAME_LEN: usize = 32;

thread_local! {
    /// The kind of filter the thread installed, for the `SIGSYS` handler, which can make no
    /// system call to find out. Constant-initialised, without a destructor: reading it is a
    /// plain thread-local load, safe in a signal handler.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
    /// The thread's name, cut to [`THREAD_NAME_LEN`] bytes, and its length.
    static NAME: Cell<([u8; THREAD_NAME_LEN], usize)> = const { Cell::new(([0; THREAD_NAME_LEN], 0)) };
}

fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; THREAD_NAME_LEN];
    let current = std::thread::current();
    let given = current.name().unwrap_or("main").as_bytes();
    let len = given.len().min(THREAD_NAME_LEN);
    name[..len].copy_from_slice(&given[..len]);
    KIND.set(Some(kind));
    NAME.set((name, len));
}

/// `si_code` of a `SIGSYS` a seccomp filter raised.
const SYS_SECCOMP: libc::c_int = 1;

/// A line built in a fixed buffer, without allocating: what a signal handler may do.
struct StackLine {
    buf: [u8; 256],
    len: usize,
}

impl StackLine {
    fn push(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = byte;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            // A digit: n % 10 < 10.
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }
}

/// The `SIGSYS` handler: one line on stderr, the fault counted, the process ended with
/// [`EXIT_CODE_BAD_SYSCALL`]. Only async-signal-safe steps: thread-local loads, a stack
/// buffer, `write` and `_exit`, which every filter allows.
extern "C" fn handle_sigsys(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    NUM_FAULTS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler. For SIGSYS, the
    // system call's number is the int at byte 24 (`si_syscall` of the `_sigsys` member, after
    // si_signo, si_errno, si_code, padding and `_call_addr`).
    let (code, syscall) = unsafe {
        let code = (*info).si_code;
        let syscall = info
            .cast::<u8>()
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned();
        (code, syscall)
    };
    let mut line = StackLine {
        buf: [0; 256],
        len: 0,
    };
    if signal != libc::SIGSYS || code != SYS_SECCOMP {
        line.push(b"ember: unexpected SIGSYS\n");
    } else {
        let (name, len) = NAME.get();
        line.push(b"ember: seccomp: thread ");
        line.push(if len == 0 { b"?" } else { &name[..len] });
        line.push(b" (");
        line.push(KIND.get().map_or("unfiltered", ThreadKind::name).as_bytes());
        line.push(b" filter) made the forbidden system call ");
        line.push_number(u64::try_from(syscall).unwrap_or(u64::MAX));
        line.push(b"; exiting with status 148\n");
    }
    // SAFETY: `write` and `_exit` are async-signal-safe; the buffer is valid for `line.len`
    // bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_CODE_BAD_SYSCALL);
    }
}

/// Installs the process-wide `SIGSYS` handler that reports a refused system call and ends
/// the process (see the [module documentation](self)).
///
/// # Errors
///
/// [`Error::SigsysHandler`] when `sigaction` fails.
pub fn install_sigsys_handler() -> Result<()> {
    // SAFETY: an all-zero sigaction is valid: no flags, an empty mask, no handler yet.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handle_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler has the SA_SIGINFO signature, and
    // the handler only makes async-signal-safe calls.
    let ret = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(Error::SigsysHandler(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_filter(name: &str, program: &[SockFilter]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(name.len() as u64).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.extend_from_slice(&[insn.jt, insn.jf]);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        bytes
    }

    /// A file with one small filter for each of `names`.
    fn file(names: &[&str]) -> Vec<u8> {
        let allow = SockFilter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        };
        let mut bytes = (names.len() as u64).to_le_bytes().to_vec();
        for name in names {
            bytes.extend(one_filter(name, &[allow]));
        }
        bytes
    }

    const ALL_NAMES: [&str; 9] = [
        "vmm", "api", "vcpu", "block", "net", "rng", "console", "balloon", "vsock",
    ];

    #[test]
    fn the_builtin_filters_have_every_kind_and_round_trip() {
        let filters = Filters::builtin();
        for kind in ThreadKind::ALL {
            let len = filters.program(kind).len();
            assert!(len > 10 && len <= MAX_PROGRAM_LEN, "{kind}: {len}");
        }
        // Through the file format and its checks: the same programs, each kind once.
        assert_eq!(Filters::parse(&filters.to_bytes()).unwrap(), filters);
        assert_eq!(BUILTIN.len(), ThreadKind::ALL.len());
    }

    #[test]
    fn a_file_with_every_kind_parses_in_any_order() {
        let mut names = ALL_NAMES;
        names.reverse();
        let filters = Filters::parse(&file(&names)).unwrap();
        assert_eq!(filters.program(ThreadKind::Net)[0].k, 0x7fff_0000);
    }

    #[test]
    fn a_missing_kind_is_named() {
        let err = Filters::parse(&file(&["vmm", "api", "vcpu"])).unwrap_err();
        assert!(
            matches!(err, Error::MissingThread(ThreadKind::Block)),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "The seccomp filter file has no filter for the `block` threads"
        );
    }

    #[test]
    fn unknown_and_repeated_kinds_are_refused() {
        let mut names = ALL_NAMES.to_vec();
        names.push("jailer");
        let err = Filters::parse(&file(&names)).unwrap_err();
        assert!(
            matches!(err, Error::UnknownThread(ref name) if name == "jailer"),
            "{err}"
        );
        let mut names = ALL_NAMES.to_vec();
        names.push("vcpu");
        let err = Filters::parse(&file(&names)).unwrap_err();
        assert!(
            matches!(err, Error::DuplicateThread(ThreadKind::Vcpu)),
            "{err}"
        );
    }

    #[test]
    fn counts_larger_than_the_file_are_refused_before_allocating() {
        let err = Filters::parse(&u64::MAX.to_le_bytes()).unwrap_err();
        assert!(matches!(err, Error::CountTooLarge { .. }), "{err}");
        // A name length past the end.
        let mut bytes = 1u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1000u64.to_le_bytes());
        bytes.extend_from_slice(b"vmm");
        bytes.extend_from_slice(&[0; 8]);
        let err = Filters::parse(&bytes).unwrap_err();
        assert!(
            matches!(err, Error::CountTooLarge { count: 1000, .. }),
            "{err}"
        );
        // An instruction count past the end.
        let mut bytes = 1u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&3u64.to_le_bytes());
        bytes.extend_from_slice(b"vmm");
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = Filters::parse(&bytes).unwrap_err();
        assert!(matches!(err, Error::CountTooLarge { .. }), "{err}");
    }

    #[test]
    fn truncated_and_padded_files_are_refused() {
        let whole = file(&ALL_NAMES);
        for cut in [0, 7, 8, 20, whole.len() - 1] {
            assert!(Filters::parse(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = whole.clone();
        padded.push(0);
        assert!(matches!(
            Filters::parse(&padded),
            Err(Error::TrailingBytes(1))
        ));
    }

    #[test]
    fn empty_and_oversized_filters_and_files_are_refused() {
        let mut bytes = 1u64.to_le_bytes().to_vec();
        bytes.extend(one_filter("vmm", &[]));
        assert!(matches!(
            Filters::parse(&bytes),
            Err(Error::BadLength { len: 0, .. })
        ));
        let long = vec![
            SockFilter {
                code: 6,
                jt: 0,
                jf: 0,
                k: 0
            };
            MAX_PROGRAM_LEN + 1
        ];
        let mut bytes = 1u64.to_le_bytes().to_vec();
        bytes.extend(one_filter("vmm", &long));
        assert!(matches!(
            Filters::parse(&bytes),
            Err(Error::BadLength { len: 4097, .. })
        ));
        let huge = vec![0u8; usize::try_from(MAX_FILTER_FILE_LEN).unwrap() + 1];
        assert!(matches!(Filters::parse(&huge), Err(Error::TooLarge)));
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused() {
        let mut bytes = 1u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xfe]);
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(Filters::parse(&bytes), Err(Error::NameNotUtf8)));
    }

    #[test]
    fn worker_threads_are_known_by_their_names() {
        assert_eq!(ThreadKind::of_worker("ember-net"), Some(ThreadKind::Net));
        assert_eq!(ThreadKind::of_worker("ember-blk"), Some(ThreadKind::Block));
        assert_eq!(
            ThreadKind::of_worker("ember-balloon"),
            Some(ThreadKind::Balloon)
        );
        assert_eq!(
            ThreadKind::of_worker("ember-vsock"),
            Some(ThreadKind::Vsock)
        );
        assert_eq!(
            ThreadKind::of_worker("ember-blk-rootfs"),
            Some(ThreadKind::Block)
        );
        assert_eq!(ThreadKind::of_worker("ember_vcpu0"), None);
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
    }

    #[test]
    fn the_handler_line_names_the_thread_and_the_number() {
        let mut line = StackLine {
            buf: [0; 256],
            len: 0,
        };
        line.push(b"n=");
        line.push_number(0);
        line.push(b",");
        line.push_number(41);
        line.push(b",");
        line.push_number(u64::MAX);
        assert_eq!(&line.buf[..line.len], b"n=0,41,18446744073709551615");
        // A line longer than the buffer is cut, not overflowed.
        line.push(&[b'x'; 300]);
        assert_eq!(line.len, 256);
    }
}
