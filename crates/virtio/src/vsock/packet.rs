//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2, 5.10.6), and how a
//! packet is read from the chain the guest transmits and written into one it hands over for
//! receiving.
//!
//! A packet is a 44-byte little-endian header followed by `len` bytes of payload. The header
//! may span descriptors; it is read from guest memory once, into a [`PacketHeader`], and every
//! later decision uses that copy. `len` is trusted only as far as the chain's buffers hold it
//! and never past [`MAX_PKT_BUF_SIZE`].

use vm_memory::GuestMemory;

use crate::queue::{self, DescriptorChain};

/// The size of the packet header, in bytes.
pub const HDR_SIZE: usize = 44;
/// The most payload one packet carries, either way: 64 KiB, as Firecracker.
pub const MAX_PKT_BUF_SIZE: usize = 64 << 10;

/// Why a chain does not hold a packet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The chain's device-readable part is shorter than a header.
    #[error("The chain's readable buffers hold {0} bytes, fewer than a packet header")]
    HeaderTooShort(u32),
    /// The header says the payload is longer than a packet may carry.
    #[error("The packet header says its payload is {0} bytes, more than 64 KiB")]
    PayloadTooLarge(u32),
    /// The header says the payload is longer than the chain's buffers after the header.
    #[error("The packet header says its payload is {len} bytes, but the chain holds {available}")]
    PayloadPastChain {
        /// The header's `len`.
        len: u32,
        /// The bytes the chain holds after the header.
        available: u32,
    },
    /// The chain's device-writable part is shorter than a header.
    #[error("The chain's writable buffers hold {0} bytes, fewer than a packet header")]
    BufferTooShort(u32),
    /// Guest memory cannot be read or written.
    #[error("Cannot reach the packet in guest memory")]
    GuestMemory(#[source] queue::Error),
}

/// The header of a virtio-vsock packet, as host-endian fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// The sender's context ID.
    pub src_cid: u64,
    /// The receiver's context ID.
    pub dst_cid: u64,
    /// The sender's port.
    pub src_port: u32,
    /// The receiver's port.
    pub dst_port: u32,
    /// The payload's length in bytes.
    pub len: u32,
    /// The socket type ([`super::TYPE_STREAM`]).
    pub type_: u16,
    /// The operation (`super::OP_*`).
    pub op: u16,
    /// Operation flags: for SHUTDOWN, [`super::SHUTDOWN_RCV`] and [`super::SHUTDOWN_SEND`].
    pub flags: u32,
    /// The sender's receive buffer for this connection, in bytes.
    pub buf_alloc: u32,
    /// The bytes the sender has taken out of that buffer since the connection began
    /// (wrapping).
    pub fwd_cnt: u32,
}

/// Reads `N` little-endian bytes of `bytes` at `at`, or zeroes where it is too short.
fn field<const N: usize>(bytes: &[u8; HDR_SIZE], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = at.checked_add(N).and_then(|end| bytes.get(at..end)) {
        out.copy_from_slice(src);
    }
    out
}

impl PacketHeader {
    /// The header whose wire form is `bytes`.
    pub fn from_bytes(bytes: &[u8; HDR_SIZE]) -> Self {
        PacketHeader {
            src_cid: u64::from_le_bytes(field(bytes, 0)),
            dst_cid: u64::from_le_bytes(field(bytes, 8)),
            src_port: u32::from_le_bytes(field(bytes, 16)),
            dst_port: u32::from_le_bytes(field(bytes, 20)),
            len: u32::from_le_bytes(field(bytes, 24)),
            type_: u16::from_le_bytes(field(bytes, 28)),
            op: u16::from_le_bytes(field(bytes, 30)),
            flags: u32::from_le_bytes(field(bytes, 32)),
            buf_alloc: u32::from_le_bytes(field(bytes, 36)),
            fwd_cnt: u32::from_le_bytes(field(bytes, 40)),
        }
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut out = [0u8; HDR_SIZE];
        let parts: [(usize, &[u8]); 10] = [
            (0, &self.src_cid.to_le_bytes()),
            (8, &self.dst_cid.to_le_bytes()),
            (16, &self.src_port.to_le_bytes()),
            (20, &self.dst_port.to_le_bytes()),
            (24, &self.len.to_le_bytes()),
            (28, &self.type_.to_le_bytes()),
            (30, &self.op.to_le_bytes()),
            (32, &self.flags.to_le_bytes()),
            (36, &self.buf_alloc.to_le_bytes()),
            (40, &self.fwd_cnt.to_le_bytes()),
        ];
        for (at, bytes) in parts {
            if let Some(dst) = out.get_mut(at..at.saturating_add(bytes.len())) {
                dst.copy_from_slice(bytes);
            }
        }
        out
    }
}

