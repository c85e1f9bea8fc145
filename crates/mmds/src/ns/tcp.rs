//! TCP segments (RFC 9293): a bounds-checked view over a received segment, with its checksum
//! checked over the IPv4 pseudo header, and a writer for sent ones.
//!
//! Of the options, only the maximum segment size is read and written; the others are skipped.

use std::net::Ipv4Addr;

use super::ethernet::{u16_at, u32_at};
use super::ipv4::{PROTOCOL_TCP, checksum};

/// The length of a TCP header without options.
pub const HEADER_LEN: usize = 20;
/// The length of a TCP header that carries the maximum segment size option.
pub const HEADER_LEN_WITH_MSS: usize = 24;

/// FIN: the sender has no more data.
pub const FIN: u8 = 0x01;
/// SYN: synchronize sequence numbers.
pub const SYN: u8 = 0x02;
/// RST: reset the connection.
pub const RST: u8 = 0x04;
/// PSH: push the data to the application.
pub const PSH: u8 = 0x08;
/// ACK: the acknowledgment number is significant.
pub const ACK: u8 = 0x10;

/// The kind of the end of option list option.
const OPT_END: u8 = 0;
/// The kind of the no-operation option.
const OPT_NOP: u8 = 1;
/// The kind of the maximum segment size option.
const OPT_MSS: u8 = 2;

/// Errors of reading or writing a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are shorter than a TCP header, or than the header length it gives.
    #[error("The TCP segment is {0} bytes long, shorter than its header")]
    TooShort(usize),
    /// The data offset is below the minimum of five words.
    #[error("The TCP data offset is {0} bytes, below the minimum of 20")]
    DataOffset(usize),
    /// The checksum over the segment and its pseudo header is wrong.
    #[error("The TCP checksum is wrong")]
    Checksum,
    /// The options are malformed: an option runs past the header, or the maximum segment size
    /// option has the wrong length.
    #[error("The TCP options are malformed")]
    Options,
    /// A segment to write does not fit in its buffer.
    #[error("A TCP segment of {0} bytes does not fit")]
    NoRoom(usize),
}

/// Result of reading or writing a TCP segment.
pub type Result<T> = std::result::Result<T, Error>;

/// A received TCP segment whose checksum is right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    bytes: &'a [u8],
    header_len: usize,
    mss: Option<u16>,
}

impl<'a> Segment<'a> {
    /// Reads `bytes`, the payload of an IPv4 packet from `source` to `destination`, as a TCP
    /// segment, and checks its checksum and options.
    ///
    /// # Errors
    ///
    /// Any of [`Error`]'s kinds but [`Error::NoRoom`].
    pub fn parse(bytes: &'a [u8], source: Ipv4Addr, destination: Ipv4Addr) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::TooShort(bytes.len()));
        }
        // At most 15 * 4.
        let header_len = usize::from(bytes.get(12).copied().unwrap_or_default() >> 4) * 4;
        if header_len < HEADER_LEN {
            return Err(Error::DataOffset(header_len));
        }
        let options = bytes
            .get(HEADER_LEN..header_len)
            .ok_or(Error::TooShort(bytes.len()))?;
        let len = u16::try_from(bytes.len()).map_err(|_| Error::TooShort(bytes.len()))?;
        if checksum(&[&pseudo_header(source, destination, len), bytes]) != 0 {
            return Err(Error::Checksum);
        }
        let mss = parse_mss(options)?;
        Ok(Segment {
            bytes,
            header_len,
            mss,
        })
    }

    /// The source port.
    pub fn source_port(&self) -> u16 {
        u16_at(self.bytes, 0)
    }

    /// The destination port.
    pub fn destination_port(&self) -> u16 {
        u16_at(self.bytes, 2)
    }

    /// The sequence number.
    pub fn seq(&self) -> u32 {
        u32_at(self.bytes, 4)
    }

    /// The acknowledgment number.
    pub fn ack(&self) -> u32 {
        u32_at(self.bytes, 8)
    }

    /// The flags ([`FIN`], [`SYN`], [`RST`], [`PSH`], [`ACK`] and the others).
    pub fn flags(&self) -> u8 {
        self.bytes.get(13).copied().unwrap_or_default()
    }

    /// Whether all of `flags` are set.
    pub fn has(&self, flags: u8) -> bool {
        self.flags() & flags == flags
    }

    /// The window the sender advertises.
    pub fn window(&self) -> u16 {
        u16_at(self.bytes, 14)
    }

    /// The maximum segment size option, if the segment carries one.
    pub fn mss(&self) -> Option<u16> {
        self.mss
    }

    /// The data.
    pub fn payload(&self) -> &'a [u8] {
        self.bytes.get(self.header_len..).unwrap_or_default()
    }

    /// How much of the sequence space the segment takes: its data, and one each for SYN and
    /// FIN.
    pub fn seq_len(&self) -> u32 {
        // A segment in an IPv4 packet is shorter than 64 KiB.
        let data = u32::try_from(self.payload().len()).unwrap_or(u32::MAX);
        data.saturating_add(u32::from(self.has(SYN)))
            .saturating_add(u32::from(self.has(FIN)))
    }
}

