//! The disk behind a block device: a raw image file or a host block device, and the execution
//! of parsed requests against it.
//!
//! Reads and writes go straight between the file and guest memory: the request's data buffers
//! become host `iovec`s ([`GuestIoVecs`]) and one `preadv`/`pwritev` moves them, more only when
//! the kernel transfers less than asked or the buffers need more than [`IOV_MAX`] `iovec`s.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::request::{
    Request, RequestError, RequestType, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP, Segment,
};
use super::{Config, Error, Result, SECTOR_SIZE};
use crate::guest;
use crate::iov::{GuestIoVecs, IOV_MAX};
use crate::queue::DescriptorChain;

/// Length of the device ID string that GET_ID returns.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The start of a disk path that names a descriptor the process inherited, not a file to open:
/// `/proc/self/fd/N` is descriptor N itself, as crosvm reads it. The descriptor is duplicated,
/// never reopened through `/proc`, so it works where there is no `/proc` (in a jail) and names
/// a file that may lie outside it.
pub const INHERITED_FD_PREFIX: &str = "/proc/self/fd/";

/// The descriptor a disk path of the form `/proc/self/fd/N` names; `None` for any other path.
///
/// # Errors
///
/// [`Error::FdPath`] when the path starts with [`INHERITED_FD_PREFIX`] but the rest is not a
/// descriptor number alone (decimal digits that fit a descriptor).
pub fn inherited_fd(path: &Path) -> Result<Option<RawFd>> {
    let Some(rest) = path
        .to_str()
        .and_then(|p| p.strip_prefix(INHERITED_FD_PREFIX))
    else {
        return Ok(None);
    };
    let bad = || Error::FdPath {
        path: path.to_path_buf(),
    };
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    rest.parse::<RawFd>().map(Some).map_err(|_| bad())
}

/// Checks that the inherited descriptor `fd` can back a disk: it is open, on a regular file
/// or a block device, and open for reading, and for writing too unless `read_only`. It only
/// looks (`fcntl(F_GETFL)`, `fstat`), through no path.
///
/// # Errors
///
/// [`Error::Fd`] when it is not open, [`Error::FdAccess`] when its access mode does not fit,
/// [`Error::NotADisk`] (naming `/proc/self/fd/N`) when it is neither a regular file nor a block
/// device.
pub fn check_inherited_fd(fd: RawFd, read_only: bool) -> Result<()> {
    let fd_error = |source| Error::Fd { fd, source };
    // SAFETY: F_GETFL reads the status flags of a descriptor number and touches no memory; a
    // number that is not open fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(fd_error(io::Error::last_os_error()));
    }
    let readable = flags & libc::O_PATH == 0 && flags & libc::O_ACCMODE != libc::O_WRONLY;
    let writable = flags & libc::O_PATH == 0 && flags & libc::O_ACCMODE == libc::O_RDWR;
    if !readable || (!read_only && !writable) {
        let needed = if read_only {
            "reading"
        } else {
            "reading and writing (the drive is not read-only)"
        };
        return Err(Error::FdAccess { fd, needed });
    }
    // SAFETY: all zeros is a valid `stat`, plain data.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid, writable `stat` that outlives the call; `fd` is a descriptor
    // number the kernel checks.
    if unsafe { libc::fstat(fd, &mut stat) } < 0 {
        return Err(fd_error(io::Error::last_os_error()));
    }
    let kind = stat.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFBLK {
        return Err(Error::NotADisk {
            path: format!("{INHERITED_FD_PREFIX}{fd}").into(),
        });
    }
    Ok(())
}

/// A descriptor of its own, close-on-exec, on the file of the inherited descriptor `fd`, once
/// [`check_inherited_fd`] accepts it.
fn dup_inherited(fd: RawFd, read_only: bool) -> Result<File> {
    check_inherited_fd(fd, read_only)?;
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor on an open one and touches no memory.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(Error::Fd {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `dup` was just made and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(dup) })
}

