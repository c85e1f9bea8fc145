//! Guest memory served by a userfaultfd: the Uffd backend of snapshot restore, both ends.
//!
//! A VMM that restores a snapshot can leave its guest memory empty and let another process fill
//! it in as the guest touches it, the way Firecracker's `Uffd` memory backend does:
//!
//! 1. The VMM maps guest memory anonymous and private ([`create_guest_memory_uffd`]), creates a
//!    userfaultfd and registers every region with it in missing mode ([`Userfault`]): from then
//!    on a first access to a page, by the VMM, a device or KVM on behalf of a vCPU, blocks in the
//!    kernel and queues a page-fault event on the userfaultfd.
//! 2. It connects to the Unix socket the page-fault handler listens on and sends it one message
//!    ([`Userfault::send_to_handler`]): a JSON array of [`UffdRegion`]s, with the userfaultfd
//!    attached (`SCM_RIGHTS`). The socket stays open while the [`Userfault`] lives, so that the
//!    handler sees the VMM go away.
//! 3. The handler maps the memory file, reads the events from the userfaultfd and answers each
//!    fault by copying the page from the file into the VMM's memory (`UFFDIO_COPY`), which wakes
//!    the faulting thread ([`FaultHandler`]). A range the VMM gave back to the host (a balloon
//!    inflating: `UFFD_EVENT_REMOVE`) is served with zero pages from then on.
//!
//! The message is Firecracker's, so the handlers written for Firecracker serve ember and the other
//! way round: `[{"base_host_virt_addr":140..,"size":..,"offset":0,"page_size":4096,
//! "page_size_kib":4096}, ...]`. `page_size_kib` repeats `page_size`, in bytes despite its name,
//! as Firecracker sends it.
//!
//! # Permissions
//!
//! KVM touches guest memory from the kernel, so the userfaultfd must handle faults from kernel
//! mode: its creator needs `CAP_SYS_PTRACE` unless the sysctl `vm.unprivileged_userfaultfd` is
//! 1, or read-write access to `/dev/userfaultfd` (Linux 6.1 and later), which is tried when the
//! `userfaultfd(2)` system call is refused.
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//!
//! use ember_memory::uffd::create_guest_memory_uffd;
//! use ember_memory::{Bytes, GuestAddress, MemoryOptions};
//!
//! // A handler listens on /run/uffd.sock and serves the snapshot's memory file.
//! let (mem, mut userfault) = create_guest_memory_uffd(128 << 20, MemoryOptions::default())?;
//! let regions = userfault.regions().to_vec();
//! userfault.send_to_handler(Path::new("/run/uffd.sock"), &regions)?;
//! // The first access to a page waits for the handler to copy it in.
//! let word: u64 = mem.read_obj(GuestAddress(0x1000))?;
//! # let _ = word;
//! // Keep `userfault` as long as `mem`: dropping it tells the handler the VMM is gone.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{MemoryOptions, PAGE_SIZE, create_guest_memory};

// The userfaultfd ABI, from linux/userfaultfd.h (libc does not have it).

/// `UFFD_API`: the API version `UFFDIO_API` negotiates.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO`: the ioctl type of the userfaultfd ioctls.
const UFFDIO: u64 = 0xaa;
/// `_UFFDIO_REGISTER`, `_UFFDIO_WAKE`, `_UFFDIO_COPY`, `_UFFDIO_ZEROPAGE`, `_UFFDIO_API`: ioctl
/// numbers, also the bits of the `ioctls` masks the kernel returns.
const NR_REGISTER: u64 = 0x00;
const NR_WAKE: u64 = 0x02;
const NR_COPY: u64 = 0x03;
const NR_ZEROPAGE: u64 = 0x04;
const NR_API: u64 = 0x3f;
/// `UFFD_FEATURE_EVENT_REMOVE`: `madvise(MADV_DONTNEED)` on a registered range queues an event.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on pages not yet present.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFD_EVENT_PAGEFAULT` and `UFFD_EVENT_REMOVE`: the `event` of a `uffd_msg`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on `/dev/userfaultfd` makes a userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0xaa, 0x00, 0);

/// `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h (x86_64 and aarch64 use it).
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// `_IOWR(UFFDIO, nr, T)`.
const fn iowr<T>(nr: u64) -> u64 {
    ioc(3, UFFDIO, nr, size_of::<T>())
}

/// `_IOR(UFFDIO, nr, T)`.
const fn ior<T>(nr: u64) -> u64 {
    ioc(2, UFFDIO, nr, size_of::<T>())
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event byte, 7 reserved bytes, then the event's
/// arguments, read here as three `u64`s (`pagefault`: flags, address, thread id; `remove`: start,
/// end).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    arg: [u64; 3],
}

