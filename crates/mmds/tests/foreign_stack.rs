//! ember-mmds's network stack as another VMM uses it: frames built by hand, byte by byte, as a
//! guest's kernel sends them, and the stack's frames read back the same way; nothing of ember
//! but this crate.

use std::net::Ipv4Addr;

use ember_mmds::ns::MmdsNetworkStack;
use ember_mmds::{Handled, RequestHandler};

const STACK_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const STACK_IP: [u8; 4] = [169, 254, 169, 254];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [172, 16, 0, 2];

/// Answers `GET /name` with a body of 3000 bytes once the request's head is whole.
struct Metadata;

impl RequestHandler for Metadata {
    fn handle(&mut self, received: &[u8]) -> Handled {
        let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Handled::Incomplete;
        };
        let body = "m".repeat(3000);
        Handled::Response {
            consumed: end + 4,
            bytes: format!("HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n{body}").into_bytes(),
            close: true,
        }
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame from the guest to the stack carrying a TCP segment.
fn tcp_frame(seq: u32, ack: u32, flags: u8, options: &[u8], data: &[u8]) -> Vec<u8> {
    let tcp_len = 20 + options.len() + data.len();
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&41000u16.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push((((20 + options.len()) / 4) << 4) as u8);
    tcp.push(flags);
    tcp.extend_from_slice(&29200u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(options);
    tcp.extend_from_slice(data);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&GUEST_IP);
    pseudo.extend_from_slice(&STACK_IP);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&STACK_IP);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut frame = Vec::new();
    frame.extend_from_slice(&STACK_MAC);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

/// A segment the stack sent: (seq, ack, flags, data), after checking its frame's addresses and
/// both checksums.
fn read_segment(frame: &[u8]) -> (u32, u32, u8, Vec<u8>) {
    assert_eq!(frame[0..6], GUEST_MAC);
    assert_eq!(frame[6..12], STACK_MAC);
    assert_eq!(frame[12..14], [0x08, 0x00]);
    let ip = &frame[14..];
    assert_eq!(checksum(&ip[..20]), 0, "the IPv4 header checksum is right");
    assert_eq!(ip[12..16], STACK_IP);
    assert_eq!(ip[16..20], GUEST_IP);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(total, frame.len() - 14);
    let tcp = &ip[20..total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&STACK_IP);
    pseudo.extend_from_slice(&GUEST_IP);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(tcp);
    assert_eq!(checksum(&pseudo), 0, "the TCP checksum is right");
    assert_eq!(tcp[0..2], 80u16.to_be_bytes());
    assert_eq!(tcp[2..4], 41000u16.to_be_bytes());
    let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
    let ack = u32::from_be_bytes(tcp[8..12].try_into().unwrap());
    let header_len = usize::from(tcp[12] >> 4) * 4;
    (seq, ack, tcp[13], tcp[header_len..].to_vec())
}

fn next_frame(stack: &mut MmdsNetworkStack) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let len = stack.write_next_frame(&mut buf)?;
    buf.truncate(len);
    Some(buf)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;

#[test]
fn a_guest_resolves_the_address_and_fetches_metadata_over_tcp() {
    let mut stack = MmdsNetworkStack::new(STACK_MAC, Ipv4Addr::from(STACK_IP), Box::new(Metadata));

    // ARP: who has 169.254.169.254? Padded to Ethernet's 60-byte minimum.
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&STACK_IP);
    arp.resize(60, 0);
    assert!(stack.detour_frame(&arp));
    let reply = next_frame(&mut stack).unwrap();
    assert_eq!(reply[0..6], GUEST_MAC);
    assert_eq!(reply[12..14], [0x08, 0x06]);
    assert_eq!(reply[20..22], [0, 2], "a reply");
    assert_eq!(reply[22..28], STACK_MAC);
    assert_eq!(reply[28..32], STACK_IP);
    assert_eq!(reply[32..38], GUEST_MAC);
    assert_eq!(reply[38..42], GUEST_IP);

    // The handshake, with an MSS of 1000 and the options Linux sends.
    let options = [
        2, 4, 0x03, 0xe8, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    assert!(stack.detour_frame(&tcp_frame(7000, 0, SYN, &options, b"")));
    let (iss, ack, flags, data) = read_segment(&next_frame(&mut stack).unwrap());
    assert_eq!((ack, flags, data.len()), (7001, SYN | ACK, 0));
    let mut next = iss.wrapping_add(1);
    assert!(stack.detour_frame(&tcp_frame(7001, next, ACK, &[], b"")));
    assert!(!stack.has_frames());

    // The request in two segments.
    let request = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
    let (a, b) = request.split_at(20);
    assert!(stack.detour_frame(&tcp_frame(7001, next, ACK | PSH, &[], a)));
    let (_, ack, _, _) = read_segment(&next_frame(&mut stack).unwrap());
    assert_eq!(ack, 7021);
    let end = 7001 + request.len() as u32;
    assert!(stack.detour_frame(&tcp_frame(7021, next, ACK | PSH, &[], b)));

    // The answer, in segments of at most 1000 bytes, acknowledged as they come.
    let mut answer = Vec::new();
    let mut fin = false;
    while let Some(frame) = next_frame(&mut stack) {
        let (seq, ack, flags, data) = read_segment(&frame);
        assert_eq!(seq, next);
        assert_eq!(ack, end);
        assert!(data.len() <= 1000);
        next = next.wrapping_add(data.len() as u32);
        answer.extend_from_slice(&data);
        if flags & FIN != 0 {
            fin = true;
            next = next.wrapping_add(1);
        }
        assert!(stack.detour_frame(&tcp_frame(end, next, ACK, &[], b"")));
    }
    assert!(fin, "the stack closed after its answer");
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(answer.len(), 41 + 3000);

    // The guest closes too; its FIN is acknowledged and the connection is gone.
    assert!(stack.detour_frame(&tcp_frame(end, next, ACK | FIN, &[], b"")));
    let (_, ack, flags, _) = read_segment(&next_frame(&mut stack).unwrap());
    assert_eq!((ack, flags), (end + 1, ACK));
    assert_eq!(stack.connection_count(), 0);
    assert!(!stack.has_frames());
}

#[test]
fn traffic_for_other_hosts_is_left_to_the_vmm() {
    let mut stack = MmdsNetworkStack::new(STACK_MAC, Ipv4Addr::from(STACK_IP), Box::new(Metadata));
    let mut to_gateway = tcp_frame(1, 0, SYN, &[], b"");
    // Another destination, checksums aside: the stack does not look further.
    to_gateway[30..34].copy_from_slice(&[172, 16, 0, 1]);
    assert!(!stack.detour_frame(&to_gateway));
    let ipv6 = [
        &[0x33, 0x33, 0, 0, 0, 1][..],
        &GUEST_MAC,
        &[0x86, 0xdd],
        &[0x60; 40],
    ]
    .concat();
    assert!(!stack.detour_frame(&ipv6));
    assert!(!stack.has_frames());
}