/// Reads the packet the guest transmits in `chain`: its header, and its payload into the
/// start of `payload` (at least [`MAX_PKT_BUF_SIZE`] long to take any packet). Returns the
/// header and the payload's length.
///
/// # Errors
///
/// [`Error::HeaderTooShort`] when the chain's readable part cannot hold a header; then,
/// with the header read, [`Error::PayloadTooLarge`] or [`Error::PayloadPastChain`] when its
/// `len` is more than a packet carries, than the chain holds or than `payload` holds; and
/// [`Error::GuestMemory`]. The header comes with the error when it was read, so that the
/// connection it names can be reset.
pub fn read_tx<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &DescriptorChain,
    payload: &mut [u8],
) -> std::result::Result<(PacketHeader, usize), (Option<PacketHeader>, Error)> {
    let readable = chain.readable_len();
    let mut bytes = [0u8; HDR_SIZE];
    let header_len = u32::try_from(HDR_SIZE).unwrap_or(u32::MAX);
    if readable < header_len {
        return Err((None, Error::HeaderTooShort(readable)));
    }
    match chain.read_to(mem, &mut bytes) {
        Ok(HDR_SIZE) => {}
        Ok(_) => return Err((None, Error::HeaderTooShort(readable))),
        Err(err) => return Err((None, Error::GuestMemory(err))),
    }
    let header = PacketHeader::from_bytes(&bytes);
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > MAX_PKT_BUF_SIZE || len > payload.len() {
        return Err((Some(header), Error::PayloadTooLarge(header.len)));
    }
    let available = readable.saturating_sub(header_len);
    if header.len > available {
        return Err((
            Some(header),
            Error::PayloadPastChain {
                len: header.len,
                available,
            },
        ));
    }
    let Some(dst) = payload.get_mut(..len) else {
        return Err((Some(header), Error::PayloadTooLarge(header.len)));
    };
    match chain.read_at(mem, header_len, dst) {
        Ok(read) if read == len => Ok((header, len)),
        Ok(read) => Err((
            Some(header),
            Error::PayloadPastChain {
                len: header.len,
                available: u32::try_from(read).unwrap_or(0),
            },
        )),
        Err(err) => Err((Some(header), Error::GuestMemory(err))),
    }
}

/// The most payload the receive chain `chain` takes after a header, capped at
/// [`MAX_PKT_BUF_SIZE`].
///
/// # Errors
///
/// [`Error::BufferTooShort`] when its writable part cannot hold a header.
pub fn rx_capacity(chain: &DescriptorChain) -> std::result::Result<usize, Error> {
    let writable = chain.writable_len();
    let room = usize::try_from(writable)
        .unwrap_or(usize::MAX)
        .checked_sub(HDR_SIZE)
        .ok_or(Error::BufferTooShort(writable))?;
    Ok(room.min(MAX_PKT_BUF_SIZE))
}