/// The header fields of a segment to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The source port.
    pub source_port: u16,
    /// The destination port.
    pub destination_port: u16,
    /// The sequence number.
    pub seq: u32,
    /// The acknowledgment number.
    pub ack: u32,
    /// The flags.
    pub flags: u8,
    /// The window to advertise.
    pub window: u16,
    /// The maximum segment size to advertise, in a SYN.
    pub mss: Option<u16>,
}

/// Writes at the start of `buf` the segment with `header` and `payload`, sent from `source` to
/// `destination`, with its checksum, and returns its length.
///
/// # Errors
///
/// [`Error::NoRoom`] when `buf` cannot hold it, or it would not fit in an IPv4 packet.
pub fn write_segment(
    buf: &mut [u8],
    source: Ipv4Addr,
    destination: Ipv4Addr,
    header: &Header,
    payload: &[u8],
) -> Result<usize> {
    let header_len = if header.mss.is_some() {
        HEADER_LEN_WITH_MSS
    } else {
        HEADER_LEN
    };
    let total = header_len
        .checked_add(payload.len())
        .ok_or(Error::NoRoom(usize::MAX))?;
    let total16 = u16::try_from(total).map_err(|_| Error::NoRoom(total))?;
    let segment = buf.get_mut(..total).ok_or(Error::NoRoom(total))?;
    let (head, data) = segment.split_at_mut(header_len);
    data.copy_from_slice(payload);
    head[0..2].copy_from_slice(&header.source_port.to_be_bytes());
    head[2..4].copy_from_slice(&header.destination_port.to_be_bytes());
    head[4..8].copy_from_slice(&header.seq.to_be_bytes());
    head[8..12].copy_from_slice(&header.ack.to_be_bytes());
    // The header length in words, in the top four bits: 5 or 6.
    head[12] = if header.mss.is_some() { 6 << 4 } else { 5 << 4 };
    head[13] = header.flags;
    head[14..16].copy_from_slice(&header.window.to_be_bytes());
    head[16..20].copy_from_slice(&[0; 4]);
    if let (Some(mss), Some(option)) = (header.mss, head.get_mut(HEADER_LEN..)) {
        option[0] = OPT_MSS;
        option[1] = 4;
        option[2..4].copy_from_slice(&mss.to_be_bytes());
    }
    let sum = checksum(&[&pseudo_header(source, destination, total16), segment]);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    Ok(total)
}

/// The IPv4 pseudo header of a TCP segment of `len` bytes.
fn pseudo_header(source: Ipv4Addr, destination: Ipv4Addr, len: u16) -> [u8; 12] {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&source.octets());
    pseudo[4..8].copy_from_slice(&destination.octets());
    pseudo[9] = PROTOCOL_TCP;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    pseudo
}

