//! The asynchronous engine of a block device: [`AsyncIo`], reads, writes and flushes submitted
//! to an io_uring and completed later, so that many requests are in flight from the one thread
//! that serves the queue, without a thread pool.
//!
//! Each request that goes in flight takes a slot, whose index is the token its submission
//! carries (`user_data`). The slot keeps what its completion needs (the chain's head, the
//! status byte's address, the data buffers) and the `iovec`s the kernel reads, at an address
//! that does not move until the completion is reaped. There are as many slots as the queue
//! has entries, and the ring has as many entries as slots: a driver cannot have more requests
//! in flight than its queue holds, and the submission queue never fills.
//!
//! The ring tells its completions through an eventfd registered with it
//! ([`AsyncIo::completion_fd`]), which the device's event loop waits on; the worker then reaps
//! every completion at once ([`AsyncIo::reap`]) and hands their chains back to the driver in
//! one update of the used ring.
//!
//! Reads and writes are `IORING_OP_READV`/`IORING_OP_WRITEV` straight between the file and
//! guest memory, with the `iovec`s the synchronous path builds; a flush is `IORING_OP_FSYNC`
//! with `IORING_FSYNC_DATASYNC`, as [`RawFile`](super::RawFile)'s `fdatasync`. Discards and
//! write zeroes stay synchronous, through the backend: they are rare, a file system serves them
//! from its metadata, and [`RawFile`](super::RawFile) falls back on writing zeroes where the
//! file system cannot zero a range, which one `fallocate` submission could not say. A transfer
//! shorter than asked completes its request with VIRTIO_BLK_S_IOERR, as the synchronous path's
//! end of file does.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{IoUring, opcode, types};
use smallvec::SmallVec;
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::disk::{Completion, Disk};
use super::request::{Request, RequestType, STATUS_OK};
use super::{BlockBackend, Error, Result, SECTOR_SIZE};
use crate::iov::{GuestIoVecs, IOV_MAX};
use crate::queue::Descriptor;

/// Which engine carries out a block device's reads, writes and flushes.
///
/// The device's checks (parsing, capacity, the rate limiter, the read-only flag) come before
/// either, the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// Each request is carried out on the thread that serves the queue, which waits for it
    /// ([`BlockBackend`]'s methods): the default.
    #[default]
    Sync,
    /// Reads, writes and flushes go to an io_uring ([`AsyncIo`]) on the backend's file
    /// ([`BlockBackend::async_fd`]), many in flight at once, and complete when the ring says
    /// so. Discards and write zeroes stay synchronous.
    Async,
}

/// How many `iovec`s a slot holds without allocating.
const INLINE: usize = 4;

/// What a request in flight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

/// A request in flight: what its completion needs, and the `iovec`s the kernel reads.
struct InFlight {
    head: u16,
    status_addr: GuestAddress,
    request_type: RequestType,
    op: Op,
    /// The bytes the transfer must move; 0 for a flush.
    len: usize,
    /// The data buffers of a read, to mark dirty once the kernel wrote them.
    buffers: SmallVec<[Descriptor; INLINE]>,
    /// Read by the kernel when it takes the submission; they stay at this address (the slot
    /// does not move) until the completion is reaped.
    iovecs: SmallVec<[libc::iovec; INLINE]>,
}

// SAFETY: the `iovec`s' pointers are addresses in guest memory, which the worker's memory
// handle keeps mapped whatever thread holds the slot; the slot only hands them to the kernel and
// never dereferences them, so moving it to another thread (the device's worker is built on one
// thread and runs on another) shares nothing.
unsafe impl Send for InFlight {}

/// A chain whose request completed, to hand back to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Done {
    /// The chain's head index.
    pub(super) head: u16,
    /// Where its status byte goes.
    pub(super) status_addr: GuestAddress,
    /// What the request was, for the counters.
    pub(super) request_type: RequestType,
    /// How it ended.
    pub(super) completion: Completion,
}

/// What became of a request [`AsyncIo::submit`] was given.
pub(super) enum Submitted {
    /// In flight: it completes through [`AsyncIo::reap`].
    InFlight,
    /// Carried out, or refused, at once.
    Done(Completion),
}

/// An io_uring on which a block worker's reads, writes and flushes are in flight, with the
/// eventfd that tells their completions ([`IoEngine::Async`]).
///
/// It is set up when the device is built ([`AsyncIo::new`], `io_uring_setup` and
/// `io_uring_register`), so that the thread that serves the queue only submits and reaps
/// (`io_uring_enter`). The ring is restricted (`IORING_REGISTER_RESTRICTIONS`) before it is
/// enabled: it takes only `READV`, `WRITEV` and `FSYNC` submissions, without flags, and no
/// further `io_uring_register`, so that a thread allowed `io_uring_enter` by its seccomp filter
/// can do no more through the ring than `preadv`, `pwritev` and `fdatasync` let it (seccomp does
/// not see what a ring does). Dropping it waits for every request in flight: the kernel writes
/// into guest memory, and reads the `iovec`s it holds, until then.
pub struct AsyncIo {
    ring: IoUring,
    completion_evt: EventFd,
    /// One per request that may be in flight, indexed by the submission's token.
    slots: Vec<Option<InFlight>>,
    /// The indices of the free slots.
    free: Vec<u16>,
    /// Submissions pushed and not yet handed to the kernel.
    unsubmitted: usize,
}

