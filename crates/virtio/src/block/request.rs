//! A virtio-blk request (virtio 1.2, section 5.2.6), parsed out of a descriptor chain.
//!
//! A request is laid out as
//!
//! ```text
//! struct virtio_blk_req {
//!     le32 type;
//!     le32 reserved;
//!     le64 sector;
//!     u8 data[];
//!     u8 status;
//! };
//! ```
//!
//! The 16-byte header opens the device-readable part of the chain and the status byte is the last
//! byte of the device-writable part; the data of a write, a discard or a write zeroes follows the
//! header in the readable part, the data of a read or a GET_ID precedes the status in the writable
//! part. With VIRTIO_F_VERSION_1 the driver may lay these out over descriptors any way it likes:
//! the header may share a descriptor with data, and the status byte may end a data buffer.
//!
//! [`Request::parse`] is a pure function of the chain, guest memory and the disk's capacity: it
//! reads the header (and the discard or write zeroes segment) once, checks every length and
//! sector against the device's limits with checked arithmetic, and touches neither the disk nor
//! the used ring. A fuzz target can call it on any chain the mock driver builds.
//! [`Disk::execute`](super::Disk::execute) carries a parsed request out against the backend.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{GuestAddress, GuestMemory};

use super::{
    MAX_DATA_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG, SECTOR_SIZE, SEG_MAX,
};
use crate::guest;
use crate::queue::{self, DescriptorChain, Pieces};

/// Length in bytes of the request header: type, reserved, sector.
pub const HEADER_LEN: u32 = 16;
/// Length in bytes of one discard or write zeroes segment.
pub const SEGMENT_LEN: u32 = 16;

// The status codes fit in the status byte; the bindings publish them as u32.
/// Status byte: the request succeeded.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed, or the driver sent a malformed request.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the device does not support the request.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// One range of a discard or write zeroes request (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector of the range.
    pub sector: u64,
    /// Number of sectors in the range.
    pub num_sectors: u32,
    /// Whether the driver allows the device to deallocate the range (write zeroes only).
    pub unmap: bool,
}

/// What a request asks of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestType {
    /// Read `len` bytes from `sector` into the writable data buffers (VIRTIO_BLK_T_IN).
    In {
        /// First sector to read.
        sector: u64,
        /// Bytes to read, a multiple of the sector size.
        len: u32,
    },
    /// Write the `len` bytes of the readable data buffers at `sector` (VIRTIO_BLK_T_OUT).
    Out {
        /// First sector to write.
        sector: u64,
        /// Bytes to write, a multiple of the sector size.
        len: u32,
    },
    /// Make the writes completed so far durable (VIRTIO_BLK_T_FLUSH).
    Flush,
    /// Write the device ID string into the `len` bytes of writable data buffers
    /// (VIRTIO_BLK_T_GET_ID).
    GetId {
        /// Bytes of writable data the driver provided.
        len: u32,
    },
    /// Deallocate a range (VIRTIO_BLK_T_DISCARD).
    Discard(Segment),
    /// Make a range read back as zeroes (VIRTIO_BLK_T_WRITE_ZEROES).
    WriteZeroes(Segment),
}

