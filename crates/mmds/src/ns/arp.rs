//! ARP for IPv4 over Ethernet (RFC 826): a bounds-checked view over a received packet, and the
//! reply the stack sends to a request for its address.

use std::net::Ipv4Addr;

use super::ethernet::{ETHERTYPE_IPV4, mac_at, u16_at};

/// The length of an ARP packet for IPv4 over Ethernet.
pub const PACKET_LEN: usize = 28;
/// The operation of a request.
pub const OPER_REQUEST: u16 = 1;
/// The operation of a reply.
pub const OPER_REPLY: u16 = 2;
/// The hardware type of Ethernet.
const HTYPE_ETHERNET: u16 = 1;

/// Errors of reading or writing an ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are shorter than an ARP packet for IPv4 over Ethernet.
    #[error("The ARP packet is {0} bytes long, shorter than one for IPv4 over Ethernet")]
    TooShort(usize),
    /// The packet is not for IPv4 over Ethernet.
    #[error(
        "The ARP packet is for hardware type {htype}, protocol {ptype:#06x}, address lengths \
         {hlen} and {plen}, not IPv4 over Ethernet"
    )]
    NotEthernetIpv4 {
        /// The hardware type.
        htype: u16,
        /// The protocol type.
        ptype: u16,
        /// The hardware address length.
        hlen: u8,
        /// The protocol address length.
        plen: u8,
    },
}

/// Result of reading or writing an ARP packet.
pub type Result<T> = std::result::Result<T, Error>;

/// A received ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    bytes: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Reads `bytes` (an Ethernet payload, padding included) as an ARP packet.
    ///
    /// # Errors
    ///
    /// [`Error::TooShort`] or [`Error::NotEthernetIpv4`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < PACKET_LEN {
            return Err(Error::TooShort(bytes.len()));
        }
        let htype = u16_at(bytes, 0);
        let ptype = u16_at(bytes, 2);
        let hlen = bytes.get(4).copied().unwrap_or_default();
        let plen = bytes.get(5).copied().unwrap_or_default();
        if htype != HTYPE_ETHERNET || ptype != ETHERTYPE_IPV4 || hlen != 6 || plen != 4 {
            return Err(Error::NotEthernetIpv4 {
                htype,
                ptype,
                hlen,
                plen,
            });
        }
        Ok(Packet { bytes })
    }

    /// The operation: [`OPER_REQUEST`], [`OPER_REPLY`] or another.
    pub fn operation(&self) -> u16 {
        u16_at(self.bytes, 6)
    }

    /// The sender's hardware address.
    pub fn sender_mac(&self) -> [u8; 6] {
        mac_at(self.bytes, 8)
    }

    /// The sender's protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        ip_at(self.bytes, 14)
    }

    /// The target's protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        ip_at(self.bytes, 24)
    }
}

/// Writes, at the start of `buf`, the reply that says `mac` has `ip` to the host with
/// `target_mac` and `target_ip`, and returns its length.
///
/// # Errors
///
/// [`Error::TooShort`] when `buf` cannot hold the packet.
pub fn write_reply(
    buf: &mut [u8],
    mac: [u8; 6],
    ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Result<usize> {
    let len = buf.len();
    let packet = buf.get_mut(..PACKET_LEN).ok_or(Error::TooShort(len))?;
    packet[0..2].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    packet[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    packet[4] = 6;
    packet[5] = 4;
    packet[6..8].copy_from_slice(&OPER_REPLY.to_be_bytes());
    packet[8..14].copy_from_slice(&mac);
    packet[14..18].copy_from_slice(&ip.octets());
    packet[18..24].copy_from_slice(&target_mac);
    packet[24..28].copy_from_slice(&target_ip.octets());
    Ok(PACKET_LEN)
}

/// The IPv4 address at `offset` in `bytes`, 0.0.0.0 past their end.
fn ip_at(bytes: &[u8], offset: usize) -> Ipv4Addr {
    let mut octets = [0u8; 4];
    if let Some(src) = offset.checked_add(4).and_then(|end| bytes.get(offset..end)) {
        octets.copy_from_slice(src);
    }
    Ipv4Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_reads_back_with_its_addresses() {
        let mut buf = [0u8; 40];
        let mac = [6, 1, 0x23, 0x45, 0x67, 1];
        let ip = Ipv4Addr::new(169, 254, 169, 254);
        let guest_mac = [2, 0, 0, 0, 0, 1];
        let guest_ip = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(
            write_reply(&mut buf, mac, ip, guest_mac, guest_ip),
            Ok(PACKET_LEN)
        );
        let packet = Packet::parse(&buf).unwrap();
        assert_eq!(packet.operation(), OPER_REPLY);
        assert_eq!(packet.sender_mac(), mac);
        assert_eq!(packet.sender_ip(), ip);
        assert_eq!(packet.target_ip(), guest_ip);
        assert_eq!(mac_at(&buf, 18), guest_mac);
    }

    #[test]
    fn short_or_foreign_packets_are_refused() {
        assert_eq!(Packet::parse(&[0u8; 27]), Err(Error::TooShort(27)));
        let mut buf = [0u8; PACKET_LEN];
        write_reply(
            &mut buf,
            [0; 6],
            Ipv4Addr::UNSPECIFIED,
            [0; 6],
            Ipv4Addr::UNSPECIFIED,
        )
        .unwrap();
        buf[5] = 16;
        assert!(matches!(
            Packet::parse(&buf),
            Err(Error::NotEthernetIpv4 { plen: 16, .. })
        ));
        buf[5] = 4;
        buf[1] = 6;
        assert!(matches!(
            Packet::parse(&buf),
            Err(Error::NotEthernetIpv4 { htype: 6, .. })
        ));
        assert_eq!(
            write_reply(
                &mut [0u8; 27],
                [0; 6],
                Ipv4Addr::UNSPECIFIED,
                [0; 6],
                Ipv4Addr::UNSPECIFIED
            ),
            Err(Error::TooShort(27))
        );
    }
}