impl fmt::Debug for AsyncIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncIo")
            .field("slots", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl AsyncIo {
    /// An io_uring for at most `queue_size` requests in flight (at least 1), with a completion
    /// eventfd registered with it, restricted to reads, writes and flushes.
    ///
    /// # Errors
    ///
    /// [`Error::IoUring`] when the host cannot set up an io_uring (`io_uring_setup` fails with
    /// ENOSYS on a kernel without it, EPERM where it is disabled or a seccomp filter refuses
    /// it, ENOMEM past the locked memory limit), cannot register the eventfd, or cannot
    /// restrict the ring (a kernel older than 5.10).
    pub fn new(queue_size: u16) -> Result<Self> {
        let entries = queue_size.max(1);
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(u32::from(entries))
            .map_err(|source| Error::IoUring {
                what: "set up",
                source,
            })?;
        let completion_evt =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                Error::IoUring {
                    what: "create the completion eventfd of",
                    source,
                }
            })?;
        ring.submitter()
            .register_eventfd(completion_evt.as_raw_fd())
            .map_err(|source| Error::IoUring {
                what: "register the completion eventfd with",
                source,
            })?;
        // No register operation is allowed from now on, nor any submission flag.
        let mut restrictions = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(0),
        ];
        ring.submitter()
            .register_restrictions(&mut restrictions)
            .map_err(|source| Error::IoUring {
                what: "restrict",
                source,
            })?;
        ring.submitter()
            .register_enable_rings()
            .map_err(|source| Error::IoUring {
                what: "enable",
                source,
            })?;
        let mut slots = Vec::with_capacity(usize::from(entries));
        slots.resize_with(usize::from(entries), || None);
        Ok(AsyncIo {
            ring,
            completion_evt,
            slots,
            // Taken from the end: slot 0 first.
            free: (0..entries).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// The eventfd the ring signals when requests complete: the device's event loop waits on
    /// it, and [`BlockWorker::process_completions`](super::BlockWorker::process_completions)
    /// clears it.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_evt.as_raw_fd()
    }

    /// Clears the completion eventfd, before the completions are reaped.
    pub(super) fn clear_event(&self) -> io::Result<()> {
        match self.completion_evt.read() {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// How many requests are in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len().saturating_sub(self.free.len())
    }

    /// How many requests may be in flight at once.
    pub(super) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// How many completions the ring holds, not yet reaped.
    #[cfg(test)]
    pub(super) fn completions_ready(&mut self) -> usize {
        self.ring.completion().len()
    }

    /// Whether another request can go in flight.
    pub(super) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Starts the parsed `request` of the chain `head` on `disk`'s backend file: a read, a
    /// write to a writable disk, or a flush goes in flight (handed to the kernel at the next
    /// [`AsyncIo::submit_pending`]); anything else is carried out at once by the disk, as the
    /// synchronous engine does, and so is a request that cannot go in flight (its buffers are
    /// not in guest memory, the backend has no file, no slot is free) with IOERR.
    ///
    /// Guest memory behind the data buffers must stay mapped until the request completes: the
    /// worker holds its handle on it until then.
    pub(super) fn submit<M: GuestMemory + ?Sized, B: BlockBackend>(
        &mut self,
        disk: &mut Disk<B>,
        mem: &M,
        request: &Request<'_>,
        head: u16,
    ) -> Submitted {
        let (op, sector) = match request.request_type() {
            RequestType::In { sector, .. } => (Op::Read, sector),
            RequestType::Out { sector, .. } if !disk.read_only() => (Op::Write, sector),
            RequestType::Flush => (Op::Flush, 0),
            _ => return Submitted::Done(disk.execute(mem, request)),
        };
        match self.start(disk, mem, request, head, op, sector) {
            Ok(()) => Submitted::InFlight,
            Err(err) => Submitted::Done(disk.failed(&err, op.name())),
        }
    }

    fn start<M: GuestMemory + ?Sized, B: BlockBackend>(
        &mut self,
        disk: &Disk<B>,
        mem: &M,
        request: &Request<'_>,
        head: u16,
        op: Op,
        sector: u64,
    ) -> io::Result<()> {
        let fd = disk
            .backend()
            .async_fd()
            .map(|fd: BorrowedFd<'_>| fd.as_raw_fd())
            .ok_or_else(|| io::Error::other("the backend has no file for io_uring"))?;
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(io::ErrorKind::InvalidInput)?;
        let mut slot = InFlight {
            head,
            status_addr: request.status_addr(),
            request_type: request.request_type(),
            op,
            len: 0,
            buffers: SmallVec::new(),
            iovecs: SmallVec::new(),
        };
        if op != Op::Flush {
            let access = if op == Op::Read {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let iov = GuestIoVecs::new(mem, request.data(), access).map_err(io::Error::other)?;
            // A chain has at most a queue's worth of buffers, each in at most as many pieces
            // as guest memory has regions: far fewer than a readv takes.
            if iov.iovecs().len() > IOV_MAX {
                return Err(io::Error::other(
                    "the request's buffers need too many iovecs",
                ));
            }
            slot.len = iov.len();
            slot.iovecs.extend_from_slice(iov.iovecs());
            if op == Op::Read {
                slot.buffers.extend(request.data());
            }
        }
        let index = self
            .free
            .pop()
            .ok_or_else(|| io::Error::other("no request slot is free"))?;
        let Some(place) = self.slots.get_mut(usize::from(index)) else {
            // Cannot happen: free indices are slot indices.
            return Err(io::Error::other("a request slot is out of range"));
        };
        let slot = place.insert(slot);
        let token = u64::from(index);
        let fd = types::Fd(fd);
        let entry = match op {
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // Cannot truncate: at most IOV_MAX iovecs.
            Op::Read => opcode::Readv::new(fd, slot.iovecs.as_ptr(), iov_count(&slot.iovecs))
                .offset(offset)
                .build(),
            Op::Write => opcode::Writev::new(fd, slot.iovecs.as_ptr(), iov_count(&slot.iovecs))
                .offset(offset)
                .build(),
        }
        .user_data(token);
        // SAFETY: the entry points at the slot's `iovec`s, which stay where they are until
        // the completion of `token` is reaped (the slot is neither moved nor freed before, and
        // dropping the engine waits for every request in flight), and they point at guest
        // memory the worker keeps mapped until then. A read writes only into the request's
        // writable buffers, which `GuestIoVecs` mapped for writing.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Cannot happen: the ring has an entry for every slot. Give the slot back.
            if let Some(place) = self.slots.get_mut(usize::from(index)) {
                *place = None;
            }
            self.free.push(index);
            return Err(io::Error::other("the io_uring submission queue is full"));
        }
        self.unsubmitted = self.unsubmitted.saturating_add(1);
        Ok(())
    }

    /// Hands the submissions pushed since the last call to the kernel, with one
    /// `io_uring_enter`.
    ///
    /// # Errors
    ///
    /// When the kernel takes none of them (out of memory): they stay queued, and the next
    /// call, or [`AsyncIo::wait_all`], hands them over again.
    pub(super) fn submit_pending(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                Ok(taken) => self.unsubmitted = self.unsubmitted.saturating_sub(taken),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Takes every completion the ring holds, and gives each request's end to `done`: IOERR
    /// for an error or a transfer shorter than asked. The guest buffers a read filled are
    /// marked dirty in `mem`.
    pub(super) fn reap<M: GuestMemory + ?Sized, B: BlockBackend>(
        &mut self,
        disk: &mut Disk<B>,
        mem: &M,
        mut done: impl FnMut(Done),
    ) {
        let AsyncIo {
            ring, slots, free, ..
        } = self;
        for entry in ring.completion() {
            let Ok(index) = u16::try_from(entry.user_data()) else {
                log::error!("An io_uring completion carries a token no request has");
                continue;
            };
            let Some(slot) = slots.get_mut(usize::from(index)).and_then(Option::take) else {
                log::error!("An io_uring completion carries a token no request has");
                continue;
            };
            free.push(index);
            done(finish(disk, mem, &slot, entry.result()));
        }
    }

    /// Waits until no request is in flight, handing every completion to `done` as
    /// [`AsyncIo::reap`] does.
    pub(super) fn wait_all<M: GuestMemory + ?Sized, B: BlockBackend>(
        &mut self,
        disk: &mut Disk<B>,
        mem: &M,
        mut done: impl FnMut(Done),
    ) {
        loop {
            self.reap(disk, mem, &mut done);
            if self.in_flight() == 0 {
                return;
            }
            if let Err(err) = self.wait_one() {
                log::error!("A block device cannot wait for its requests in flight: {err}");
                return;
            }
        }
    }

    /// Submits what is queued and waits for at least one completion.
    fn wait_one(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(taken) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(taken);
                    return Ok(());
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for AsyncIo {
    fn drop(&mut self) {
        if self.in_flight() == 0 {
            return;
        }
        // The kernel may still write into guest memory and read the slots' `iovec`s: wait for
        // it, and drop what completes.
        let mut left = self.in_flight();
        while left > 0 {
            if let Err(err) = self.wait_one() {
                log::error!("A block device cannot wait for its requests in flight: {err}");
                // The kernel may still read the slots' `iovec`s: leave them where they are.
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            let reaped = self.ring.completion().count();
            left = left.saturating_sub(reaped);
        }
    }
}

/// The number of `iovec`s, which [`AsyncIo::start`] keeps at most [`IOV_MAX`].
fn iov_count(iovecs: &[libc::iovec]) -> u32 {
    u32::try_from(iovecs.len()).unwrap_or(0)
}

/// How the request in `slot` ended, given its completion's `result`.
fn finish<M: GuestMemory + ?Sized, B: BlockBackend>(
    disk: &mut Disk<B>,
    mem: &M,
    slot: &InFlight,
    result: i32,
) -> Done {
    let outcome = if result < 0 {
        Err(io::Error::from_raw_os_error(result.saturating_neg()))
    } else if usize::try_from(result).ok() != Some(slot.len) {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} of {} bytes were transferred", result, slot.len),
        ))
    } else {
        Ok(())
    };
    if slot.op == Op::Read {
        // Whether it succeeded or not, the kernel may have written any of the buffers.
        match GuestIoVecs::new(mem, slot.buffers.iter().copied(), Permissions::Write) {
            Ok(iov) => iov.mark_written(iov.len()),
            Err(err) => log::debug!("Cannot mark a block read's buffers dirty: {err}"),
        }
    }
    let mut completion = disk.finish(outcome, slot.op.name());
    if completion.status == STATUS_OK && slot.op == Op::Read {
        completion.data_written = u32::try_from(slot.len).unwrap_or(0);
    }
    Done {
        head: slot.head,
        status_addr: slot.status_addr,
        request_type: slot.request_type,
        completion,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ember_rate_limiter::RateLimiter;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::block::fixtures::*;
    use crate::block::{BlockWorker, QUEUE_SIZE, STATUS_IOERR};
    use crate::error::ErrorChain;
    use crate::mmio::MmioInterrupt;
    use crate::mock::{CountingTrigger, MockBuffer, MockDriver, bucket, guest_memory};

    /// A guest driving a [`BlockWorker`] on either engine.
    struct Guest {
        mem: Arc<Mem>,
        driver: MockDriver,
        worker: BlockWorker<Space>,
        irqs: CountingTrigger,
    }

    impl Guest {
        fn new(image: &Image, engine: IoEngine) -> Self {
            Guest::with_slots(image, engine, QUEUE_SIZE)
        }

        fn with_slots(image: &Image, engine: IoEngine, slots: u16) -> Self {
            let mem = Arc::new(guest_memory(0x100000).unwrap());
            let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
            let irqs = CountingTrigger::default();
            let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
            let mut worker = BlockWorker::new(
                image.disk(false),
                driver.queue(),
                mem.clone(),
                interrupt,
                RateLimiter::default(),
            );
            if engine == IoEngine::Async {
                worker = worker.with_async_io(AsyncIo::new(slots).unwrap());
            }
            Guest {
                mem,
                driver,
                worker,
                irqs,
            }
        }

        /// Makes request `i` available: a header of `type_` at `sector`, then `data` (an
        /// address and a length, writable for a read), then status byte `i`.
        fn add(&mut self, i: u64, type_: u32, sector: u64, data: &[(u64, u32)]) -> u16 {
            write_header(&self.mem, HDR + 16 * i, type_, sector);
            self.mem
                .write_obj(0xffu8, GuestAddress(STATUS + i))
                .unwrap();
            let mut chain = vec![MockBuffer::readable(HDR + 16 * i, 16)];
            chain.extend(data.iter().map(|&(addr, len)| {
                if type_ == VIRTIO_BLK_T_IN {
                    MockBuffer::writable(addr, len)
                } else {
                    MockBuffer::readable(addr, len)
                }
            }));
            chain.push(MockBuffer::writable(STATUS + i, 1));
            self.driver.add_chain(&*self.mem, &chain).unwrap()
        }

        /// Serves the queue, and waits until every request it put in flight has completed
        /// and been handed back.
        fn run(&mut self) {
            self.worker.process_queue().unwrap();
            self.settle();
        }

        /// Waits until every request in flight has completed in the ring, then hands them
        /// back through the completion event's path.
        fn settle(&mut self) {
            let in_flight = self.worker.in_flight();
            if in_flight == 0 {
                return;
            }
            self.wait_completed();
            assert_eq!(self.worker.process_completions().unwrap(), in_flight);
        }

        /// Waits until every request in flight has completed in the ring.
        fn wait_completed(&mut self) {
            let in_flight = self.worker.in_flight();
            let fd = self.worker.completion_fd().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while self.worker.completions_ready() < in_flight {
                assert!(
                    std::time::Instant::now() < deadline,
                    "requests never completed"
                );
                let mut pollfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                unsafe { libc::poll(&mut pollfd, 1, 100) };
            }
        }

        fn status(&self, i: u64) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS + i)).unwrap()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }
    }

    /// Reads and writes of several shapes, the same on both engines.
    fn exercise(image: &Image, engine: IoEngine) -> (Vec<u8>, Vec<(u32, u32)>, Vec<u8>) {
        let mut g = Guest::new(image, engine);
        let fill: Vec<u8> = (0..0x4000u32).map(|i| (i * 7 % 251) as u8).collect();
        g.mem
            .write_slice(&fill, GuestAddress(DATA + 0x8000))
            .unwrap();
        // Reads: one sector, several sectors over uneven buffers, the last sector.
        g.add(0, VIRTIO_BLK_T_IN, 0, &[(DATA, 512)]);
        g.add(
            1,
            VIRTIO_BLK_T_IN,
            5,
            &[(DATA + 0x1000, 100), (DATA + 0x2000, 924)],
        );
        g.add(2, VIRTIO_BLK_T_IN, SECTORS - 1, &[(DATA + 0x3000, 512)]);
        // Writes: over three buffers, and a 4 KiB one.
        g.add(
            3,
            VIRTIO_BLK_T_OUT,
            10,
            &[
                (DATA + 0x8000, 300),
                (DATA + 0x9000, 212),
                (DATA + 0xa000, 1024),
            ],
        );
        g.add(4, VIRTIO_BLK_T_OUT, 20, &[(DATA + 0xb000, 4096)]);
        g.run();
        // Reads the written sectors back.
        g.add(5, VIRTIO_BLK_T_IN, 10, &[(DATA + 0x4000, 1536)]);
        g.add(6, VIRTIO_BLK_T_FLUSH, 0, &[]);
        g.run();
        let used = (0..7u16)
            .map(|i| g.driver.used_elem(&*g.mem, i).unwrap())
            .collect();
        let statuses = (0..7).map(|i| g.status(i)).collect();
        let mut memory = g.read(DATA, 0x5000);
        memory.extend(image.contents());
        (memory, used, statuses)
    }

    #[test]
    fn reads_and_writes_through_io_uring_match_the_synchronous_engine_byte_for_byte() {
        let sync = exercise(&Image::on_tmpfs(), IoEngine::Sync);
        let async_ = exercise(&Image::on_tmpfs(), IoEngine::Async);
        assert_eq!(sync.2, [STATUS_OK; 7]);
        assert_eq!(sync.1, async_.1);
        assert_eq!(sync.2, async_.2);
        assert!(sync.0 == async_.0, "the bytes differ");
        // On a disk file system too.
        let on_disk = Image::new(&std::env::temp_dir(), SECTORS * SECTOR_SIZE);
        assert!(exercise(&on_disk, IoEngine::Async).0 == sync.0);
    }

    #[test]
    fn many_requests_in_flight_are_handed_back_in_two_used_ring_updates_at_most() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, IoEngine::Async);
        let mut heads = Vec::new();
        for i in 0..32u64 {
            heads.push(g.add(i, VIRTIO_BLK_T_IN, i, &[(DATA + 0x1000 * i, 4096)]));
        }
        assert_eq!(g.worker.process_queue().unwrap(), 32);
        // Those the kernel completed while it took them are handed back at once, in one
        // update with one interrupt; the others, in flight, in one more on their completions.
        let early = g.driver.used_idx(&*g.mem).unwrap();
        assert_eq!(g.worker.in_flight() + usize::from(early), 32);
        assert_eq!(g.irqs.count(), usize::from(early > 0));
        g.settle();
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 32);
        assert_eq!(
            g.irqs.count(),
            usize::from(early > 0) + usize::from(early < 32)
        );
        let mut handed_back: Vec<u32> = (0..32u16)
            .map(|i| {
                let (head, len) = g.driver.used_elem(&*g.mem, i).unwrap();
                assert_eq!(len, 4097);
                head
            })
            .collect();
        handed_back.sort_unstable();
        let mut expected: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
        expected.sort_unstable();
        assert_eq!(handed_back, expected);
        for i in 0..32u64 {
            assert_eq!(g.status(i), STATUS_OK);
            assert_eq!(g.read(DATA + 0x1000 * i, 4096), pattern(i, 8));
        }
        let metrics = g.worker.metrics();
        assert_eq!(metrics.get("read_count"), Some(32));
        assert_eq!(metrics.get("read_bytes"), Some(32 * 4096));
    }

    #[test]
    fn requests_in_flight_are_bounded_by_the_slots_and_completions_resume_the_queue() {
        let image = Image::on_tmpfs();
        let mut g = Guest::with_slots(&image, IoEngine::Async, 4);
        for i in 0..10u64 {
            g.add(i, VIRTIO_BLK_T_IN, i, &[(DATA + 0x1000 * i, 512)]);
        }
        // As many are taken as there are slots; those the kernel completed while it took
        // them are handed back at once, the others stay in flight.
        assert_eq!(g.worker.process_queue().unwrap(), 4);
        assert!(g.worker.waiting_for_room());
        assert_eq!(g.worker.queue().next_avail(), 4);
        let used = usize::from(g.driver.used_idx(&*g.mem).unwrap());
        assert_eq!(g.worker.in_flight() + used, 4);
        if used == 0 {
            // Full: nothing more is taken until completions free slots.
            assert_eq!(g.worker.process_queue().unwrap(), 0);
            assert_eq!(g.worker.queue().next_avail(), 4);
        }
        // Completions free slots; the chains left go in them in the pass that hands the
        // completions back, with no other notification.
        for _ in 0..10 {
            if g.driver.used_idx(&*g.mem).unwrap() == 10 {
                break;
            }
            g.wait_completed();
            g.worker.process_completions().unwrap();
        }
        assert!(!g.worker.waiting_for_room());
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 10);
        for i in 0..10u64 {
            assert_eq!(g.status(i), STATUS_OK);
            assert_eq!(g.read(DATA + 0x1000 * i, 512), pattern(i, 1));
        }
    }

    #[test]
    fn a_read_past_the_end_of_a_file_truncated_underneath_fails_with_ioerr() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, IoEngine::Async);
        // The file shrinks to 8 sectors; the disk still says 64.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image.path)
            .unwrap()
            .set_len(8 * SECTOR_SIZE)
            .unwrap();
        // Wholly past the end, and straddling it.
        g.add(0, VIRTIO_BLK_T_IN, 16, &[(DATA, 512)]);
        g.add(1, VIRTIO_BLK_T_IN, 6, &[(DATA + 0x1000, 2048)]);
        g.add(2, VIRTIO_BLK_T_IN, 2, &[(DATA + 0x2000, 512)]);
        g.run();
        assert_eq!(
            [g.status(0), g.status(1), g.status(2)],
            [STATUS_IOERR, STATUS_IOERR, STATUS_OK]
        );
        // The status byte only, for the failed ones.
        assert_eq!(g.driver.used_elem(&*g.mem, 0).unwrap().1, 1);
        assert_eq!(g.worker.metrics().get("execute_fails"), Some(2));
    }

    #[test]
    fn a_flush_completes_after_the_writes() {
        let image = Image::new(&std::env::temp_dir(), SECTORS * SECTOR_SIZE);
        let mut g = Guest::new(&image, IoEngine::Async);
        g.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .unwrap();
        g.add(0, VIRTIO_BLK_T_OUT, 4, &[(DATA, 1024)]);
        g.run();
        g.add(1, VIRTIO_BLK_T_FLUSH, 0, &[]);
        g.run();
        assert_eq!([g.status(0), g.status(1)], [STATUS_OK, STATUS_OK]);
        assert_eq!(g.driver.used_elem(&*g.mem, 1).unwrap().1, 1);
        assert_eq!(g.worker.metrics().get("flush_count"), Some(1));
        assert_eq!(&image.contents()[2048..3072], &[0x5a; 1024][..]);
    }

    #[test]
    fn saving_the_queue_waits_for_the_requests_in_flight_and_hands_them_back() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, IoEngine::Async);
        for i in 0..8u64 {
            g.add(i, VIRTIO_BLK_T_IN, i, &[(DATA + 0x1000 * i, 4096)]);
        }
        assert_eq!(g.worker.process_queue().unwrap(), 8);
        let early = g.driver.used_idx(&*g.mem).unwrap();
        assert_eq!(g.worker.in_flight() + usize::from(early), 8);
        let saved = g.worker.saved_queue();
        assert_eq!(g.worker.in_flight(), 0);
        assert_eq!((saved.next_avail(), saved.next_used()), (8, 8));
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), 8);
        assert_eq!(
            g.irqs.count(),
            usize::from(early > 0) + usize::from(early < 8)
        );
        for i in 0..8u64 {
            assert_eq!(g.status(i), STATUS_OK);
        }
        // Stopping waits too, and hands back nothing more.
        g.add(8, VIRTIO_BLK_T_IN, 0, &[(DATA, 512)]);
        assert_eq!(g.worker.process_queue().unwrap(), 1);
        let used = g.driver.used_idx(&*g.mem).unwrap();
        assert_eq!(g.worker.in_flight() + usize::from(used - 8), 1);
        let (_, _, io) = g.worker.into_parts();
        assert_eq!(io.unwrap().in_flight(), 0);
        assert_eq!(g.driver.used_idx(&*g.mem).unwrap(), used);
    }

    #[test]
    fn requests_the_asynchronous_engine_does_not_take_complete_at_once() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, IoEngine::Async);
        // GET_ID is answered by the device itself.
        write_header(
            &g.mem,
            HDR,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID,
            0,
        );
        g.driver
            .add_chain(&*g.mem, &[hdr(), MockBuffer::writable(DATA, 20), status()])
            .unwrap();
        assert_eq!(g.worker.process_queue().unwrap(), 1);
        assert_eq!(g.worker.in_flight(), 0);
        assert_eq!(g.status(0), STATUS_OK);
        assert_eq!(&g.read(DATA, 5), b"disk0");
    }

    #[test]
    fn the_ring_takes_no_other_operation_than_reads_writes_and_flushes() {
        let mut io = AsyncIo::new(4).unwrap();
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP points at nothing.
        unsafe { io.ring.submission().push(&nop) }.unwrap();
        io.ring.submit_and_wait(1).unwrap();
        let entry = io.ring.completion().next().unwrap();
        assert_eq!(entry.user_data(), 7);
        assert_eq!(entry.result(), -libc::EACCES);
        // Nor another registration.
        let err = io
            .ring
            .submitter()
            .register_eventfd(io.completion_fd())
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn an_io_uring_error_names_io_uring_and_the_errno() {
        let err = Error::IoUring {
            what: "set up",
            source: io::Error::from_raw_os_error(libc::ENOSYS),
        };
        let text = ErrorChain(&err).to_string();
        assert!(text.contains("io_uring"), "{text}");
        assert!(text.contains("os error 38"), "{text}");
    }

    #[test]
    fn the_completion_eventfd_is_registered_with_the_ring() {
        let image = Image::on_tmpfs();
        let mut g = Guest::new(&image, IoEngine::Async);
        g.add(0, VIRTIO_BLK_T_IN, 0, &[(DATA, 512)]);
        g.worker.process_queue().unwrap();
        let fd = g.worker.completion_fd().unwrap();
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 10_000) };
        assert_eq!(ready, 1);
        g.settle();
        assert_eq!(g.status(0), STATUS_OK);
    }

    /// A disk whose file is the read end of a pipe: a read stays in flight until bytes are
    /// written into the pipe, and a write fails (the end is not open for writing).
    struct PipeDisk(std::os::fd::OwnedFd);

    impl BlockBackend for PipeDisk {
        fn capacity(&self) -> u64 {
            SECTORS * SECTOR_SIZE
        }

        fn read_vectored<M: GuestMemory + ?Sized>(
            &mut self,
            _offset: u64,
            _bufs: &GuestIoVecs<'_, M>,
        ) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }

        fn write_vectored<M: GuestMemory + ?Sized>(
            &mut self,
            _offset: u64,
            _bufs: &GuestIoVecs<'_, M>,
        ) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }

        fn async_fd(&self) -> Option<BorrowedFd<'_>> {
            use std::os::fd::AsFd;
            Some(self.0.as_fd())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A worker on the asynchronous engine over a [`PipeDisk`], its guest memory and driver,
    /// and the pipe's write end.
    fn on_a_pipe() -> (
        BlockWorker<Space, PipeDisk>,
        Arc<Mem>,
        MockDriver,
        std::fs::File,
        CountingTrigger,
    ) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just opened both, and nothing else owns them.
        let (read, write) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let mem = Arc::new(guest_memory(0x100000).unwrap());
        let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let irqs = CountingTrigger::default();
        let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
        let disk = Disk::new(PipeDisk(read), false, "pipe").unwrap();
        let worker = BlockWorker::new(
            disk,
            driver.queue(),
            mem.clone(),
            interrupt,
            RateLimiter::default(),
        )
        .with_async_io(AsyncIo::new(4).unwrap());
        (worker, mem, driver, write, irqs)
    }

    /// Waits until the ring holds a completion of `worker`'s, for at most 10 s.
    fn wait_for_a_completion(worker: &mut BlockWorker<Space, PipeDisk>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while worker.completions_ready() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the read never completed"
            );
            std::thread::yield_now();
        }
    }

    /// Makes a request of `type_` for the 512 bytes at `DATA + 0x1000 * i` available, with
    /// its status byte at `STATUS + i`.
    fn add_512(mem: &Mem, driver: &mut MockDriver, i: u64, type_: u32) {
        write_header(mem, HDR + 16 * i, type_, 0);
        let data = if type_ == VIRTIO_BLK_T_IN {
            MockBuffer::writable(DATA + 0x1000 * i, 512)
        } else {
            MockBuffer::readable(DATA + 0x1000 * i, 512)
        };
        let chain = [
            MockBuffer::readable(HDR + 16 * i, 16),
            data,
            MockBuffer::writable(STATUS + i, 1),
        ];
        driver.add_chain(mem, &chain).unwrap();
    }

    #[test]
    fn reads_stay_in_flight_until_the_file_answers_and_saving_and_stopping_wait_for_them() {
        use std::io::Write;
        let (mut worker, mem, mut driver, mut write, _) = on_a_pipe();
        assert!(format!("{:?}", worker).contains("AsyncIo"));
        add_512(&mem, &mut driver, 0, VIRTIO_BLK_T_IN);
        add_512(&mem, &mut driver, 1, VIRTIO_BLK_T_IN);
        // A write on the pipe's read end fails at once: EBADF, an IOERR.
        add_512(&mem, &mut driver, 2, VIRTIO_BLK_T_OUT);
        assert_eq!(worker.process_queue().unwrap(), 3);
        assert_eq!(worker.in_flight(), 2);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + 2)).unwrap(),
            STATUS_IOERR
        );
        // The bytes come later, from another thread; saving the queue waits for them.
        let writer_end = write.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            write.write_all(&[0xa5; 1024]).unwrap();
        });
        let saved = worker.saved_queue();
        writer.join().unwrap();
        assert_eq!(worker.in_flight(), 0);
        assert_eq!((saved.next_avail(), saved.next_used()), (3, 3));
        for i in 0..2u64 {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
                STATUS_OK
            );
            let mut data = [0u8; 512];
            mem.read_slice(&mut data, GuestAddress(DATA + 0x1000 * i))
                .unwrap();
            assert_eq!(data, [0xa5; 512]);
        }
        // Stopping (a reset) waits for a read in flight too, and hands back nothing more.
        add_512(&mem, &mut driver, 3, VIRTIO_BLK_T_IN);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(worker.in_flight(), 1);
        let metrics = worker.metrics().clone();
        let mut write = writer_end;
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            write.write_all(&[0xa5; 512]).unwrap();
        });
        let _disk = worker.into_disk();
        writer.join().unwrap();
        assert_eq!(driver.used_idx(&*mem).unwrap(), 3);
        assert_eq!(metrics.get("read_count"), Some(3));
    }

    #[test]
    fn dropping_the_worker_waits_for_the_reads_in_flight() {
        use std::io::Write;
        use std::sync::atomic::{AtomicBool, Ordering};
        let (mut worker, mem, mut driver, mut write, _) = on_a_pipe();
        add_512(&mem, &mut driver, 0, VIRTIO_BLK_T_IN);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert_eq!(worker.in_flight(), 1);
        let written = Arc::new(AtomicBool::new(false));
        let writer = {
            let written = written.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                written.store(true, Ordering::SeqCst);
                write.write_all(&[0x5a; 512]).unwrap();
            })
        };
        // The kernel writes into guest memory until the read completes: the engine's drop
        // returns only after it did, which only the writer's bytes allow.
        drop(worker);
        assert!(written.load(Ordering::SeqCst));
        writer.join().unwrap();
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0x5a; 512]);
    }

    #[test]
    fn completions_while_the_limiter_holds_a_request_back_leave_the_queue_to_its_timer() {
        use std::io::Write;
        let (mut worker, mem, mut driver, mut write, irqs) = on_a_pipe();
        // One operation, then none for 10 s.
        *worker.rate_limiter_mut() = RateLimiter::new(None, bucket(1, 10_000)).unwrap();
        add_512(&mem, &mut driver, 0, VIRTIO_BLK_T_IN);
        add_512(&mem, &mut driver, 1, VIRTIO_BLK_T_IN);
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert!(worker.is_throttled());
        assert_eq!((worker.in_flight(), irqs.count()), (1, 0));
        write.write_all(&[0xa5; 512]).unwrap();
        wait_for_a_completion(&mut worker);
        // The read is handed back with its interrupt; the request held back is not asked
        // for again, nor any other taken.
        assert_eq!(worker.process_completions().unwrap(), 1);
        assert_eq!(driver.used_idx(&*mem).unwrap(), 1);
        assert_eq!((worker.in_flight(), irqs.count()), (0, 1));
        assert!(worker.is_throttled());
        assert_eq!(worker.queue().next_avail(), 2);
        assert_eq!(
            worker.metrics().get("rate_limiter_throttled_events"),
            Some(1)
        );
    }

    #[test]
    fn a_request_made_before_completions_are_handed_back_shares_their_interrupt() {
        use std::io::Write;
        let (mut worker, mem, mut driver, mut write, irqs) = on_a_pipe();
        add_512(&mem, &mut driver, 0, VIRTIO_BLK_T_IN);
        // A write on the pipe's read end fails at once, and is handed back with an interrupt
        // the driver does not take.
        add_512(&mem, &mut driver, 1, VIRTIO_BLK_T_OUT);
        assert_eq!(worker.process_queue().unwrap(), 2);
        assert_eq!((worker.in_flight(), irqs.count()), (1, 1));
        write.write_all(&[0xa5; 512]).unwrap();
        wait_for_a_completion(&mut worker);
        // The driver made another request before it took the interrupt: handing the read
        // back, the worker holds, takes the new request (in flight on the empty pipe), and
        // raises one interrupt.
        add_512(&mem, &mut driver, 2, VIRTIO_BLK_T_IN);
        assert_eq!(worker.process_completions().unwrap(), 1);
        assert_eq!(worker.queue().next_avail(), 3);
        assert_eq!((worker.in_flight(), irqs.count()), (1, 2));
        assert_eq!(driver.used_idx(&*mem).unwrap(), 2);
        write.write_all(&[0x5a; 512]).unwrap();
        assert_eq!(worker.wait_in_flight().unwrap(), 1);
        assert_eq!(driver.used_idx(&*mem).unwrap(), 3);
    }
}