/// Bytes of zeroes written at a time where the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// How a request ended: the status byte for the driver, and how many bytes of data the device
/// wrote into the chain before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The status byte.
    pub status: u8,
    /// Bytes of data written into the chain's writable buffers, the status byte not counted.
    pub data_written: u32,
}

impl Completion {
    fn status(status: u8) -> Self {
        Completion {
            status,
            data_written: 0,
        }
    }
}

/// An open disk image and what it supports.
pub struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
    discard: bool,
    zero_range: bool,
    discard_alignment: u32,
    id: [u8; ID_BYTES],
    zeroes: Vec<u8>,
    io_error_logged: bool,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id_len = self.id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        let id = String::from_utf8_lossy(self.id.get(..id_len).unwrap_or(&[]));
        f.debug_struct("Disk")
            .field("capacity", &self.capacity)
            .field("read_only", &self.read_only)
            .field("discard", &self.discard)
            .field("zero_range", &self.zero_range)
            .field("id", &id)
            .finish_non_exhaustive()
    }
}

impl Disk {
    /// Opens the image `config` names, read-only or read-write, and finds out its size and
    /// whether it can punch holes (the probe punches one past the end of the file, which
    /// changes nothing).
    ///
    /// # Errors
    ///
    /// [`Error::IdTooLong`] or [`Error::IdNotPrintable`] for a bad ID, [`Error::Open`] if the
    /// image cannot be opened, [`Error::NotADisk`] if it is neither a regular file nor a block
    /// device, [`Error::Size`] if its size cannot be read, and [`Error::SizeNotSectorMultiple`]
    /// if the size is not a whole number of sectors.
    pub fn open(config: &Config) -> Result<Self> {
        Disk::open_image(&config.path, config.read_only, &config.id)
    }