/// Why a chain is not a request the device can carry out.
///
/// Every variant but [`RequestError::NoStatus`] completes the request with the status byte
/// [`RequestError::status`] gives.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The chain has no device-writable byte to hold the status.
    #[error("The request has no device-writable status byte")]
    NoStatus,
    /// The device-readable part is shorter than the request header.
    #[error("The request's device-readable part of {len} bytes is shorter than its header")]
    HeaderTooShort {
        /// Length of the device-readable part.
        len: u32,
    },
    /// The request type is not one the device carries out.
    #[error("The request type {0} is not supported")]
    UnsupportedType(u32),
    /// The data of a read or write is not a whole number of sectors.
    #[error("The request's data of {len} bytes is not a multiple of 512 bytes")]
    DataNotSectorMultiple {
        /// Length of the data.
        len: u32,
    },
    /// The data of a read or write is longer than the device takes in one request.
    #[error("The request's data of {len} bytes is longer than the limit of {MAX_DATA_LEN} bytes")]
    DataTooLong {
        /// Length of the data.
        len: u32,
    },
    /// The data of a read or write is spread over more buffers than `seg_max`.
    #[error("The request's data is in {count} buffers, more than the limit of {SEG_MAX}")]
    TooManyDataSegments {
        /// Number of data buffers.
        count: usize,
    },
    /// The sectors the request covers do not all lie on the disk.
    #[error("The request's {sectors} sectors from sector {sector} do not fit on the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
    /// A discard or write zeroes request's segments are not a non-empty array of 16-byte
    /// segments.
    #[error("The request's segment table of {len} bytes is not a non-zero multiple of 16 bytes")]
    InvalidSegmentTable {
        /// Length of the segment table.
        len: u32,
    },
    /// A discard or write zeroes request has more segments than the device advertised.
    #[error("The request has {count} segments, more than the limit of {max}")]
    TooManySegments {
        /// Number of segments.
        count: u32,
        /// The advertised limit.
        max: u32,
    },
    /// A discard or write zeroes segment is longer than the device advertised.
    #[error("The request's segment of {num_sectors} sectors is longer than the limit of {max}")]
    SegmentTooLong {
        /// Sectors in the segment.
        num_sectors: u32,
        /// The advertised limit.
        max: u32,
    },
    /// A discard or write zeroes segment has flags the device does not support: unknown ones,
    /// or UNMAP on a discard.
    #[error("The request's segment flags {flags:#x} are not supported")]
    UnsupportedFlags {
        /// The segment's flags.
        flags: u32,
    },
    /// The request could not be read from guest memory.
    #[error("Cannot read the request from guest memory")]
    GuestMemory(#[source] queue::Error),
}

impl RequestError {
    /// The status byte the request completes with, or `None` where there is no status byte to
    /// write ([`RequestError::NoStatus`]).
    pub fn status(&self) -> Option<u8> {
        match self {
            RequestError::NoStatus => None,
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags { .. } => {
                Some(STATUS_UNSUPP)
            }
            _ => Some(STATUS_IOERR),
        }
    }
}

/// Where the status byte of `chain` lies: the last byte of its device-writable part, or `None`
/// if it has no device-writable byte.
pub fn status_addr(chain: &DescriptorChain) -> Option<GuestAddress> {
    let offset = chain.writable_len().checked_sub(1)?;
    chain.writable_range(offset, 1).next().map(|desc| desc.addr)
}

/// A request, validated, with the chain it came from.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    chain: &'a DescriptorChain,
    request_type: RequestType,
    status: GuestAddress,
}

impl<'a> Request<'a> {
    /// Parses the request in `chain` for a disk of `capacity` sectors.
    ///
    /// Reads the header, and the segment of a discard or write zeroes, from guest memory once.
    /// Checks that reads and writes are a whole number of sectors, at most
    /// [`MAX_DATA_LEN`] bytes in at most [`SEG_MAX`]
    /// buffers, and inside the disk; that discards and write zeroes hold one segment inside the
    /// disk and within the advertised maximum of sectors, with supported flags. Data the request
    /// type does not use (readable bytes after the header of a read, say) is ignored.
    ///
    /// # Errors
    ///
    /// A [`RequestError`] that says what is wrong; [`RequestError::status`] gives the status
    /// byte to complete the request with.
    pub fn parse<M: GuestMemory + ?Sized>(
        chain: &'a DescriptorChain,
        mem: &M,
        capacity: u64,
    ) -> Result<Self, RequestError> {
        let status = status_addr(chain).ok_or(RequestError::NoStatus)?;
        let readable_len = chain.readable_len();
        let readable_data = readable_len
            .checked_sub(HEADER_LEN)
            .ok_or(RequestError::HeaderTooShort { len: readable_len })?;
        // Cannot underflow: a status byte was found.
        let writable_data = chain.writable_len().saturating_sub(1);

        let (type_, sector) = read_header(chain, mem)?;

        let request_type = match type_ {
            VIRTIO_BLK_T_IN => RequestType::In {
                sector,
                len: writable_data,
            },
            VIRTIO_BLK_T_OUT => RequestType::Out {
                sector,
                len: readable_data,
            },
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId { len: writable_data },
            VIRTIO_BLK_T_DISCARD => RequestType::Discard(Self::segment(
                chain,
                mem,
                readable_data,
                MAX_DISCARD_SEG,
                MAX_DISCARD_SECTORS,
                false,
                capacity,
            )?),
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes(Self::segment(
                chain,
                mem,
                readable_data,
                MAX_WRITE_ZEROES_SEG,
                MAX_WRITE_ZEROES_SECTORS,
                true,
                capacity,
            )?),
            other => return Err(RequestError::UnsupportedType(other)),
        };
        let request = Request {
            chain,
            request_type,
            status,
        };
        if let RequestType::In { sector, len } | RequestType::Out { sector, len } = request_type {
            request.check_data(sector, len, capacity)?;
        }
        Ok(request)
    }

