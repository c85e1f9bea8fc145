//! The default block backend: a raw image file or a host block device ([`RawFile`]), opened
//! from a path, from a descriptor the process inherited (`/proc/self/fd/N`), or from a file
//! already open.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::GuestMemory;

use super::backend::BlockBackend;
use super::{Error, Result, SECTOR_SIZE};
use crate::iov::{GuestIoVecs, IOV_MAX};

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

/// A raw disk image, or a host block device, as a [`BlockBackend`]: the default backend of a
/// block device.
///
/// Reads and writes go straight between the file and guest memory: one `preadv`/`pwritev` of
/// the request's buffers, more only when the kernel transfers less than asked or the buffers
/// need more than [`IOV_MAX`] `iovec`s. Discards punch holes, where the file system can (a
/// probe when the file is taken finds out); write zeroes ask the file system to zero the
/// range, and write zeroes where it cannot.
pub struct RawFile {
    file: File,
    /// The size in bytes, a multiple of the sector size.
    capacity: u64,
    read_only: bool,
    discard: bool,
    zero_range: bool,
    discard_alignment: u32,
    zeroes: Vec<u8>,
}

impl fmt::Debug for RawFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawFile")
            .field("fd", &self.file.as_raw_fd())
            .field("capacity", &self.capacity)
            .field("read_only", &self.read_only)
            .field("discard", &self.discard)
            .field("zero_range", &self.zero_range)
            .finish_non_exhaustive()
    }
}

impl RawFile {
    /// Opens the image at `path`, read-only or read-write, and finds out its size and whether
    /// it can punch holes (the probe punches one past the end of the file, which changes
    /// nothing).
    ///
    /// The file is opened non-blocking, so that a FIFO or a character device is refused
    /// rather than waited on, and made blocking again once it is known to be a disk.
    ///
    /// A path `/proc/self/fd/N` ([`INHERITED_FD_PREFIX`]) is not opened: the inherited
    /// descriptor N is checked ([`check_inherited_fd`]) and duplicated, close-on-exec, and the
    /// backend uses the duplicate; its file status flags, which it shares with whoever passed
    /// it, are left alone.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] if the image cannot be opened, [`Error::NotADisk`] if it is neither a
    /// regular file nor a block device, [`Error::Size`] if its size cannot be read, and
    /// [`Error::SizeNotSectorMultiple`] if the size is not a whole number of sectors; for a
    /// descriptor, [`Error::FdPath`] and those of [`check_inherited_fd`].
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let open_error = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(fd) = inherited_fd(path)? {
            return RawFile::with_file(dup_inherited(fd, read_only)?, read_only, path);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(open_error)?;
        let metadata = file.metadata().map_err(|source| Error::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let file_type = metadata.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(Error::NotADisk {
                path: path.to_path_buf(),
            });
        }
        clear_nonblocking(&file).map_err(open_error)?;
        RawFile::with_file(file, read_only, path)
    }

    /// The image `file` already open, read-only or read-write: a [`File`], or an
    /// [`OwnedFd`](std::os::fd::OwnedFd) such as one a jailer passed. It is checked as an
    /// inherited descriptor is ([`check_inherited_fd`]: open for reading, and for writing too
    /// unless `read_only`, on a regular file or a block device), then used as it is: its file
    /// status flags, which it may share with whoever opened it, are left alone, so it should
    /// be blocking. Errors name it `/proc/self/fd/N`.
    ///
    /// # Errors
    ///
    /// Those of [`check_inherited_fd`], [`Error::Size`] and [`Error::SizeNotSectorMultiple`].
    pub fn from_file(file: impl Into<File>, read_only: bool) -> Result<Self> {
        let file = file.into();
        let fd = file.as_raw_fd();
        check_inherited_fd(fd, read_only)?;
        let path = PathBuf::from(format!("{INHERITED_FD_PREFIX}{fd}"));
        RawFile::with_file(file, read_only, &path)
    }