const UFFDIO_API: u64 = iowr::<UffdioApi>(NR_API);
const UFFDIO_REGISTER: u64 = iowr::<UffdioRegister>(NR_REGISTER);
const UFFDIO_WAKE: u64 = ior::<UffdioRange>(NR_WAKE);
const UFFDIO_COPY: u64 = iowr::<UffdioCopy>(NR_COPY);
const UFFDIO_ZEROPAGE: u64 = iowr::<UffdioZeropage>(NR_ZEROPAGE);

/// The largest page size a region may have: 1 GiB, the largest huge page of x86_64.
const MAX_PAGE_SIZE: u64 = 1 << 30;
/// The longest handshake message a handler accepts, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 << 10;
/// The most regions a handshake message may describe.
pub const MAX_REGIONS: usize = 1024;
/// The most file descriptors a handler accepts with the message (the userfaultfd first; the
/// others are closed).
const MAX_FDS: usize = 4;
/// The most page faults a handler keeps waiting for a retry.
const MAX_PENDING: usize = 4096;
/// How many events a handler reads with one `read`.
const EVENTS_PER_READ: usize = 16;

/// Errors of the Uffd memory backend, on the VMM's side and on the handler's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest memory could not be created.
    #[error("Cannot create the guest memory to register with the userfaultfd")]
    Memory(#[source] crate::Error),
    /// Creating a userfaultfd was refused for lack of privilege.
    #[error(
        "Not allowed to create a userfaultfd that handles kernel faults: grant CAP_SYS_PTRACE, \
         set the sysctl vm.unprivileged_userfaultfd to 1, or give read-write access to \
         /dev/userfaultfd"
    )]
    Permission(#[source] io::Error),
    /// The host kernel has no userfaultfd (`CONFIG_USERFAULTFD`).
    #[error("The host kernel does not support userfaultfd")]
    Unsupported(#[source] io::Error),
    /// Creating a userfaultfd failed for another reason.
    #[error("Cannot create a userfaultfd")]
    Create(#[source] io::Error),
    /// `UFFDIO_API` failed: the kernel lacks a feature the backend needs (`EVENT_REMOVE`, Linux
    /// 4.11).
    #[error("Cannot enable the userfaultfd API with remove events")]
    Api(#[source] io::Error),
    /// A guest memory region could not be registered with the userfaultfd.
    #[error(
        "Cannot register {len:#x} bytes of guest memory at host address {addr:#x} with the userfaultfd"
    )]
    Register {
        /// Host address of the region.
        addr: u64,
        /// Length of the region in bytes.
        len: u64,
        /// The error of `UFFDIO_REGISTER`.
        #[source]
        source: io::Error,
    },
    /// A registered region cannot be filled with `UFFDIO_COPY`.
    #[error(
        "The guest memory at host address {0:#x} cannot be filled by copy through the userfaultfd"
    )]
    CopyUnsupported(u64),
    /// No page-fault handler listens on the socket.
    #[error("No page-fault handler listens on {path}")]
    HandlerNotListening {
        /// The socket's path.
        path: PathBuf,
        /// The error of `connect`.
        #[source]
        source: io::Error,
    },
    /// Connecting to the handler's socket failed for another reason.
    #[error("Cannot connect to the page-fault handler's socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The error of `connect`.
        #[source]
        source: io::Error,
    },
    /// The userfaultfd was already sent to a handler.
    #[error("The userfaultfd was already sent to a page-fault handler")]
    AlreadySent,
    /// Sending the message and the userfaultfd failed.
    #[error("Cannot send the guest memory regions and the userfaultfd to the handler")]
    Send(#[source] io::Error),
    /// Receiving the message from the VMM failed.
    #[error("Cannot receive the guest memory regions from the VMM")]
    Receive(#[source] io::Error),
    /// The VMM closed the connection before sending a whole message.
    #[error("The VMM closed the connection before sending its guest memory regions")]
    Disconnected,
    /// The message came without a userfaultfd.
    #[error("The VMM's message came without a userfaultfd attached")]
    NoDescriptor,
    /// The message is longer than [`MAX_MESSAGE_LEN`].
    #[error("The VMM's message is longer than {MAX_MESSAGE_LEN} bytes")]
    MessageTooLong,
    /// The message is not a JSON array of regions.
    #[error("The VMM's message is not a JSON array of guest memory regions")]
    Message(#[source] serde_json::Error),
    /// A region of the message is not usable.
    #[error("Guest memory region {index} of the VMM's message is invalid: {reason}")]
    InvalidRegion {
        /// Index of the region in the message.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The memory file could not be read or mapped.
    #[error("Cannot map the memory file")]
    MemoryFile(#[source] io::Error),
    /// Reading events from the userfaultfd failed.
    #[error("Cannot read events from the userfaultfd")]
    ReadEvent(#[source] io::Error),
    /// Waiting for events failed.
    #[error("Cannot wait for events on the userfaultfd and the VMM's socket")]
    Poll(#[source] io::Error),
    /// A page fault hit an address no region describes.
    #[error("Page fault at host address {0:#x}, outside every guest memory region")]
    UnknownFault(u64),
    /// A page could not be copied or zeroed into the VMM's memory.
    #[error("Cannot fill the page at host address {addr:#x} through the userfaultfd")]
    Fill {
        /// Host address of the page.
        addr: u64,
        /// The error of `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`.
        #[source]
        source: io::Error,
    },
}

/// Result type of the Uffd memory backend.
pub type Result<T> = std::result::Result<T, Error>;

/// One guest memory region as the VMM describes it to the page-fault handler: Firecracker's
/// `GuestRegionUffdMapping`.
///
/// The region's contents are `size` bytes at `offset` in the memory file, to be copied to the
/// VMM's addresses `base_host_virt_addr..base_host_virt_addr + size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UffdRegion {
    /// Host virtual address (in the VMM) where the region starts.
    pub base_host_virt_addr: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Offset of the region's contents in the memory file.
    pub offset: u64,
    /// Size of the pages backing the region, in bytes.
    pub page_size: u64,
    /// The same as `page_size`, in bytes despite the name: Firecracker's older name of the
    /// field, sent for the handlers that read it. A handler ignores it.
    #[serde(default)]
    pub page_size_kib: u64,
}

impl UffdRegion {
    /// A region of `size` bytes at host address `base_host_virt_addr`, its contents at `offset`
    /// in the memory file, backed by pages of `page_size` bytes.
    pub fn new(base_host_virt_addr: u64, size: u64, offset: u64, page_size: u64) -> Self {
        Self {
            base_host_virt_addr,
            size,
            offset,
            page_size,
            page_size_kib: page_size,
        }
    }

    /// Checks what a handler relies on: a power-of-two page size from 4 KiB to 1 GiB, a base and
    /// size that are multiples of it, and ranges that do not overflow. `reason` says what is
    /// wrong otherwise.
    fn check(&self) -> std::result::Result<(), String> {
        let page = self.page_size;
        if !(PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page) || !page.is_power_of_two() {
            return Err(format!(
                "page size {page:#x} is not a power of two from 4 KiB to 1 GiB"
            ));
        }
        if self.size == 0 {
            return Err("it is empty".into());
        }
        if self.base_host_virt_addr % page != 0 || self.size % page != 0 {
            return Err(format!(
                "address {:#x} or size {:#x} is not a multiple of the page size {page:#x}",
                self.base_host_virt_addr, self.size
            ));
        }
        if self.base_host_virt_addr.checked_add(self.size).is_none() {
            return Err("it ends past the address space".into());
        }
        if self.offset.checked_add(self.size).is_none() {
            return Err("it ends past the largest file offset".into());
        }
        Ok(())
    }

    /// Whether host address `addr` is in the region.
    fn contains(&self, addr: u64) -> bool {
        addr.checked_sub(self.base_host_virt_addr)
            .is_some_and(|offset| offset < self.size)
    }
}

/// A userfaultfd with guest memory registered on it, on the VMM's side.
///
/// Keep it as long as the guest memory it serves: dropping it closes the VMM's end of the
/// handler's socket, which tells the handler to stop.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    regions: Vec<UffdRegion>,
    handler: Option<UnixStream>,
}

impl Userfault {
    /// Creates a userfaultfd (close-on-exec and non-blocking) that handles faults from kernel
    /// mode too, and enables its API with remove events.
    ///
    /// The `userfaultfd(2)` system call is tried first, then `/dev/userfaultfd` when the call is
    /// refused with `EPERM`.
    ///
    /// # Errors
    ///
    /// [`Error::Permission`] when neither is allowed, [`Error::Unsupported`] when the kernel has
    /// no userfaultfd, [`Error::Create`] for other failures, [`Error::Api`] when the kernel lacks
    /// remove events.
    pub fn new() -> Result<Self> {
        let fd = open_userfaultfd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_EVENT_REMOVE,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is; `fd` is a
        // userfaultfd we own.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if ret != 0 {
            return Err(Error::Api(io::Error::last_os_error()));
        }
        if api.ioctls & (1 << NR_REGISTER) == 0 {
            return Err(Error::Api(io::Error::from_raw_os_error(libc::ENOTSUP)));
        }
        Ok(Self {
            fd,
            regions: Vec::new(),
            handler: None,
        })
    }

    /// Registers every region of `mem` with the userfaultfd in missing mode, and records each
    /// as a [`UffdRegion`] with 4 KiB pages, its contents in the memory file after those of the
    /// regions before it (in [`regions`](Self::regions)): the layout of ember's memory files.
    ///
    /// The regions must be anonymous private (or shared memory) mappings whose pages are not
    /// present yet: a page already touched is not reported.
    ///
    /// # Errors
    ///
    /// [`Error::Register`] when the kernel refuses a region (a file mapping, say);
    /// [`Error::CopyUnsupported`] when a region cannot be filled by copy.
    pub fn register<B: Bitmap>(&mut self, mem: &GuestMemoryMmap<B>) -> Result<()> {
        let mut offset = self
            .regions
            .last()
            .map_or(0, |r| r.offset.saturating_add(r.size));
        for region in mem.iter() {
            let addr = region.as_ptr().addr() as u64;
            let len = region.len();
            let mut register = UffdioRegister {
                range: UffdioRange { start: addr, len },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            let fd = self.fd.as_raw_fd();
            // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which
            // `register` is. Registering changes how missing pages of the range are filled, never
            // the validity of the mapping `mem` owns.
            let ret = unsafe { libc::ioctl(fd, UFFDIO_REGISTER as _, &mut register) };
            if ret != 0 {
                let source = io::Error::last_os_error();
                return Err(Error::Register { addr, len, source });
            }
            if register.ioctls & (1 << NR_COPY) == 0 {
                return Err(Error::CopyUnsupported(addr));
            }
            self.regions
                .push(UffdRegion::new(addr, len, offset, PAGE_SIZE));
            offset = offset.saturating_add(len);
        }
        Ok(())
    }

    /// The regions registered so far, as [`register`](Self::register) describes them.
    pub fn regions(&self) -> &[UffdRegion] {
        &self.regions
    }

    /// Connects to the page-fault handler listening on `socket_path` and sends it `regions` as
    /// a JSON array, with the userfaultfd attached: Firecracker's handshake.
    ///
    /// The connection stays open until `self` is dropped, so that the handler sees the VMM go.
    /// `regions` is usually [`regions`](Self::regions); a VMM whose memory file has another
    /// layout sends its own offsets.
    ///
    /// # Errors
    ///
    /// [`Error::HandlerNotListening`] when nothing listens on the socket,
    /// [`Error::Connect`] for other connection failures, [`Error::Send`] when the message cannot
    /// be sent, [`Error::AlreadySent`] on a second call.
    pub fn send_to_handler(&mut self, socket_path: &Path, regions: &[UffdRegion]) -> Result<()> {
        if self.handler.is_some() {
            return Err(Error::AlreadySent);
        }
        let stream = UnixStream::connect(socket_path).map_err(|source| {
            let path = socket_path.to_path_buf();
            match source.raw_os_error() {
                Some(libc::ENOENT | libc::ECONNREFUSED) => {
                    Error::HandlerNotListening { path, source }
                }
                _ => Error::Connect { path, source },
            }
        })?;
        let message = serde_json::to_vec(regions)
            .map_err(|e| Error::Send(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        send_with_fd(&stream, &message, self.fd.as_fd()).map_err(Error::Send)?;
        self.handler = Some(stream);
        Ok(())
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Creates `size` bytes of guest RAM as [`create_guest_memory`] does, every region registered
/// with a new userfaultfd: nothing is in the memory until a page-fault handler fills it.
///
/// The regions are private anonymous mappings, so a page the handler zeroes or that the guest
/// frees (a balloon) stays the VMM's alone. Send the userfaultfd to the handler with
/// [`Userfault::send_to_handler`] before anything touches the memory: an access blocks until
/// the handler serves it.
///
/// # Errors
///
/// [`Error::Memory`] when the memory cannot be created, and those of [`Userfault::new`] and
/// [`Userfault::register`].
pub fn create_guest_memory_uffd(
    size: u64,
    options: MemoryOptions,
) -> Result<(GuestMemoryMmap, Userfault)> {
    let mem = create_guest_memory(size, options).map_err(Error::Memory)?;
    let mut userfault = Userfault::new()?;
    userfault.register(&mem)?;
    Ok((mem, userfault))
}

/// Makes a userfaultfd with the system call, or from `/dev/userfaultfd` when the call is
/// refused.
fn open_userfaultfd() -> Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes flags only and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret >= 0 {
        // SAFETY: the call returned a new descriptor, which nothing else owns; descriptors
        // fit in an int.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => open_dev_userfaultfd(flags).ok_or(Error::Permission(err)),
        Some(libc::ENOSYS) => Err(Error::Unsupported(err)),
        _ => Err(Error::Create(err)),
    }
}

/// Makes a userfaultfd with `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1 and later),
/// whose file permissions grant it; `None` when the device is missing or refused.
fn open_dev_userfaultfd(flags: libc::c_int) -> Option<OwnedFd> {
    let dev = File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .ok()?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument and returns
    // the descriptor or -1.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    // SAFETY: a non-negative result is a new descriptor, which nothing else owns.
    (ret >= 0).then(|| unsafe { OwnedFd::from_raw_fd(ret) })
}

/// Sends `data` on `stream` with `fd` attached (`SCM_RIGHTS`), in one message.
fn send_with_fd(stream: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    // Room for one descriptor's control message, aligned for `cmsghdr`.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    debug_assert!(space <= size_of::<[u64; 4]>());
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at `control`, which has room for the first header and one
    // descriptor (`space` bytes); CMSG_FIRSTHDR returns a pointer into it, and CMSG_DATA a
    // pointer past its header, inside `control`, where an int fits.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
    }
    loop {
        // SAFETY: `msg` describes `data` to read from and the control message built above;
        // sendmsg reads them and nothing else.
        let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            // One message on a stream socket: the kernel takes all of a small one, and a short
            // write of a large one is the rest of the message to send without the descriptor.
            let sent = usize::try_from(sent).unwrap_or(0);
            return send_rest(stream, data.get(sent..).unwrap_or_default());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes what `sendmsg` left of the message.
fn send_rest(mut stream: &UnixStream, rest: &[u8]) -> io::Result<()> {
    use std::io::Write;
    stream.write_all(rest)
}

/// Receives the handshake on `stream`: the JSON array of regions and the userfaultfd attached to
/// it. The message may come in several reads; it may not pass [`MAX_MESSAGE_LEN`] bytes or
/// [`MAX_REGIONS`] regions. Descriptors beyond the first are closed.
///
/// # Errors
///
/// [`Error::Receive`] when reading fails, [`Error::Disconnected`] when the VMM closes the
/// connection first, [`Error::NoDescriptor`] when no descriptor came with the first bytes,
/// [`Error::MessageTooLong`], [`Error::Message`] for anything but a JSON array of regions, and
/// [`Error::InvalidRegion`] for a region that [`FaultHandler`] could not serve.
pub fn receive_handshake(stream: &UnixStream) -> Result<(Vec<UffdRegion>, OwnedFd)> {
    let mut message = Vec::new();
    let mut uffd = None;
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, fds) = recv_with_fds(stream, &mut buf).map_err(Error::Receive)?;
        if len == 0 {
            return Err(Error::Disconnected);
        }
        let mut fds = fds.into_iter();
        if uffd.is_none() {
            uffd = fds.next();
        }
        // The others close here.
        drop(fds);
        if message.len().saturating_add(len) > MAX_MESSAGE_LEN {
            return Err(Error::MessageTooLong);
        }
        message.extend_from_slice(buf.get(..len).unwrap_or_default());
        match serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&message) {
            Ok(_) => break,
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(Error::Message(e)),
        }
    }
    let uffd = uffd.ok_or(Error::NoDescriptor)?;
    let regions = parse_regions(&message)?;
    Ok((regions, uffd))
}

/// Parses and checks the regions of a handshake message.
fn parse_regions(message: &[u8]) -> Result<Vec<UffdRegion>> {
    // The count is checked before the regions are decoded, so a huge array allocates nothing.
    let count = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(message)
        .map_err(Error::Message)?
        .len();
    if count > MAX_REGIONS {
        return Err(Error::InvalidRegion {
            index: MAX_REGIONS,
            reason: format!("the message has {count} regions, more than {MAX_REGIONS}"),
        });
    }
    let regions: Vec<UffdRegion> = serde_json::from_slice(message).map_err(Error::Message)?;
    if regions.is_empty() {
        return Err(Error::InvalidRegion {
            index: 0,
            reason: "the message has no regions".into(),
        });
    }
    for (index, region) in regions.iter().enumerate() {
        region
            .check()
            .map_err(|reason| Error::InvalidRegion { index, reason })?;
    }
    Ok(regions)
}

/// One `recvmsg` into `buf`, with the descriptors that came along (close-on-exec).
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // Room for MAX_FDS descriptors, aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    debug_assert!(space <= size_of::<[u64; 8]>());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let len = loop {
        // SAFETY: `msg` describes `buf` and `control`, both writable for the lengths given.
        let ret = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if ret >= 0 {
            break usize::try_from(ret).unwrap_or(0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with `msg.msg_controllen` bytes of well-formed
    // control messages; CMSG_FIRSTHDR and CMSG_NXTHDR walk them and stop at the end, and each
    // SCM_RIGHTS message holds `(cmsg_len - CMSG_LEN(0)) / sizeof(int)` new descriptors, which
    // nothing else owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = (*cmsg).cmsg_len.saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} descriptors came with the message"),
        ));
    }
    Ok((len, fds))
}

/// What a page-fault handler has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultStats {
    /// Page faults served (a copy or a zero page each).
    pub faults: u64,
    /// Bytes copied from the memory file.
    pub bytes: u64,
    /// Page faults served with a zero page, in ranges the VMM removed.
    pub zero_pages: u64,
    /// Remove events received.
    pub removes: u64,
}

/// Why [`FaultHandler::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// The VMM closed its socket or its memory went away: there is nothing more to serve.
    VmmGone,
}

/// A region being served, with the pages removed from it.
#[derive(Debug)]
struct Served {
    region: UffdRegion,
    /// One bit per page of the region: set once the VMM removed the page, which then faults in
    /// as zeroes.
    removed: Vec<u64>,
}

/// A page fault or remove event read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Fault(u64),
    Remove { start: u64, end: u64 },
    Other,
}

