//! IPv4 packets (RFC 791): a bounds-checked view over a received packet, with its header
//! checksum checked, a writer for sent ones, and the Internet checksum both use.
//!
//! Fragments are read but never reassembled: the stack drops them, since no metadata client
//! sends a request large enough to be fragmented.

use std::net::Ipv4Addr;

use super::ethernet::u16_at;

/// The length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;
/// The protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;
/// The time to live of sent packets.
const TTL: u8 = 64;
/// The "don't fragment" flag, in the flags and fragment offset field.
const DONT_FRAGMENT: u16 = 0x4000;
/// The "more fragments" flag and the fragment offset, in the same field.
const FRAGMENT_MASK: u16 = 0x3fff;

/// Errors of reading or writing an IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are shorter than the header, or than the length the header gives.
    #[error("The IPv4 packet is {0} bytes long, shorter than its header or its total length")]
    TooShort(usize),
    /// The version is not 4.
    #[error("The packet is of IP version {0}, not 4")]
    Version(u8),
    /// The header length field is below the minimum of five words.
    #[error("The IPv4 header length is {0} bytes, below the minimum of 20")]
    HeaderLength(usize),
    /// The total length is shorter than the header.
    #[error("The IPv4 total length of {0} bytes is shorter than the header")]
    TotalLength(usize),
    /// The header checksum is wrong.
    #[error("The IPv4 header checksum is wrong")]
    Checksum,
    /// A packet to write does not fit in its buffer or in an IPv4 packet.
    #[error("An IPv4 packet of {0} bytes does not fit")]
    NoRoom(usize),
}

/// Result of reading or writing an IPv4 packet.
pub type Result<T> = std::result::Result<T, Error>;

/// A received IPv4 packet whose header checksum is right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The packet, without Ethernet padding past its total length.
    bytes: &'a [u8],
    header_len: usize,
}

impl<'a> Packet<'a> {
    /// Reads `bytes` (an Ethernet payload, padding included) as an IPv4 packet and checks its
    /// header checksum.
    ///
    /// # Errors
    ///
    /// Any of [`Error`]'s kinds but [`Error::NoRoom`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let first = *bytes.first().ok_or(Error::TooShort(0))?;
        if bytes.len() < HEADER_LEN {
            return Err(Error::TooShort(bytes.len()));
        }
        let version = first >> 4;
        if version != 4 {
            return Err(Error::Version(version));
        }
        // At most 15 * 4.
        let header_len = usize::from(first & 0x0f) * 4;
        if header_len < HEADER_LEN {
            return Err(Error::HeaderLength(header_len));
        }
        let total_len = usize::from(u16_at(bytes, 2));
        if total_len < header_len {
            return Err(Error::TotalLength(total_len));
        }
        let bytes = bytes.get(..total_len).ok_or(Error::TooShort(bytes.len()))?;
        let header = bytes
            .get(..header_len)
            .ok_or(Error::TooShort(bytes.len()))?;
        if checksum(&[header]) != 0 {
            return Err(Error::Checksum);
        }
        Ok(Packet { bytes, header_len })
    }

    /// The source address.
    pub fn source(&self) -> Ipv4Addr {
        addr_at(self.bytes, 12)
    }

    /// The destination address.
    pub fn destination(&self) -> Ipv4Addr {
        addr_at(self.bytes, 16)
    }

    /// The protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.bytes.get(9).copied().unwrap_or_default()
    }

    /// Whether the packet is a fragment: the "more fragments" flag or an offset.
    pub fn is_fragment(&self) -> bool {
        u16_at(self.bytes, 6) & FRAGMENT_MASK != 0
    }

    /// The payload: what follows the header and its options, up to the total length.
    pub fn payload(&self) -> &'a [u8] {
        self.bytes.get(self.header_len..).unwrap_or_default()
    }
}

/// The destination address of the IPv4 packet `bytes` may hold, read without checking anything
/// else: so that a malformed packet to an address can be told apart from one to another.
pub fn destination_of(bytes: &[u8]) -> Option<Ipv4Addr> {
    (bytes.len() >= HEADER_LEN && bytes.first().is_some_and(|b| b >> 4 == 4))
        .then(|| addr_at(bytes, 16))
}

/// Writes an IPv4 header without options at the start of `buf`, for a payload of
/// `payload_len` bytes, with its checksum, and returns its length.
///
/// # Errors
///
/// [`Error::NoRoom`] when `buf` cannot hold the header, or the packet would be longer than
/// 65535 bytes.
pub fn write_header(
    buf: &mut [u8],
    source: Ipv4Addr,
    destination: Ipv4Addr,
    protocol: u8,
    identification: u16,
    payload_len: usize,
) -> Result<usize> {
    let total = payload_len
        .checked_add(HEADER_LEN)
        .ok_or(Error::NoRoom(payload_len))?;
    let total16 = u16::try_from(total).map_err(|_| Error::NoRoom(total))?;
    let len = buf.len();
    let header = buf.get_mut(..HEADER_LEN).ok_or(Error::NoRoom(len))?;
    header[0] = 0x45;
    header[1] = 0;
    header[2..4].copy_from_slice(&total16.to_be_bytes());
    header[4..6].copy_from_slice(&identification.to_be_bytes());
    header[6..8].copy_from_slice(&DONT_FRAGMENT.to_be_bytes());
    header[8] = TTL;
    header[9] = protocol;
    header[10..12].copy_from_slice(&[0, 0]);
    header[12..16].copy_from_slice(&source.octets());
    header[16..20].copy_from_slice(&destination.octets());
    let sum = checksum(&[header]);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    Ok(HEADER_LEN)
}