    /// Checks the data of a read or write.
    fn check_data(&self, sector: u64, len: u32, capacity: u64) -> Result<(), RequestError> {
        if u64::from(len) % SECTOR_SIZE != 0 {
            return Err(RequestError::DataNotSectorMultiple { len });
        }
        if len > MAX_DATA_LEN {
            return Err(RequestError::DataTooLong { len });
        }
        let count = self.data().count();
        if count > usize::try_from(SEG_MAX).unwrap_or(usize::MAX) {
            return Err(RequestError::TooManyDataSegments { count });
        }
        check_range(sector, u64::from(len) / SECTOR_SIZE, capacity)
    }

    /// Reads and checks the one segment of a discard or write zeroes request.
    fn segment<M: GuestMemory + ?Sized>(
        chain: &DescriptorChain,
        mem: &M,
        table_len: u32,
        max_seg: u32,
        max_sectors: u32,
        unmap_allowed: bool,
        capacity: u64,
    ) -> Result<Segment, RequestError> {
        if table_len == 0 || table_len % SEGMENT_LEN != 0 {
            return Err(RequestError::InvalidSegmentTable { len: table_len });
        }
        let count = table_len / SEGMENT_LEN;
        if count > max_seg {
            return Err(RequestError::TooManySegments {
                count,
                max: max_seg,
            });
        }
        let mut raw = [0u8; SEGMENT_LEN as usize];
        let read = chain
            .read_at(mem, HEADER_LEN, &mut raw)
            .map_err(RequestError::GuestMemory)?;
        if read != raw.len() {
            return Err(RequestError::InvalidSegmentTable { len: table_len });
        }
        let [
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            n0,
            n1,
            n2,
            n3,
            f0,
            f1,
            f2,
            f3,
        ] = raw;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);

        // Unknown flags, and UNMAP on a discard, complete with UNSUPP (virtio 1.2, 5.2.6.2).
        let known = if unmap_allowed {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !known != 0 {
            return Err(RequestError::UnsupportedFlags { flags });
        }
        if num_sectors > max_sectors {
            return Err(RequestError::SegmentTooLong {
                num_sectors,
                max: max_sectors,
            });
        }
        check_range(sector, u64::from(num_sectors), capacity)?;
        Ok(Segment {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        })
    }

    /// The chain the request came from.
    pub fn chain(&self) -> &'a DescriptorChain {
        self.chain
    }

    /// What the request asks of the disk.
    pub fn request_type(&self) -> RequestType {
        self.request_type
    }

    /// Guest physical address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// The buffers that hold the request's data, in order: the writable ones before the status
    /// of a read or a GET_ID, the readable ones after the header of a write; none for other
    /// types.
    pub fn data(&self) -> Pieces<'a> {
        match self.request_type {
            RequestType::In { len, .. } | RequestType::GetId { len } => {
                self.chain.writable_range(0, len)
            }
            RequestType::Out { len, .. } => self.chain.readable_range(HEADER_LEN, len),
            RequestType::Flush | RequestType::Discard(_) | RequestType::WriteZeroes(_) => {
                self.chain.readable_range(HEADER_LEN, 0)
            }
        }
    }
}