/// The outcome of serving one fault.
enum Fill {
    Done,
    Again,
    Gone,
}

/// The page-fault handler's side: serves the faults of a VMM's userfaultfd from a memory file.
///
/// Each fault is answered with `UFFDIO_COPY` of its page from the file (mapped read-only
/// private), or with `UFFDIO_ZEROPAGE` in a range a remove event gave back. Faults are served
/// one page at a time, so that a page the guest never touches is never read.
#[derive(Debug)]
pub struct FaultHandler {
    uffd: OwnedFd,
    regions: Vec<Served>,
    file: FileMap,
    pending: VecDeque<u64>,
    /// Zeroes to copy from, for huge pages the VMM removed; grown on first use.
    zeroes: Vec<u8>,
    stats: FaultStats,
}

impl FaultHandler {
    /// A handler of `uffd` for `regions`, their contents in `mem_file`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegion`] for a region that is not well-formed or ends past the end of the
    /// file, [`Error::MemoryFile`] when the file cannot be mapped.
    pub fn new(uffd: OwnedFd, regions: Vec<UffdRegion>, mem_file: &File) -> Result<Self> {
        let file_len = mem_file.metadata().map_err(Error::MemoryFile)?.len();
        let mut served = Vec::with_capacity(regions.len());
        for (index, region) in regions.into_iter().enumerate() {
            region
                .check()
                .map_err(|reason| Error::InvalidRegion { index, reason })?;
            // `check` made sure this does not overflow.
            let end = region.offset.saturating_add(region.size);
            if end > file_len {
                return Err(Error::InvalidRegion {
                    index,
                    reason: format!(
                        "its contents at {:#x}..{end:#x} pass the end of the {file_len:#x}-byte \
                         memory file",
                        region.offset
                    ),
                });
            }
            let pages = region.size / region.page_size;
            let words = usize::try_from(pages.div_ceil(64)).map_err(|_| Error::InvalidRegion {
                index,
                reason: "it is too large".into(),
            })?;
            served.push(Served {
                region,
                removed: vec![0; words],
            });
        }
        let file = FileMap::new(mem_file, file_len)?;
        Ok(Self {
            uffd,
            regions: served,
            file,
            pending: VecDeque::new(),
            zeroes: Vec::new(),
            stats: FaultStats::default(),
        })
    }