/// The maximum segment size among `options`, if there is one.
fn parse_mss(mut options: &[u8]) -> Result<Option<u16>> {
    let mut mss = None;
    while let Some((&kind, rest)) = options.split_first() {
        match kind {
            OPT_END => break,
            OPT_NOP => options = rest,
            _ => {
                let len = usize::from(*rest.first().ok_or(Error::Options)?);
                if len < 2 {
                    return Err(Error::Options);
                }
                let option = options.get(..len).ok_or(Error::Options)?;
                if kind == OPT_MSS {
                    if len != 4 {
                        return Err(Error::Options);
                    }
                    mss = Some(u16_at(option, 2));
                }
                options = options.get(len..).unwrap_or_default();
            }
        }
    }
    Ok(mss)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn header(flags: u8, mss: Option<u16>) -> Header {
        Header {
            source_port: 40000,
            destination_port: 80,
            seq: 0xffff_fff0,
            ack: 7,
            flags,
            window: 1000,
            mss,
        }
    }

    #[test]
    fn a_written_segment_reads_back_with_a_right_checksum() {
        let mut buf = [0u8; 100];
        let len =
            write_segment(&mut buf, GUEST, MMDS, &header(SYN | ACK, Some(1460)), b"").unwrap();
        assert_eq!(len, HEADER_LEN_WITH_MSS);
        let seg = Segment::parse(&buf[..len], GUEST, MMDS).unwrap();
        assert_eq!(seg.source_port(), 40000);
        assert_eq!(seg.destination_port(), 80);
        assert_eq!(seg.seq(), 0xffff_fff0);
        assert_eq!(seg.ack(), 7);
        assert!(seg.has(SYN | ACK));
        assert!(!seg.has(FIN));
        assert_eq!(seg.window(), 1000);
        assert_eq!(seg.mss(), Some(1460));
        assert_eq!(seg.seq_len(), 1);

        let len = write_segment(&mut buf, GUEST, MMDS, &header(ACK | FIN, None), b"odd").unwrap();
        let seg = Segment::parse(&buf[..len], GUEST, MMDS).unwrap();
        assert_eq!(seg.payload(), b"odd");
        assert_eq!(seg.mss(), None);
        assert_eq!(seg.seq_len(), 4);
    }

    #[test]
    fn the_checksum_covers_the_pseudo_header() {
        let mut buf = [0u8; 100];
        let len = write_segment(&mut buf, GUEST, MMDS, &header(ACK, None), b"data").unwrap();
        assert_eq!(
            Segment::parse(&buf[..len], GUEST, Ipv4Addr::new(169, 254, 169, 253)),
            Err(Error::Checksum)
        );
        buf[len - 1] ^= 0x40;
        assert_eq!(
            Segment::parse(&buf[..len], GUEST, MMDS),
            Err(Error::Checksum)
        );
    }

    #[test]
    fn malformed_headers_and_options_are_refused() {
        assert_eq!(
            Segment::parse(&[0; 19], GUEST, MMDS),
            Err(Error::TooShort(19))
        );
        let mut buf = [0u8; 40];
        write_segment(&mut buf, GUEST, MMDS, &header(ACK, None), b"").unwrap();
        buf[12] = 4 << 4;
        assert_eq!(
            Segment::parse(&buf[..20], GUEST, MMDS),
            Err(Error::DataOffset(16))
        );
        buf[12] = 15 << 4;
        assert_eq!(
            Segment::parse(&buf[..20], GUEST, MMDS),
            Err(Error::TooShort(20))
        );

        assert_eq!(parse_mss(&[OPT_NOP, OPT_MSS, 4, 5, 0xb4]), Ok(Some(1460)));
        assert_eq!(
            parse_mss(&[8, 10, 0, 0, 0, 0, 0, 0, 0, 0, OPT_MSS, 4, 0, 1]),
            Ok(Some(1))
        );
        assert_eq!(parse_mss(&[OPT_END, 0xff]), Ok(None));
        assert_eq!(parse_mss(&[OPT_MSS, 3, 0]), Err(Error::Options));
        assert_eq!(parse_mss(&[OPT_MSS, 4, 0]), Err(Error::Options));
        assert_eq!(parse_mss(&[8]), Err(Error::Options));
        assert_eq!(parse_mss(&[8, 0]), Err(Error::Options));
        assert_eq!(parse_mss(&[8, 1, 0, 0]), Err(Error::Options));
    }

    #[test]
    fn writing_refuses_what_does_not_fit() {
        assert_eq!(
            write_segment(&mut [0u8; 23], GUEST, MMDS, &header(SYN, Some(1)), b""),
            Err(Error::NoRoom(24))
        );
        assert_eq!(
            write_segment(&mut [0u8; 30], GUEST, MMDS, &header(ACK, None), &[0; 11]),
            Err(Error::NoRoom(31))
        );
        let big = vec![0u8; 65536];
        assert_eq!(
            write_segment(&mut vec![0u8; 70000], GUEST, MMDS, &header(ACK, None), &big),
            Err(Error::NoRoom(65556))
        );
    }
}