    /// As [`Disk::open`], for the image at `path`, read-only or not, with the ID `id`: how a
    /// VMM opens the new disk of a running device ([`Block::update_disk`](super::Block::update_disk))
    /// without holding the device.
    ///
    /// The file is opened non-blocking, so that a FIFO or a character device is refused
    /// rather than waited on, and made blocking again once it is known to be a disk.
    ///
    /// A path `/proc/self/fd/N` ([`INHERITED_FD_PREFIX`]) is not opened: the inherited
    /// descriptor N is checked ([`check_inherited_fd`]) and duplicated, close-on-exec, and the
    /// disk uses the duplicate; its file status flags, which it shares with whoever passed it,
    /// are left alone.
    ///
    /// # Errors
    ///
    /// As [`Disk::open`]; for a descriptor, [`Error::FdPath`] and those of
    /// [`check_inherited_fd`].
    pub fn open_image(path: &Path, read_only: bool, id: &str) -> Result<Self> {
        let id = id_bytes(id)?;
        let open_error = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let inherited = inherited_fd(path)?;
        let file = match inherited {
            Some(fd) => dup_inherited(fd, read_only)?,
            None => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(open_error)?,
        };
        let size_error = |source| Error::Size {
            path: path.to_path_buf(),
            source,
        };
        let metadata = file.metadata().map_err(size_error)?;
        let file_type = metadata.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(Error::NotADisk {
                path: path.to_path_buf(),
            });
        }
        if inherited.is_none() {
            clear_nonblocking(&file).map_err(open_error)?;
        }
        // A block device's metadata says 0 bytes; seeking to its end gives its size.
        let size = {
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(size_error)?
        };
        if size % SECTOR_SIZE != 0 {
            return Err(Error::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        let block_size = metadata.blksize();
        let discard_alignment = u32::try_from(block_size / SECTOR_SIZE).unwrap_or(1).max(1);
        let discard = !read_only && probe_punch_hole(&file, size);
        Ok(Disk {
            file,
            capacity: size / SECTOR_SIZE,
            read_only,
            discard,
            zero_range: true,
            discard_alignment,
            id,
            zeroes: Vec::new(),
            io_error_logged: false,
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the disk carries out discards (writable, on a file that can punch holes).
    pub fn discard_supported(&self) -> bool {
        self.discard
    }

    /// The granularity of discards, in sectors: the host file system's block size.
    pub fn discard_alignment(&self) -> u32 {
        self.discard_alignment
    }

    /// The ID string GET_ID returns, NUL-padded to [`ID_BYTES`].
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Parses and carries out the request in `chain`, writes its status byte, and returns the
    /// used length to hand the chain back with: the bytes written into it, data and status.
    /// A chain without a writable status byte is handed back with used length 0.
    pub fn handle<M: GuestMemory + ?Sized>(&mut self, mem: &M, chain: &DescriptorChain) -> u32 {
        match Request::parse(chain, mem, self.capacity) {
            Ok(request) => {
                let completion = self.execute(mem, &request);
                complete(mem, request.status_addr(), completion)
            }
            Err(err) => refuse(mem, chain, &err),
        }
    }

    /// Carries out a parsed request. Writes on a read-only disk fail with IOERR and write
    /// nothing; discards on a disk that does not support them are UNSUPP.
    pub fn execute<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        request: &Request<'_>,
    ) -> Completion {
        let writes = matches!(
            request.request_type(),
            RequestType::Out { .. } | RequestType::Discard(_) | RequestType::WriteZeroes(_)
        );
        if writes && self.read_only {
            return Completion::status(STATUS_IOERR);
        }
        match request.request_type() {
            RequestType::In { sector, len } => self.read(mem, request, sector, len),
            RequestType::Out { sector, len } => self.write(mem, request, sector, len),
            RequestType::Flush => {
                let result = self.file.sync_data();
                self.finish(result, "flush")
            }
            RequestType::GetId { len } => self.get_id(mem, request, len),
            RequestType::Discard(segment) => {
                if !self.discard {
                    return Completion::status(STATUS_UNSUPP);
                }
                let result = byte_range(segment).and_then(|(offset, len)| {
                    // fallocate refuses an empty range, and there is nothing to do.
                    if len == 0 {
                        return Ok(());
                    }
                    fallocate(&self.file, PUNCH_HOLE, offset, len)
                });
                self.finish(result, "discard")
            }
            RequestType::WriteZeroes(segment) => {
                let result = self.write_zeroes(segment);
                self.finish(result, "write zeroes")
            }
        }
    }

    fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        request: &Request<'_>,
        sector: u64,
        len: u32,
    ) -> Completion {
        let iov = match GuestIoVecs::new(mem, request.data(), Permissions::Write) {
            Ok(iov) => iov,
            Err(err) => return self.failed(&io::Error::other(err), "read"),
        };
        let (done, result) = match sector_offset(sector) {
            Ok(offset) => transfer(&self.file, iov.iovecs(), offset, Direction::Read),
            Err(err) => (0, Err(err)),
        };
        iov.mark_written(done);
        let mut completion = self.finish(result, "read");
        completion.data_written = u32::try_from(done).unwrap_or(len).min(len);
        completion
    }

    fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        request: &Request<'_>,
        sector: u64,
        _len: u32,
    ) -> Completion {
        let iov = match GuestIoVecs::new(mem, request.data(), Permissions::Read) {
            Ok(iov) => iov,
            Err(err) => return self.failed(&io::Error::other(err), "write"),
        };
        let result = sector_offset(sector)
            .and_then(|offset| transfer(&self.file, iov.iovecs(), offset, Direction::Write).1);
        self.finish(result, "write")
    }

    fn get_id<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        request: &Request<'_>,
        len: u32,
    ) -> Completion {
        let count = usize::try_from(len).unwrap_or(ID_BYTES).min(ID_BYTES);
        let id = self.id.get(..count).unwrap_or(&[]);
        match request.chain().write_at(mem, 0, id) {
            Ok(written) => Completion {
                status: STATUS_OK,
                data_written: u32::try_from(written).unwrap_or(0),
            },
            Err(err) => self.failed(&io::Error::other(err), "get id"),
        }
    }