    /// Receives the handshake on `stream` ([`receive_handshake`]) and makes a handler for it.
    ///
    /// # Errors
    ///
    /// Those of [`receive_handshake`] and [`FaultHandler::new`].
    pub fn from_stream(stream: &UnixStream, mem_file: &File) -> Result<Self> {
        let (regions, uffd) = receive_handshake(stream)?;
        Self::new(uffd, regions, mem_file)
    }

    /// The regions served.
    pub fn regions(&self) -> impl Iterator<Item = &UffdRegion> {
        self.regions.iter().map(|served| &served.region)
    }

    /// What the handler has done so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// Serves faults until the VMM goes away: its end of `stream` closes, or the userfaultfd
    /// reports that its memory is gone. Data the VMM sends on `stream` meanwhile is read and
    /// ignored.
    ///
    /// # Errors
    ///
    /// Those of [`handle_events`](Self::handle_events), and [`Error::Poll`].
    pub fn run(&mut self, stream: &UnixStream) -> Result<Stop> {
        let mut scratch = [0u8; 256];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // Faults waiting for a retry are tried again soon, even without a new event.
            let timeout = if self.pending.is_empty() { -1 } else { 1 };
            // SAFETY: `fds` is an array of two pollfds, which poll reads and writes.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Poll(err));
            }
            let [uffd, sock] = fds;
            if uffd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Ok(Stop::VmmGone);
            }
            if uffd.revents & libc::POLLIN != 0 || !self.pending.is_empty() {
                if let Some(stop) = self.handle_events()? {
                    return Ok(stop);
                }
            }
            if sock.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
                return Ok(Stop::VmmGone);
            }
            if sock.revents & libc::POLLIN != 0 {
                // SAFETY: `scratch` is writable for its length; MSG_DONTWAIT keeps this from
                // blocking.
                let n = unsafe {
                    libc::recv(
                        stream.as_raw_fd(),
                        scratch.as_mut_ptr().cast(),
                        scratch.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n == 0 {
                    return Ok(Stop::VmmGone);
                }
            }
        }
    }

    /// Reads the events waiting on the userfaultfd and serves the faults, those left from
    /// before first. Returns `Some` when the VMM's memory is gone.
    ///
    /// A fault whose copy the kernel turns away for now (`EAGAIN`: a remove event is waiting to
    /// be read) stays pending, for the next call.
    ///
    /// # Errors
    ///
    /// [`Error::ReadEvent`], [`Error::UnknownFault`] for a fault outside every region, and
    /// [`Error::Fill`] when a page cannot be copied or zeroed.
    pub fn handle_events(&mut self) -> Result<Option<Stop>> {
        while self.pending.len() < MAX_PENDING {
            let events = self.read_events()?;
            if events.is_empty() {
                break;
            }
            for event in events {
                match event {
                    Event::Fault(addr) => self.pending.push_back(addr),
                    Event::Remove { start, end } => self.mark_removed(start, end),
                    Event::Other => {}
                }
            }
        }
        for _ in 0..self.pending.len() {
            let Some(addr) = self.pending.pop_front() else {
                break;
            };
            match self.serve(addr)? {
                Fill::Done => {}
                Fill::Again => self.pending.push_back(addr),
                Fill::Gone => return Ok(Some(Stop::VmmGone)),
            }
        }
        Ok(None)
    }

    /// Reads up to [`EVENTS_PER_READ`] events; none when there are none now.
    fn read_events(&self) -> Result<Vec<Event>> {
        let mut msgs = [UffdMsg::default(); EVENTS_PER_READ];
        // SAFETY: `msgs` is writable for its size; the kernel writes whole `uffd_msg`s, which
        // `UffdMsg` lays out (32 bytes, every bit pattern valid).
        let ret = unsafe {
            libc::read(
                self.uffd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                size_of::<[UffdMsg; EVENTS_PER_READ]>(),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(Error::ReadEvent(err)),
            };
        }
        let count = usize::try_from(ret).unwrap_or(0) / size_of::<UffdMsg>();
        Ok(msgs
            .iter()
            .take(count)
            .map(|msg| match msg.event {
                UFFD_EVENT_PAGEFAULT => Event::Fault(msg.arg[1]),
                UFFD_EVENT_REMOVE => Event::Remove {
                    start: msg.arg[0],
                    end: msg.arg[1],
                },
                _ => Event::Other,
            })
            .collect())
    }

    /// Marks the pages of `start..end` removed wherever they are in a region.
    fn mark_removed(&mut self, start: u64, end: u64) {
        self.stats.removes = self.stats.removes.saturating_add(1);
        for served in &mut self.regions {
            let region = served.region;
            let base = region.base_host_virt_addr;
            // `check` made sure the region's end does not overflow.
            let lo = start.max(base);
            let hi = end.min(base.saturating_add(region.size));
            if lo >= hi {
                continue;
            }
            // Whole and partial pages in the range: a partial one was zeroed in part.
            let first = (lo - base) / region.page_size;
            let last = (hi - base).div_ceil(region.page_size);
            for page in first..last {
                set_bit(&mut served.removed, page);
            }
        }
    }

    /// Serves a fault at `addr`.
    fn serve(&mut self, addr: u64) -> Result<Fill> {
        let Some(served) = self.regions.iter().find(|s| s.region.contains(addr)) else {
            return Err(Error::UnknownFault(addr));
        };
        let region = served.region;
        let page_size = region.page_size;
        let page_index = (addr - region.base_host_virt_addr) / page_size;
        let page = region.base_host_virt_addr + page_index * page_size;
        let zero = get_bit(&served.removed, page_index);
        let result = if zero && page_size == PAGE_SIZE {
            self.zeropage(page, page_size)
        } else {
            let src = if zero {
                // A huge page the VMM removed: copied from zeroes, as UFFDIO_ZEROPAGE only
                // fills base pages. `check` bounds the page size to 1 GiB.
                let len = usize::try_from(page_size).unwrap_or(usize::MAX);
                if self.zeroes.len() < len {
                    self.zeroes.resize(len, 0);
                }
                self.zeroes.as_ptr().addr() as u64
            } else {
                // Within the file: `new` checked that the region's contents end inside it.
                self.file.addr(region.offset + page_index * page_size)
            };
            self.copy(page, src, page_size)
        };
        match result {
            Ok(len) => {
                self.stats.faults = self.stats.faults.saturating_add(1);
                if zero {
                    self.stats.zero_pages = self.stats.zero_pages.saturating_add(1);
                } else {
                    self.stats.bytes = self.stats.bytes.saturating_add(len);
                }
                Ok(Fill::Done)
            }
            Err(err) => match err.raw_os_error() {
                // Another fault on the page was served first: wake whoever still waits.
                Some(libc::EEXIST) => {
                    self.wake(page, page_size);
                    Ok(Fill::Done)
                }
                Some(libc::EAGAIN) => Ok(Fill::Again),
                // The VMM's memory is gone (it exited, or unmapped the range).
                Some(libc::ESRCH | libc::ENOENT) => Ok(Fill::Gone),
                _ => Err(Error::Fill {
                    addr: page,
                    source: err,
                }),
            },
        }
    }

    /// `UFFDIO_COPY` of `len` bytes from the address `src` in this process to `dst`, waking the
    /// faulting thread; returns the bytes copied.
    fn copy(&self, dst: u64, src: u64, len: u64) -> io::Result<u64> {
        let mut copy = UffdioCopy {
            dst,
            src,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy`, which `copy` is. The
        // kernel reads `len` bytes at `src` in this process (the mapped memory file, or the
        // zeroes buffer), as write(2) would, and fills only pages that are missing in a range
        // registered with the userfaultfd, in the VMM's memory: it writes nothing this process
        // holds a reference to.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        if ret == 0 {
            return Ok(u64::try_from(copy.copy).unwrap_or(0));
        }
        let err = io::Error::last_os_error();
        // A partial copy reports what it copied or the error in `copy`.
        match copy.copy {
            c if c < 0 => Err(io::Error::from_raw_os_error(
                i32::try_from(-c).unwrap_or(libc::EIO),
            )),
            _ => Err(err),
        }
    }

    /// `UFFDIO_ZEROPAGE` of the page at `dst`, waking the faulting thread.
    fn zeropage(&self, dst: u64, len: u64) -> io::Result<u64> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`, which `zero` is;
        // it maps the zero page only where a page is missing in a registered range.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut zero) };
        if ret == 0 {
            return Ok(len);
        }
        let err = io::Error::last_os_error();
        match zero.zeropage {
            c if c < 0 => Err(io::Error::from_raw_os_error(
                i32::try_from(-c).unwrap_or(libc::EIO),
            )),
            _ => Err(err),
        }
    }

    /// `UFFDIO_WAKE` of the threads waiting on the page at `start`.
    fn wake(&self, start: u64, len: u64) {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which `range` is; it only wakes
        // threads. A failure leaves nothing to do: a thread still waiting faults again.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
    }
}

