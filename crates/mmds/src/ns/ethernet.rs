//! Ethernet II frames: a bounds-checked view over received bytes and a writer for sent ones.
//!
//! Only untagged frames are understood: a VLAN tag (ethertype 0x8100) reads as an unknown
//! ethertype, so such frames are never the stack's.

/// The length of an Ethernet header: destination and source MAC, ethertype.
pub const HEADER_LEN: usize = 14;
/// The ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// The ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// Errors of reading or writing an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are shorter than an Ethernet header.
    #[error("The frame is {0} bytes long, shorter than an Ethernet header")]
    TooShort(usize),
}

/// Result of reading or writing an Ethernet frame.
pub type Result<T> = std::result::Result<T, Error>;

/// A received Ethernet frame: its header fields and payload, read from the bytes it lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    bytes: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Reads `bytes` as an Ethernet frame.
    ///
    /// # Errors
    ///
    /// [`Error::TooShort`] when `bytes` cannot hold a header.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::TooShort(bytes.len()));
        }
        Ok(Frame { bytes })
    }

    /// The destination MAC address.
    pub fn destination(&self) -> [u8; 6] {
        mac_at(self.bytes, 0)
    }

    /// The source MAC address.
    pub fn source(&self) -> [u8; 6] {
        mac_at(self.bytes, 6)
    }

    /// The ethertype.
    pub fn ethertype(&self) -> u16 {
        u16_at(self.bytes, 12)
    }

    /// What follows the header, Ethernet padding included.
    pub fn payload(&self) -> &'a [u8] {
        self.bytes.get(HEADER_LEN..).unwrap_or_default()
    }
}

/// Writes an Ethernet header at the start of `buf` and returns its length.
///
/// # Errors
///
/// [`Error::TooShort`] when `buf` cannot hold a header.
pub fn write_header(
    buf: &mut [u8],
    destination: [u8; 6],
    source: [u8; 6],
    ethertype: u16,
) -> Result<usize> {
    let len = buf.len();
    let header = buf.get_mut(..HEADER_LEN).ok_or(Error::TooShort(len))?;
    header[..6].copy_from_slice(&destination);
    header[6..12].copy_from_slice(&source);
    header[12..].copy_from_slice(&ethertype.to_be_bytes());
    Ok(HEADER_LEN)
}

/// The MAC address at `offset` in `bytes`, zeroes past their end.
pub(crate) fn mac_at(bytes: &[u8], offset: usize) -> [u8; 6] {
    let mut mac = [0u8; 6];
    if let Some(src) = offset.checked_add(6).and_then(|end| bytes.get(offset..end)) {
        mac.copy_from_slice(src);
    }
    mac
}

/// The big-endian `u16` at `offset` in `bytes`, 0 past their end.
pub(crate) fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    offset
        .checked_add(2)
        .and_then(|end| bytes.get(offset..end))
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// The big-endian `u32` at `offset` in `bytes`, 0 past their end.
pub(crate) fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    offset
        .checked_add(4)
        .and_then(|end| bytes.get(offset..end))
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_as_written() {
        let mut buf = [0u8; 20];
        let dst = [1, 2, 3, 4, 5, 6];
        let src = [6, 5, 4, 3, 2, 1];
        assert_eq!(
            write_header(&mut buf, dst, src, ETHERTYPE_ARP),
            Ok(HEADER_LEN)
        );
        let frame = Frame::parse(&buf).unwrap();
        assert_eq!(frame.destination(), dst);
        assert_eq!(frame.source(), src);
        assert_eq!(frame.ethertype(), ETHERTYPE_ARP);
        assert_eq!(frame.payload().len(), 6);
    }

    #[test]
    fn bytes_shorter_than_a_header_are_refused() {
        assert_eq!(Frame::parse(&[0u8; 13]), Err(Error::TooShort(13)));
        assert_eq!(Frame::parse(&[]), Err(Error::TooShort(0)));
        assert!(Frame::parse(&[0u8; 14]).unwrap().payload().is_empty());
        let mut small = [0u8; 10];
        assert_eq!(
            write_header(&mut small, [0; 6], [0; 6], ETHERTYPE_IPV4),
            Err(Error::TooShort(10))
        );
    }

    #[test]
    fn field_readers_give_zero_past_the_end() {
        assert_eq!(u16_at(&[1], 0), 0);
        assert_eq!(u32_at(&[1, 2, 3], 0), 0);
        assert_eq!(u32_at(&[1, 2, 3, 4], usize::MAX), 0);
        assert_eq!(mac_at(&[1; 5], 0), [0; 6]);
        assert_eq!(u16_at(&[1, 2], 0), 0x0102);
    }
}