    /// Zeroes a range: by deallocating it where the driver allows it and the file can, else by
    /// asking the file system to zero it, else by writing zeroes.
    fn write_zeroes(&mut self, segment: Segment) -> io::Result<()> {
        let (offset, len) = byte_range(segment)?;
        if len == 0 {
            return Ok(());
        }
        if segment.unmap && self.discard {
            match fallocate(&self.file, PUNCH_HOLE, offset, len) {
                Err(err) if refused(&err) => {}
                other => return other,
            }
        }
        if self.zero_range {
            match fallocate(&self.file, ZERO_RANGE, offset, len) {
                // The file system cannot: write zeroes from now on.
                Err(err) if refused(&err) => self.zero_range = false,
                other => return other,
            }
        }
        if self.zeroes.is_empty() {
            self.zeroes = vec![0; ZERO_CHUNK];
        }
        let mut pos = offset;
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        while pos < end {
            let count = usize::try_from(end - pos).map_or(ZERO_CHUNK, |n| n.min(ZERO_CHUNK));
            let chunk = self.zeroes.get(..count).ok_or_else(out_of_range)?;
            self.file.write_all_at(chunk, pos)?;
            // Cannot overflow: `pos + count <= end`.
            pos += u64::try_from(count).map_err(|_| out_of_range())?;
        }
        Ok(())
    }

    fn finish(&mut self, result: io::Result<()>, what: &str) -> Completion {
        match result {
            Ok(()) => Completion::status(STATUS_OK),
            Err(err) => self.failed(&err, what),
        }
    }

    /// An I/O error: IOERR for the driver, and a log line the first time only, since the guest
    /// can repeat the request as often as it likes.
    fn failed(&mut self, err: &io::Error, what: &str) -> Completion {
        if self.io_error_logged {
            log::debug!("A block {what} request failed: {err}");
        } else {
            self.io_error_logged = true;
            log::warn!(
                "A block {what} request failed (further failures are logged at debug): {err}"
            );
        }
        Completion::status(STATUS_IOERR)
    }
}

/// Writes the status byte of a request that `completion` ended at `status_addr`, and returns
/// the used length to hand its chain back with: the data written and the status byte, or the
/// data alone if the status byte cannot be written.
pub(super) fn complete<M: GuestMemory + ?Sized>(
    mem: &M,
    status_addr: GuestAddress,
    completion: Completion,
) -> u32 {
    if let Err(err) = guest::write_slice(mem, &[completion.status], status_addr) {
        log::debug!("Cannot write a block request's status byte: {err}");
        return completion.data_written;
    }
    completion.data_written.saturating_add(1)
}

/// Completes `chain`, which `err` says is not a valid request, with the status byte the error
/// calls for, and returns the used length; 0 for a chain without a status byte.
pub(super) fn refuse<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &DescriptorChain,
    err: &RequestError,
) -> u32 {
    let (Some(status), Some(addr)) = (err.status(), super::request::status_addr(chain)) else {
        log::debug!("A block request was dropped: {err}");
        return 0;
    };
    log::debug!("A block request failed: {err}");
    complete(mem, addr, Completion::status(status))
}

/// The NUL-padded ID string of `id`, which must be printable ASCII of at most [`ID_BYTES`].
pub(super) fn id_bytes(id: &str) -> Result<[u8; ID_BYTES]> {
    if id.len() > ID_BYTES {
        return Err(Error::IdTooLong { len: id.len() });
    }
    if !id.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(Error::IdNotPrintable);
    }
    let mut bytes = [0u8; ID_BYTES];
    for (dst, src) in bytes.iter_mut().zip(id.bytes()) {
        *dst = src;
    }
    Ok(bytes)
}

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Makes `file` blocking again: a disk's reads and writes wait for the disk.
fn clear_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor `file` owns reads its flags and touches no memory.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor `file` owns changes its status flags only.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `file` can punch holes: punches one just past its end, which changes nothing.
fn probe_punch_hole(file: &File, size: u64) -> bool {
    fallocate(file, PUNCH_HOLE, size, SECTOR_SIZE).is_ok()
}