    /// The backend on `file`, a regular file or a block device open for what `read_only`
    /// needs, which `path` names in errors.
    fn with_file(file: File, read_only: bool, path: &Path) -> Result<Self> {
        let size_error = |source| Error::Size {
            path: path.to_path_buf(),
            source,
        };
        let metadata = file.metadata().map_err(size_error)?;
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
        Ok(RawFile {
            file,
            capacity: size,
            read_only,
            discard,
            zero_range: true,
            discard_alignment,
            zeroes: Vec::new(),
        })
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockBackend for RawFile {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        transfer(&self.file, bufs.iovecs(), offset, Direction::Read).1
    }

    fn write_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        transfer(&self.file, bufs.iovecs(), offset, Direction::Write).1
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The image itself: its bytes are the disk's.
    fn async_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    /// Whether the file is writable and its file system punches holes.
    fn supports_discard(&self) -> bool {
        self.discard
    }

    /// The host file system's block size, in sectors.
    fn discard_alignment(&self) -> u32 {
        self.discard_alignment
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.discard {
            return Err(io::ErrorKind::Unsupported.into());
        }
        fallocate(&self.file, PUNCH_HOLE, offset, len)
    }

    /// Whether the file is writable: where the file system cannot zero a range, zeroes are
    /// written.
    fn supports_write_zeroes(&self) -> bool {
        !self.read_only
    }

    /// Zeroes a range: by deallocating it where the driver allows it and the file can, else by
    /// asking the file system to zero it, else by writing zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if len == 0 {
            return Ok(());
        }
        if unmap && self.discard {
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
        let disk = RawFile::open(Path::new(&path), false).unwrap();
        assert_eq!(disk.capacity(), 4096);
        assert!(!BlockBackend::read_only(&disk));
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
            RawFile::open(Path::new(&format!("{INHERITED_FD_PREFIX}{fd}")), read_only)
        };
        // Read-only: fine for a read-only drive, refused for a writable one.
        let ro = raw_open(&image, libc::O_RDONLY);
        assert!(BlockBackend::read_only(&open(ro, true).unwrap()));
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

    #[test]
    fn a_backend_is_built_from_a_file_or_a_descriptor_already_open() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-open-disk-").unwrap();
        let image = dir.as_path().join("disk.img");
        std::fs::write(&image, vec![3u8; 2048]).unwrap();
        let rw = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image)
                .unwrap()
        };

        let disk = RawFile::from_file(rw(), false).unwrap();
        assert_eq!(disk.capacity(), 2048);
        assert!(!BlockBackend::read_only(&disk));
        assert!(disk.supports_write_zeroes());
        let fd: std::os::fd::OwnedFd = rw().into();
        let disk = RawFile::from_file(fd, true).unwrap();
        assert!(BlockBackend::read_only(&disk));
        assert!(!disk.supports_discard() && !disk.supports_write_zeroes());

        // A file open for reading only cannot back a writable disk.
        let ro = File::open(&image).unwrap();
        let fd = ro.as_raw_fd();
        let err = RawFile::from_file(ro, false).unwrap_err();
        assert!(
            matches!(err, Error::FdAccess { fd: f, .. } if f == fd),
            "{err}"
        );
        // Neither can a directory, nor an image of part of a sector.
        let err = RawFile::from_file(File::open(dir.as_path()).unwrap(), true).unwrap_err();
        assert!(matches!(err, Error::NotADisk { .. }), "{err}");
        std::fs::write(&image, vec![3u8; 1000]).unwrap();
        let err = RawFile::from_file(rw(), false).unwrap_err();
        assert!(
            matches!(err, Error::SizeNotSectorMultiple { size: 1000, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_directory_is_not_a_disk() {
        let err = RawFile::open(&std::env::temp_dir(), true).unwrap_err();
        assert!(matches!(err, Error::NotADisk { .. }), "{err}");
    }

    #[test]
    fn a_missing_image_is_refused() {
        let path = std::env::temp_dir().join("ember-blk-test-no-such-image");
        let err = RawFile::open(&path, false).unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        // The message names the path; the source says why.
        assert!(err.to_string().contains("no-such-image"));
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(
            source.downcast_ref::<io::Error>().unwrap().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let path = std::env::temp_dir().join(format!("ember-blk-fifo-{}", std::process::id()));
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Opened read-only, a FIFO with no writer would block the opener for ever.
        let result = RawFile::open(&path, true);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(result, Err(Error::NotADisk { .. })));
    }
}