/// Reads the request header's type and sector: straight from the first descriptor where it
/// holds the whole header, as drivers lay it out, else piece by piece from the chain.
fn read_header<M: GuestMemory + ?Sized>(
    chain: &DescriptorChain,
    mem: &M,
) -> Result<(u32, u64), RequestError> {
    if let Some(first) = chain.readable().next() {
        // Two loads: the header is two little-endian words, the type (and a reserved field)
        // then the sector.
        if first.len >= HEADER_LEN {
            if let Ok([head, sector]) = guest::read_obj::<[u64; 2], _>(mem, first.addr) {
                let [t0, t1, t2, t3, ..] = u64::from_le(head).to_le_bytes();
                return Ok((u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le(sector)));
            }
        }
    }
    let mut header = [0u8; HEADER_LEN as usize];
    let read = chain
        .read_at(mem, 0, &mut header)
        .map_err(RequestError::GuestMemory)?;
    if read != header.len() {
        return Err(RequestError::HeaderTooShort {
            len: chain.readable_len(),
        });
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    Ok((
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    ))
}

/// Checks that `sectors` sectors from `sector` lie on a disk of `capacity` sectors.
fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, sectors }),
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;
    use crate::mock::{MockBuffer, MockDriver, guest_memory};
    use crate::queue::Descriptor;

    const CAPACITY: u64 = 64;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const SEG: u64 = 0x40000;

    struct Guest {
        mem: GuestMemoryMmap<()>,
        driver: MockDriver,
        queue: crate::queue::Queue,
    }

    impl Guest {
        fn new() -> Self {
            let mem = guest_memory(0x100000).unwrap();
            let driver = MockDriver::new(256, GuestAddress(0));
            let queue = driver.queue();
            Guest { mem, driver, queue }
        }

        fn header(&self, type_: u32, sector: u64) {
            self.write_header_at(HDR, type_, sector);
        }

        fn write_header_at(&self, addr: u64, type_: u32, sector: u64) {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&type_.to_le_bytes());
            bytes[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        }

        fn segment(&self, sector: u64, num_sectors: u32, flags: u32) {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&sector.to_le_bytes());
            bytes[8..12].copy_from_slice(&num_sectors.to_le_bytes());
            bytes[12..].copy_from_slice(&flags.to_le_bytes());
            self.mem.write_slice(&bytes, GuestAddress(SEG)).unwrap();
        }

        fn chain(&mut self, buffers: &[MockBuffer]) -> DescriptorChain {
            self.driver.add_chain(&self.mem, buffers).unwrap();
            self.queue.pop(&self.mem).unwrap().unwrap()
        }

        fn parse(&mut self, buffers: &[MockBuffer]) -> Result<RequestType, RequestError> {
            let chain = self.chain(buffers);
            Request::parse(&chain, &self.mem, CAPACITY).map(|r| r.request_type())
        }
    }

    fn hdr() -> MockBuffer {
        MockBuffer::readable(HDR, 16)
    }

    fn status() -> MockBuffer {
        MockBuffer::writable(STATUS, 1)
    }

    #[test]
    fn a_read_takes_its_data_from_the_writable_part_before_the_status() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_IN, 3);
        let chain = g.chain(&[hdr(), MockBuffer::writable(DATA, 1024), status()]);
        let request = Request::parse(&chain, &g.mem, CAPACITY).unwrap();
        assert_eq!(
            request.request_type(),
            RequestType::In {
                sector: 3,
                len: 1024
            }
        );
        assert_eq!(request.status_addr(), GuestAddress(STATUS));
        let data: Vec<Descriptor> = request.data().collect();
        assert_eq!(data.len(), 1);
        assert_eq!((data[0].addr, data[0].len), (GuestAddress(DATA), 1024));
    }

    #[test]
    fn the_header_data_and_status_may_share_descriptors() {
        let mut g = Guest::new();
        // Header and data in one readable buffer, the status at the end of a writable one.
        g.header(VIRTIO_BLK_T_OUT, 1);
        let chain = g.chain(&[
            MockBuffer::readable(HDR, 16 + 512),
            MockBuffer::writable(STATUS - 7, 8),
        ]);
        let request = Request::parse(&chain, &g.mem, CAPACITY).unwrap();
        assert_eq!(
            request.request_type(),
            RequestType::Out {
                sector: 1,
                len: 512
            }
        );
        assert_eq!(request.status_addr(), GuestAddress(STATUS));
        let data: Vec<Descriptor> = request.data().collect();
        assert_eq!((data[0].addr, data[0].len), (GuestAddress(HDR + 16), 512));
    }

    #[test]
    fn a_header_split_over_descriptors_is_read_whole() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_IN, 5);
        // The first 4 bytes at HDR, the other 12 elsewhere.
        let mut rest = [0u8; 12];
        g.mem.read_slice(&mut rest, GuestAddress(HDR + 4)).unwrap();
        g.mem.write_slice(&rest, GuestAddress(SEG)).unwrap();
        let parsed = g.parse(&[
            MockBuffer::readable(HDR, 4),
            MockBuffer::readable(SEG, 12),
            MockBuffer::writable(DATA, 512),
            status(),
        ]);
        assert_eq!(
            parsed.unwrap(),
            RequestType::In {
                sector: 5,
                len: 512
            }
        );
    }

    #[test]
    fn a_chain_without_a_writable_byte_has_no_status() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_FLUSH, 0);
        // The "status" byte is in a readable descriptor.
        let err = g
            .parse(&[hdr(), MockBuffer::readable(STATUS, 1)])
            .unwrap_err();
        assert!(matches!(err, RequestError::NoStatus));
        assert_eq!(err.status(), None);
    }

    #[test]
    fn a_short_header_is_an_io_error() {
        let mut g = Guest::new();
        let err = g
            .parse(&[MockBuffer::readable(HDR, 15), status()])
            .unwrap_err();
        assert!(matches!(err, RequestError::HeaderTooShort { len: 15 }));
        assert_eq!(err.status(), Some(STATUS_IOERR));
    }

    #[test]
    fn an_unknown_type_is_unsupported() {
        let mut g = Guest::new();
        g.header(0x42, 0);
        let err = g.parse(&[hdr(), status()]).unwrap_err();
        assert!(matches!(err, RequestError::UnsupportedType(0x42)));
        assert_eq!(err.status(), Some(STATUS_UNSUPP));
    }

    #[test]
    fn data_must_be_whole_sectors() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_IN, 0);
        let err = g
            .parse(&[hdr(), MockBuffer::writable(DATA, 513), status()])
            .unwrap_err();
        assert!(matches!(
            err,
            RequestError::DataNotSectorMultiple { len: 513 }
        ));
        assert_eq!(err.status(), Some(STATUS_IOERR));
    }

    #[test]
    fn data_must_end_on_the_disk() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_OUT, CAPACITY - 1);
        let err = g
            .parse(&[hdr(), MockBuffer::readable(DATA, 1024), status()])
            .unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { sectors: 2, .. }));
        // The last sector itself is fine, and so is an empty read at the very end.
        g.header(VIRTIO_BLK_T_OUT, CAPACITY - 1);
        assert!(
            g.parse(&[hdr(), MockBuffer::readable(DATA, 512), status()])
                .is_ok()
        );
        g.header(VIRTIO_BLK_T_IN, CAPACITY);
        assert!(g.parse(&[hdr(), status()]).is_ok());
    }

    #[test]
    fn a_sector_near_u64_max_does_not_wrap_around() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_IN, u64::MAX);
        let err = g
            .parse(&[hdr(), MockBuffer::writable(DATA, 512), status()])
            .unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { .. }));
    }

    #[test]
    fn data_in_more_than_seg_max_buffers_is_refused() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_IN, 0);
        let mut buffers = vec![hdr()];
        // One sector in each of SEG_MAX + 1 buffers, the last of which also holds the status,
        // so that the chain is no longer than the queue.
        for i in 0..SEG_MAX {
            buffers.push(MockBuffer::writable(DATA + 512 * u64::from(i), 512));
        }
        buffers.push(MockBuffer::writable(DATA + 512 * u64::from(SEG_MAX), 513));
        let table = GuestAddress(0x80000);
        g.driver
            .add_indirect_chain(&g.mem, table, &buffers)
            .unwrap();
        let chain = g.queue.pop(&g.mem).unwrap().unwrap();
        let err = Request::parse(&chain, &g.mem, 1 << 20).unwrap_err();
        assert!(matches!(
            err,
            RequestError::TooManyDataSegments { count: 255 }
        ));
        assert_eq!(err.status(), Some(STATUS_IOERR));
    }

    #[test]
    fn data_longer_than_the_request_limit_is_refused() {
        let mut g = Guest::new();
        let mem = guest_memory(0x100000 + usize::try_from(MAX_DATA_LEN).unwrap() + 512).unwrap();
        g.mem = mem;
        g.header(VIRTIO_BLK_T_IN, 0);
        let err = g
            .parse(&[
                hdr(),
                MockBuffer::writable(0x100000, MAX_DATA_LEN + 512),
                status(),
            ])
            .unwrap_err();
        assert!(matches!(err, RequestError::DataTooLong { .. }));
    }

    #[test]
    fn a_discard_holds_one_segment_on_the_disk() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_DISCARD, 0);
        g.segment(8, 16, 0);
        let seg = MockBuffer::readable(SEG, 16);
        assert_eq!(
            g.parse(&[hdr(), seg, status()]).unwrap(),
            RequestType::Discard(Segment {
                sector: 8,
                num_sectors: 16,
                unmap: false
            })
        );
        // Past the end.
        g.segment(CAPACITY - 1, 2, 0);
        let err = g.parse(&[hdr(), seg, status()]).unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { .. }));
        // Two segments.
        let err = g
            .parse(&[hdr(), MockBuffer::readable(SEG, 32), status()])
            .unwrap_err();
        assert!(matches!(
            err,
            RequestError::TooManySegments { count: 2, max: 1 }
        ));
        // No segment, or a piece of one.
        for len in [0, 8] {
            let err = g
                .parse(&[hdr(), MockBuffer::readable(SEG, len), status()])
                .unwrap_err();
            assert!(matches!(err, RequestError::InvalidSegmentTable { .. }));
            assert_eq!(err.status(), Some(STATUS_IOERR));
        }
    }

    #[test]
    fn a_segment_longer_than_the_advertised_maximum_is_refused() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        g.segment(0, MAX_WRITE_ZEROES_SECTORS + 1, 0);
        let err = g
            .parse(&[hdr(), MockBuffer::readable(SEG, 16), status()])
            .unwrap_err();
        assert!(matches!(err, RequestError::SegmentTooLong { .. }));
        assert_eq!(err.status(), Some(STATUS_IOERR));
    }

    #[test]
    fn unmap_is_unsupported_on_a_discard_but_allowed_on_write_zeroes() {
        let mut g = Guest::new();
        let seg = MockBuffer::readable(SEG, 16);
        g.segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        g.header(VIRTIO_BLK_T_DISCARD, 0);
        let err = g.parse(&[hdr(), seg, status()]).unwrap_err();
        assert!(matches!(err, RequestError::UnsupportedFlags { flags: 1 }));
        assert_eq!(err.status(), Some(STATUS_UNSUPP));
        g.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(
            g.parse(&[hdr(), seg, status()]).unwrap(),
            RequestType::WriteZeroes(Segment {
                sector: 0,
                num_sectors: 8,
                unmap: true
            })
        );
        // Unknown flags.
        g.segment(0, 8, 0x2);
        let err = g.parse(&[hdr(), seg, status()]).unwrap_err();
        assert_eq!(err.status(), Some(STATUS_UNSUPP));
    }

    #[test]
    fn get_id_and_flush_need_no_sector() {
        let mut g = Guest::new();
        g.header(VIRTIO_BLK_T_GET_ID, u64::MAX);
        assert_eq!(
            g.parse(&[hdr(), MockBuffer::writable(DATA, 20), status()])
                .unwrap(),
            RequestType::GetId { len: 20 }
        );
        g.header(VIRTIO_BLK_T_FLUSH, u64::MAX);
        assert_eq!(g.parse(&[hdr(), status()]).unwrap(), RequestType::Flush);
    }
}