/// Whether an error says the file system does not do this kind of `fallocate`.
fn refused(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

fn out_of_range() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

fn sector_offset(sector: u64) -> io::Result<u64> {
    sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)
}

/// A segment's byte offset and length.
fn byte_range(segment: Segment) -> io::Result<(u64, u64)> {
    let offset = sector_offset(segment.sector)?;
    let len = u64::from(segment.num_sectors)
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(out_of_range)?;
    Ok((offset, len))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| out_of_range())?;
    let len = libc::off_t::try_from(len).map_err(|_| out_of_range())?;
    loop {
        // SAFETY: fallocate takes no pointers; the descriptor is the open file `file` owns.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// From the file into the buffers.
    Read,
    /// From the buffers into the file.
    Write,
}

/// Moves the bytes of `iovecs` between them and `file` at `offset`, with as few
/// `preadv`/`pwritev` calls as the kernel allows: again after a short transfer or EINTR, and in
/// batches of at most [`IOV_MAX`] `iovec`s. Returns the bytes moved, and the error that stopped
/// it short, if one did (reaching the end of the file counts as one).
///
/// The `iovecs` must point at memory that stays mapped, writable for [`Direction::Read`], for
/// the whole call: the guest memory a [`GuestIoVecs`] keeps mapped.
fn transfer(
    file: &File,
    iovecs: &[libc::iovec],
    offset: u64,
    direction: Direction,
) -> (usize, io::Result<()>) {
    let total = iovecs
        .iter()
        .map(|iov| iov.iov_len)
        .fold(0, usize::saturating_add);
    let mut done = 0usize;
    let mut pending: &[libc::iovec] = iovecs;
    // A copy of the iovecs left, made only when a short transfer stops inside one.
    let mut rest: Vec<libc::iovec>;
    while done < total {
        let Some(pos) = offset.checked_add(u64::try_from(done).unwrap_or(u64::MAX)) else {
            return (done, Err(out_of_range()));
        };
        let Ok(pos) = libc::off_t::try_from(pos) else {
            return (done, Err(out_of_range()));
        };
        let batch = pending.get(..pending.len().min(IOV_MAX)).unwrap_or(&[]);
        // Cannot fail: IOV_MAX fits in a c_int.
        let count = libc::c_int::try_from(batch.len()).unwrap_or(0);
        let fd = file.as_raw_fd();
        let ret = match (direction, batch) {
            // One buffer, as most requests have: pread and pwrite skip the kernel's copy of the
            // iovec array.
            // SAFETY: the iovec points at `iov_len` bytes of mapped memory the caller keeps
            // writable for the whole call; pread writes at most that many.
            (Direction::Read, [one]) => unsafe { libc::pread(fd, one.iov_base, one.iov_len, pos) },
            // SAFETY: as above; pwrite only reads the buffer.
            (Direction::Write, [one]) => unsafe {
                libc::pwrite(fd, one.iov_base, one.iov_len, pos)
            },
            // SAFETY: `batch` holds `count` iovecs that point at mapped memory the caller keeps
            // writable for the whole call; preadv writes at most their lengths into it.
            (Direction::Read, _) => unsafe { libc::preadv(fd, batch.as_ptr(), count, pos) },
            // SAFETY: as above; pwritev only reads through the iovecs.
            (Direction::Write, _) => unsafe { libc::pwritev(fd, batch.as_ptr(), count, pos) },
        };
        let moved = match usize::try_from(ret) {
            Ok(0) => {
                let kind = match direction {
                    Direction::Read => io::ErrorKind::UnexpectedEof,
                    Direction::Write => io::ErrorKind::WriteZero,
                };
                return (done, Err(io::Error::from(kind)));
            }
            Ok(moved) => moved,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return (done, Err(err));
            }
        };
        done = done.saturating_add(moved);
        if done >= total {
            break;
        }
        // Skip the iovecs moved whole; start the next call inside the one moved in part.
        let mut left = moved;
        let mut skip = 0;
        for iov in pending {
            if left < iov.iov_len {
                break;
            }
            left -= iov.iov_len;
            skip += 1;
        }
        let remaining = pending.get(skip..).unwrap_or(&[]);
        if left == 0 {
            pending = remaining;
        } else {
            rest = remaining.to_vec();
            if let Some(first) = rest.first_mut() {
                first.iov_base = first.iov_base.cast::<u8>().wrapping_add(left).cast();
                first.iov_len -= left;
            }
            pending = &rest;
        }
    }
    (done, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_nul_padded_and_checked() {
        let id = id_bytes("disk0").unwrap();
        assert_eq!(&id[..5], b"disk0");
        assert!(id[5..].iter().all(|&b| b == 0));
        let full = "a".repeat(ID_BYTES);
        assert_eq!(id_bytes(&full).unwrap(), [b'a'; ID_BYTES]);
        assert!(matches!(
            id_bytes(&"a".repeat(ID_BYTES + 1)),
            Err(Error::IdTooLong { len: 21 })
        ));
        assert!(matches!(id_bytes("a\0b"), Err(Error::IdNotPrintable)));
        assert!(matches!(id_bytes("é"), Err(Error::IdNotPrintable)));
    }

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn a_transfer_over_more_than_iov_max_iovecs_moves_every_byte() {
        let file = crate::mock::scratch_file().unwrap();
        let data: Vec<u8> = (0..IOV_MAX * 2 + 3).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        let mut back = vec![0u8; data.len()];
        let mut iovecs: Vec<libc::iovec> = back.chunks_mut(1).map(iovec).collect();
        let (done, result) = transfer(&file, &iovecs, 0, Direction::Read);
        result.unwrap();
        assert_eq!(done, data.len());
        iovecs.clear();
        assert_eq!(back, data);
    }

    #[test]
    fn a_read_past_the_end_of_the_file_stops_with_what_it_got() {
        let file = crate::mock::scratch_file().unwrap();
        file.write_all_at(&[7u8; 700], 0).unwrap();
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        let iovecs = [iovec(&mut a), iovec(&mut b)];
        // The kernel stops at the end of the file, inside the second iovec.
        let (done, result) = transfer(&file, &iovecs, 0, Direction::Read);
        assert_eq!(done, 700);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(b[..188].iter().all(|&x| x == 7));
        assert!(b[188..].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_proc_self_fd_path_names_a_descriptor_and_nothing_else_does() {
        let fd = |path: &str| inherited_fd(Path::new(path));
        assert_eq!(fd("/proc/self/fd/0").unwrap(), Some(0));
        assert_eq!(fd("/proc/self/fd/42").unwrap(), Some(42));
        for other in [
            "/tmp/disk.img",
            "/proc/self/fdx/3",
            "proc/self/fd/3",
            "/proc/1/fd/3",
        ] {
            assert_eq!(fd(other).unwrap(), None, "{other}");
        }
        for bad in [
            "/proc/self/fd/",
            "/proc/self/fd/-1",
            "/proc/self/fd/+3",
            "/proc/self/fd/3/",
            "/proc/self/fd/3/../../../etc/shadow",
            "/proc/self/fd/ 3",
            "/proc/self/fd/99999999999",
        ] {
            let err = fd(bad).unwrap_err();
            assert!(matches!(err, Error::FdPath { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("descriptor number"), "{err}");
        }
    }

    /// Opens `path` with `flags` and hands over the raw descriptor, left open as an inherited
    /// one would be; the caller closes it.
    fn raw_open(path: &Path, flags: libc::c_int) -> RawFd {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c_path` is NUL-terminated and outlives the call.
        let fd = unsafe { libc::open(c_path.as_ptr(), flags | libc::O_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        fd
    }

    fn close(fd: RawFd) {
        // SAFETY: the test opened `fd` and nothing else owns it.
        unsafe { libc::close(fd) };
    }

    #[test]
    fn an_inherited_descriptor_is_the_disk_without_being_reopened() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-fd-disk-").unwrap();
        let image = dir.as_path().join("disk.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let fd = raw_open(&image, libc::O_RDWR);
        let path = format!("{INHERITED_FD_PREFIX}{fd}");
        // The file is gone from every path: only the descriptor reaches it.
        std::fs::remove_file(&image).unwrap();
        let disk = Disk::open_image(Path::new(&path), false, "fd").unwrap();
        assert_eq!(disk.capacity(), 8);
        assert!(!disk.read_only());
        disk.file
            .write_all_at(b"through the duplicate", 512)
            .unwrap();
        // The duplicate is close-on-exec and a descriptor of its own on the same file.
        let dup = disk.file.as_raw_fd();
        assert_ne!(dup, fd);
        // SAFETY: F_GETFD reads the flags of a descriptor the disk owns.
        assert_eq!(unsafe { libc::fcntl(dup, libc::F_GETFD) }, libc::FD_CLOEXEC);
        let mut back = [0u8; 21];
        // SAFETY: `fd` is open, and `File` is only borrowed: `ManuallyDrop` never closes it.
        let original = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        original.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(&back, b"through the duplicate");
        drop(disk);
        // Dropping the disk closes its duplicate only.
        // SAFETY: F_GETFL reads the flags of a descriptor number.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFL) } >= 0);
        close(fd);
    }

    #[test]
    fn an_inherited_descriptor_that_cannot_back_the_drive_is_refused() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-fd-disk-").unwrap();
        let image = dir.as_path().join("disk.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let open = |fd: RawFd, read_only: bool| {
            Disk::open_image(
                Path::new(&format!("{INHERITED_FD_PREFIX}{fd}")),
                read_only,
                "fd",
            )
        };
        // Read-only: fine for a read-only drive, refused for a writable one.
        let ro = raw_open(&image, libc::O_RDONLY);
        assert!(open(ro, true).unwrap().read_only());
        let err = open(ro, false).unwrap_err();
        assert!(matches!(err, Error::FdAccess { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "The inherited descriptor {ro} is not open for reading and writing (the drive is not read-only)"
            )
        );
        // Write-only and O_PATH descriptors cannot be read.
        let wo = raw_open(&image, libc::O_WRONLY);
        let opath = raw_open(&image, libc::O_PATH);
        for fd in [wo, opath] {
            let err = open(fd, true).unwrap_err();
            assert!(matches!(err, Error::FdAccess { .. }), "{err}");
        }
        // A directory, a pipe and a character device are no disks.
        let dirfd = raw_open(dir.as_path(), libc::O_RDONLY | libc::O_DIRECTORY);
        let null = raw_open(Path::new("/dev/null"), libc::O_RDWR);
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two descriptors.
        let ret = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(ret, 0);
        for fd in [dirfd, null, pipe[0]] {
            let err = open(fd, true).unwrap_err();
            assert!(matches!(err, Error::NotADisk { .. }), "{err}");
            assert!(
                err.to_string().contains(&format!("/proc/self/fd/{fd} ")),
                "{err}"
            );
        }
        for fd in [ro, wo, opath, dirfd, null, pipe[0], pipe[1]] {
            close(fd);
        }
        // A descriptor that is not open (past any limit on open files, so that no test running
        // beside this one can open it meanwhile).
        let closed = 1 << 30;
        let err = open(closed, true).unwrap_err();
        assert!(matches!(err, Error::Fd { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("Cannot use the inherited descriptor {closed} as a disk image")
        );
    }
}
