//! The disk a block device serves: a [`BlockBackend`] with the device's identity (its read-only
//! flag and ID string) and the checks the device makes before the backend sees a request.

use std::fmt;
use std::io;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::backend::BlockBackend;
use super::raw_file::RawFile;
use super::request::{
    Request, RequestError, RequestType, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP, Segment,
};
use super::{Error, Result, SECTOR_SIZE};
use crate::guest;
use crate::iov::GuestIoVecs;
use crate::queue::DescriptorChain;

/// Length of the device ID string that GET_ID returns.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

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

/// A backend as a block device serves it: its capacity in sectors, read once, the device's
/// read-only flag and ID, and the execution of parsed requests against the backend.
///
/// The device, not the backend, refuses writes, discards and write zeroes on a read-only disk,
/// answers GET_ID, answers discards and write zeroes the backend does not support with
/// VIRTIO_BLK_S_UNSUPP, marks the guest memory a read filled dirty, and logs the first failure
/// of the backend only, since the guest can repeat a failing request as often as it likes.
pub struct Disk<B = RawFile> {
    backend: B,
    /// The backend's capacity in sectors.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    io_error_logged: bool,
}

impl<B> fmt::Debug for Disk<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id_len = self.id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        let id = String::from_utf8_lossy(self.id.get(..id_len).unwrap_or(&[]));
        f.debug_struct("Disk")
            .field("capacity", &self.capacity)
            .field("read_only", &self.read_only)
            .field("id", &id)
            .finish_non_exhaustive()
    }
}

impl<B: BlockBackend> Disk<B> {
    /// The disk of a device, read-only or not, with the ID string `id`, on `backend`.
    ///
    /// # Errors
    ///
    /// [`Error::IdTooLong`] or [`Error::IdNotPrintable`] for a bad ID,
    /// [`Error::CapacityNotSectorMultiple`] when the backend's capacity is not a whole number
    /// of sectors, [`Error::ReadOnlyBackend`] when a read-only backend would back a writable
    /// device.
    pub fn new(backend: B, read_only: bool, id: &str) -> Result<Self> {
        let id = id_bytes(id)?;
        let bytes = backend.capacity();
        if bytes % SECTOR_SIZE != 0 {
            return Err(Error::CapacityNotSectorMultiple { capacity: bytes });
        }
        if backend.read_only() && !read_only {
            return Err(Error::ReadOnlyBackend);
        }
        Ok(Disk {
            backend,
            capacity: bytes / SECTOR_SIZE,
            read_only,
            id,
            io_error_logged: false,
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The ID string GET_ID returns, NUL-padded to [`ID_BYTES`].
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Gives the backend back.
    pub fn into_backend(self) -> B {
        self.backend
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

    /// Carries out a request [`Request::parse`] checked against this disk's capacity. Writes on
    /// a read-only disk fail with IOERR and reach no backend; discards and write zeroes the
    /// backend does not support are UNSUPP; empty ones succeed without reaching it.
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
            RequestType::Out { sector, .. } => self.write(mem, request, sector),
            RequestType::Flush => {
                let result = self.backend.flush();
                self.finish(result, "flush")
            }
            RequestType::GetId { len } => self.get_id(mem, request, len),
            RequestType::Discard(segment) => {
                if !self.backend.supports_discard() {
                    return Completion::status(STATUS_UNSUPP);
                }
                let result = byte_range(segment).and_then(|(offset, len)| {
                    if len == 0 {
                        return Ok(());
                    }
                    self.backend.discard(offset, len)
                });
                self.finish_optional(result, "discard")
            }
            RequestType::WriteZeroes(segment) => {
                if !self.backend.supports_write_zeroes() {
                    return Completion::status(STATUS_UNSUPP);
                }
                let result = byte_range(segment).and_then(|(offset, len)| {
                    if len == 0 {
                        return Ok(());
                    }
                    self.backend.write_zeroes(offset, len, segment.unmap)
                });
                self.finish_optional(result, "write zeroes")
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
        let result = sector_offset(sector).and_then(|offset| {
            let result = self.backend.read_vectored(offset, &iov);
            // Whether it succeeded or not, the backend may have written any of the buffers.
            iov.mark_written(iov.len());
            result
        });
        let mut completion = self.finish(result, "read");
        if completion.status == STATUS_OK {
            completion.data_written = u32::try_from(iov.len()).unwrap_or(len).min(len);
        }
        completion
    }

    fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        request: &Request<'_>,
        sector: u64,
    ) -> Completion {
        let iov = match GuestIoVecs::new(mem, request.data(), Permissions::Read) {
            Ok(iov) => iov,
            Err(err) => return self.failed(&io::Error::other(err), "write"),
        };
        let result =
            sector_offset(sector).and_then(|offset| self.backend.write_vectored(offset, &iov));
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

    pub(super) fn finish(&mut self, result: io::Result<()>, what: &str) -> Completion {
        match result {
            Ok(()) => Completion::status(STATUS_OK),
            Err(err) => self.failed(&err, what),
        }
    }

    /// As [`Disk::finish`], for an operation the backend may turn out not to support.
    fn finish_optional(&mut self, result: io::Result<()>, what: &str) -> Completion {
        match result {
            Err(err) if err.kind() == io::ErrorKind::Unsupported => {
                Completion::status(STATUS_UNSUPP)
            }
            other => self.finish(other, what),
        }
    }

    /// An I/O error: IOERR for the driver, and a log line the first time only, since the guest
    /// can repeat the request as often as it likes.
    pub(super) fn failed(&mut self, err: &io::Error, what: &str) -> Completion {
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
    if let Err(err) = guest::write_obj(mem, completion.status, status_addr) {
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
}