/// The Internet checksum (RFC 1071) of `parts` laid end to end, each of even length but the
/// last: the one's complement of the one's complement sum of their 16-bit words. Over bytes
/// that hold their own checksum, it is 0 when that checksum is right.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for word in &mut words {
            sum = fold(sum) + u64::from(u16::from_be_bytes([word[0], word[1]]));
        }
        if let [last] = words.remainder() {
            sum = fold(sum) + u64::from(u16::from_be_bytes([*last, 0]));
        }
    }
    let sum = fold(fold(fold(sum)));
    // Three folds leave at most 16 bits of a 33-bit sum.
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

/// Adds the carries above bit 16 of `sum` back into its low bits; a sum of at most 32 bits
/// stays at most 17 bits long, so that adding a word never overflows.
fn fold(sum: u64) -> u64 {
    (sum & 0xffff) + (sum >> 16)
}

/// The IPv4 address at `offset` in `bytes`, 0.0.0.0 past their end.
fn addr_at(bytes: &[u8], offset: usize) -> Ipv4Addr {
    let mut octets = [0u8; 4];
    if let Some(src) = offset.checked_add(4).and_then(|end| bytes.get(offset..end)) {
        octets.copy_from_slice(src);
    }
    Ipv4Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        write_header(
            &mut buf,
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(169, 254, 169, 254),
            PROTOCOL_TCP,
            7,
            payload.len(),
        )
        .unwrap();
        buf[HEADER_LEN..].copy_from_slice(payload);
        buf
    }

    #[test]
    fn a_written_packet_reads_back_with_a_right_checksum() {
        let mut bytes = packet(b"hello");
        // Ethernet padding past the total length is not payload.
        bytes.extend_from_slice(&[0; 20]);
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.source(), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(p.destination(), Ipv4Addr::new(169, 254, 169, 254));
        assert_eq!(p.protocol(), PROTOCOL_TCP);
        assert_eq!(p.payload(), b"hello");
        assert!(!p.is_fragment());
        assert_eq!(
            destination_of(&bytes),
            Some(Ipv4Addr::new(169, 254, 169, 254))
        );
    }

    #[test]
    fn options_are_skipped() {
        let mut bytes = packet(b"");
        bytes.splice(HEADER_LEN..HEADER_LEN, [1u8, 1, 1, 0]);
        bytes.extend_from_slice(b"data");
        bytes[0] = 0x46;
        bytes[2..4].copy_from_slice(&28u16.to_be_bytes());
        bytes[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&[&bytes[..24]]);
        bytes[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(Packet::parse(&bytes).unwrap().payload(), b"data");
    }

    #[test]
    fn malformed_packets_are_refused() {
        let good = packet(b"abcd");
        assert_eq!(Packet::parse(&[]), Err(Error::TooShort(0)));
        assert_eq!(Packet::parse(&good[..19]), Err(Error::TooShort(19)));
        let mut bad = good.clone();
        bad[0] = 0x65;
        assert_eq!(Packet::parse(&bad), Err(Error::Version(6)));
        bad[0] = 0x44;
        assert_eq!(Packet::parse(&bad), Err(Error::HeaderLength(16)));
        bad[0] = 0x4f;
        assert_eq!(Packet::parse(&bad), Err(Error::TotalLength(24)));
        let mut bad = good.clone();
        bad[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(Packet::parse(&bad), Err(Error::TotalLength(10)));
        bad[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(Packet::parse(&bad), Err(Error::TooShort(24)));
        let mut bad = good.clone();
        bad[8] ^= 1;
        assert_eq!(Packet::parse(&bad), Err(Error::Checksum));
        assert_eq!(destination_of(&good[..19]), None);
    }

    #[test]
    fn fragments_are_recognised() {
        let mut bytes = packet(b"x");
        bytes[6] = 0x20;
        bytes[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&[&bytes[..20]]);
        bytes[10..12].copy_from_slice(&sum.to_be_bytes());
        assert!(Packet::parse(&bytes).unwrap().is_fragment());
    }

    #[test]
    fn writing_refuses_what_does_not_fit() {
        let any = Ipv4Addr::UNSPECIFIED;
        assert_eq!(
            write_header(&mut [0u8; 19], any, any, PROTOCOL_TCP, 0, 0),
            Err(Error::NoRoom(19))
        );
        assert_eq!(
            write_header(&mut [0u8; 20], any, any, PROTOCOL_TCP, 0, 65516),
            Err(Error::NoRoom(65536))
        );
        assert_eq!(
            write_header(&mut [0u8; 20], any, any, PROTOCOL_TCP, 0, usize::MAX),
            Err(Error::NoRoom(usize::MAX))
        );
    }

    #[test]
    fn the_checksum_handles_odd_lengths_and_carries() {
        // RFC 1071's example.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        assert_eq!(checksum(&[&[0xff]]), !0xff00);
        assert_eq!(checksum(&[&[0xff, 0xff], &[0xff, 0xff]]), 0);
        assert_eq!(checksum(&[]), 0xffff);
    }
}