/// Sets bit `index` of `bits`; out of range does nothing.
fn set_bit(bits: &mut [u64], index: u64) {
    let word = usize::try_from(index / 64)
        .ok()
        .and_then(|w| bits.get_mut(w));
    if let Some(word) = word {
        *word |= 1 << (index % 64);
    }
}

/// Bit `index` of `bits`; out of range reads as clear.
fn get_bit(bits: &[u64], index: u64) -> bool {
    usize::try_from(index / 64)
        .ok()
        .and_then(|w| bits.get(w))
        .is_some_and(|word| word & (1 << (index % 64)) != 0)
}

/// The memory file mapped read-only private, unmapped when dropped. Its bytes are only ever read
/// by the kernel (the source of `UFFDIO_COPY`), never through a Rust reference.
#[derive(Debug)]
struct FileMap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by the `FileMap`; its address can be used from any
// thread.
unsafe impl Send for FileMap {}

impl FileMap {
    /// Maps the `len` bytes of `file`.
    fn new(file: &File, len: u64) -> Result<Self> {
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len > 0)
            .ok_or_else(|| {
                Error::MemoryFile(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the memory file is empty or too large",
                ))
            })?;
        // SAFETY: a new read-only private mapping of the file, at an address the kernel picks;
        // nothing existing is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::MemoryFile(io::Error::last_os_error()));
        }
        Ok(Self { addr, len })
    }

    /// The address of `offset` in the mapping (checked by the caller to be inside it).
    fn addr(&self, offset: u64) -> u64 {
        debug_assert!(offset < self.len as u64);
        (self.addr.addr() as u64).saturating_add(offset)
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: `FileMap::new` made this mapping of `len` bytes and nothing else unmaps it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[cfg(test)]
mod tests;