/// Writes the packet `header` and `payload` into the receive chain `chain`, whose
/// [`rx_capacity`] must hold the payload; returns the bytes written, header included.
///
/// # Errors
///
/// [`Error::BufferTooShort`] when the chain cannot hold them, [`Error::GuestMemory`].
pub fn write_rx<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &DescriptorChain,
    header: &PacketHeader,
    payload: &[u8],
) -> std::result::Result<usize, Error> {
    let capacity = rx_capacity(chain)?;
    if payload.len() > capacity {
        return Err(Error::BufferTooShort(chain.writable_len()));
    }
    let written = chain
        .write_from(mem, &header.to_bytes())
        .map_err(Error::GuestMemory)?;
    if written != HDR_SIZE {
        return Err(Error::BufferTooShort(chain.writable_len()));
    }
    let header_len = u32::try_from(HDR_SIZE).unwrap_or(u32::MAX);
    let body = chain
        .write_at(mem, header_len, payload)
        .map_err(Error::GuestMemory)?;
    Ok(HDR_SIZE.saturating_add(body))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::mock::{MockBuffer, MockDriver, guest_memory};

    const DATA: u64 = 0x10_0000;

    fn header() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            len: 5,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 7,
        }
    }

    fn setup() -> (Arc<GuestMemoryMmap<()>>, MockDriver, crate::queue::Queue) {
        let mem = Arc::new(guest_memory(0x40_0000).unwrap());
        let driver = MockDriver::new(16, GuestAddress(0));
        let queue = driver.queue();
        (mem, driver, queue)
    }

    #[test]
    fn a_header_reads_back_as_written_little_endian() {
        let bytes = header().to_bytes();
        assert_eq!(bytes[0..8], 3u64.to_le_bytes());
        assert_eq!(bytes[24..28], 5u32.to_le_bytes());
        assert_eq!(bytes[30..32], 5u16.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&bytes), header());
    }

    #[test]
    fn a_header_split_across_descriptors_is_read_with_its_payload() {
        let (mem, mut driver, mut queue) = setup();
        let mut wire = header().to_bytes().to_vec();
        wire.extend_from_slice(b"hello");
        mem.write_slice(&wire[..10], GuestAddress(DATA)).unwrap();
        mem.write_slice(&wire[10..], GuestAddress(DATA + 0x1000))
            .unwrap();
        driver
            .add_chain(
                &*mem,
                &[
                    MockBuffer::readable(DATA, 10),
                    MockBuffer::readable(DATA + 0x1000, 39),
                ],
            )
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        let mut payload = vec![0u8; MAX_PKT_BUF_SIZE];
        let (hdr, len) = read_tx(&*mem, &chain, &mut payload).unwrap();
        assert_eq!(hdr, header());
        assert_eq!(&payload[..len], b"hello");
    }

    #[test]
    fn lengths_the_chain_does_not_back_are_refused() {
        let (mem, mut driver, mut queue) = setup();
        let mut payload = vec![0u8; MAX_PKT_BUF_SIZE];
        // Too short for a header.
        driver
            .add_chain(&*mem, &[MockBuffer::readable(DATA, 43)])
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        let (hdr, err) = read_tx(&*mem, &chain, &mut payload).unwrap_err();
        assert!(hdr.is_none());
        assert!(matches!(err, Error::HeaderTooShort(43)), "{err:?}");
        // A len past the chain's buffers.
        let mut bad = header();
        bad.len = 100;
        mem.write_slice(&bad.to_bytes(), GuestAddress(DATA))
            .unwrap();
        driver
            .add_chain(&*mem, &[MockBuffer::readable(DATA, 44 + 99)])
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        let (hdr, err) = read_tx(&*mem, &chain, &mut payload).unwrap_err();
        assert_eq!(hdr, Some(bad));
        assert!(
            matches!(
                err,
                Error::PayloadPastChain {
                    len: 100,
                    available: 99
                }
            ),
            "{err:?}"
        );
        // A len past 64 KiB, whatever the chain holds.
        bad.len = u32::MAX;
        mem.write_slice(&bad.to_bytes(), GuestAddress(DATA))
            .unwrap();
        driver
            .add_chain(&*mem, &[MockBuffer::readable(DATA, 0x20_0000)])
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        let (_, err) = read_tx(&*mem, &chain, &mut payload).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge(u32::MAX)), "{err:?}");
    }

    #[test]
    fn a_receive_chain_takes_a_header_and_at_most_64_kib() {
        let (mem, mut driver, mut queue) = setup();
        driver
            .add_chain(&*mem, &[MockBuffer::writable(DATA, 43)])
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        assert!(matches!(
            rx_capacity(&chain),
            Err(Error::BufferTooShort(43))
        ));
        driver
            .add_chain(&*mem, &[MockBuffer::writable(DATA, 0x20_0000)])
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        assert_eq!(rx_capacity(&chain).unwrap(), MAX_PKT_BUF_SIZE);
        driver
            .add_chain(
                &*mem,
                &[
                    MockBuffer::writable(DATA, 20),
                    MockBuffer::writable(DATA + 0x100, 30),
                ],
            )
            .unwrap();
        let chain = queue.pop(&*mem).unwrap().unwrap();
        assert_eq!(rx_capacity(&chain).unwrap(), 6);
        assert_eq!(write_rx(&*mem, &chain, &header(), b"hello").unwrap(), 49);
        let mut first = [0u8; 20];
        mem.read_slice(&mut first, GuestAddress(DATA)).unwrap();
        assert_eq!(first[..], header().to_bytes()[..20]);
        let mut rest = [0u8; 29];
        mem.read_slice(&mut rest, GuestAddress(DATA + 0x100))
            .unwrap();
        assert_eq!(rest[24..], *b"hello");
        assert!(write_rx(&*mem, &chain, &header(), b"too long").is_err());
    }
}
