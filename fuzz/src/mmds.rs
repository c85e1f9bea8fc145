//! The metadata service's guest-facing network stack: sequences of frames a guest sends it,
//! and the stack's answers read back.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ember_mmds::ns::{
    DETOUR_HEAD_LEN, MAX_CONNECTIONS, MmdsNetworkStack, arp, ethernet, ipv4, tcp,
};
use ember_mmds::{Handled, RequestHandler};

/// The stack's MAC and address.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The stack's address.
pub const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The guest's MAC.
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The guest's address.
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The most frames one drain takes: far more than the stack can hold at once.
const MAX_DRAIN: usize = 100_000;
/// The largest frame the stack is given room for.
const FULL_BUFFER: usize = 65550;

/// Op: a raw frame, `len: u16 LE` then its bytes.
pub const OP_FRAME: u8 = 0;
/// Op: a TCP segment to port 80 with right checksums: `port, flags, seq_off: i8, ack_off: i8,
/// window: u16 LE, len: u8` then `len` bytes of data (in a SYN, no data: `len` is the MSS
/// option, in units of 8 bytes). Sequence and acknowledgment numbers are relative to
/// what the guest has sent and what the stack has sent on that port.
pub const OP_SEGMENT: u8 = 1;
/// Op: the stack's frames, into buffers of `room: u16 LE` bytes, until it has none.
pub const OP_DRAIN: u8 = 2;

/// What a run did: for the replay test to check each seed's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmdsOutcome {
    /// Frames the stack took.
    pub detoured: usize,
    /// Frames the stack sent.
    pub sent: usize,
    /// Answer bytes the guest received.
    pub answer_bytes: usize,
    /// Connections open at the end.
    pub connections: usize,
}

/// Answers each request that ends with an empty line with 100 bytes for each byte of it, and
/// closes when the request holds a `c`.
#[derive(Debug)]
struct Answers;

impl RequestHandler for Answers {
    fn handle(&mut self, received: &[u8]) -> Handled {
        match received.windows(4).position(|w| w == b"\r\n\r\n") {
            None => Handled::Incomplete,
            Some(end) => Handled::Response {
                consumed: end + 4,
                bytes: vec![b'a'; (end + 4) * 100],
                close: received[..end].contains(&b'c'),
            },
        }
    }
}

/// What the guest knows of one connection: its next sequence number, and the stack's.
#[derive(Debug, Default, Clone, Copy)]
struct Peer {
    next_seq: u32,
    stack_next: u32,
}

/// Runs the ops in `data` against a fresh stack.
///
/// Properties checked on every input: the stack takes no frame whose head says it cannot be
/// its ([`MmdsNetworkStack::may_detour`]); every frame it sends fits the buffer it was given,
/// comes from its MAC and address, and is a right ARP reply or an IPv4 packet carrying a TCP
/// segment with right checksums; it never keeps more than [`MAX_CONNECTIONS`] connections; a
/// drain ends, and leaves [`MmdsNetworkStack::has_frames`] false.
pub fn mmds_stack(mut data: &[u8]) -> MmdsOutcome {
    let mut stack = MmdsNetworkStack::new(MMDS_MAC, MMDS_IP, Box::new(Answers));
    let mut peers: HashMap<u16, Peer> = HashMap::new();
    let mut outcome = MmdsOutcome {
        detoured: 0,
        sent: 0,
        answer_bytes: 0,
        connections: 0,
    };
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        match op % 3 {
            OP_FRAME => {
                let len = usize::from(take_u16(&mut data));
                let frame = take(&mut data, len);
                detour(&mut stack, frame, &mut outcome);
            }
            OP_SEGMENT => {
                let head = take(&mut data, 7);
                let mut fields = [0u8; 7];
                fields[..head.len()].copy_from_slice(head);
                let [port, flags, seq_off, ack_off, w0, w1, len] = fields;
                // A SYN's length byte is its MSS, in units of 8 bytes; it carries no data.
                let payload = if flags & tcp::SYN != 0 {
                    &[]
                } else {
                    take(&mut data, usize::from(len))
                };
                let port = 40000 + u16::from(port);
                let peer = peers.entry(port).or_default();
                let seq = peer
                    .next_seq
                    .wrapping_add_signed(i32::from(i8::from_ne_bytes([seq_off])));
                let ack = peer
                    .stack_next
                    .wrapping_add_signed(i32::from(i8::from_ne_bytes([ack_off])));
                if seq == peer.next_seq {
                    let syn_fin =
                        u32::from(flags & tcp::SYN != 0) + u32::from(flags & tcp::FIN != 0);
                    peer.next_seq = seq.wrapping_add(payload.len() as u32).wrapping_add(syn_fin);
                }
                let header = tcp::Header {
                    source_port: port,
                    destination_port: 80,
                    seq,
                    ack,
                    flags,
                    window: u16::from_le_bytes([w0, w1]),
                    mss: (flags & tcp::SYN != 0).then_some(u16::from(len) * 8),
                };
                let frame = segment_frame(&header, payload);
                detour(&mut stack, &frame, &mut outcome);
            }
            _ => {
                let room = usize::from(take_u16(&mut data));
                drain(&mut stack, room, &mut peers, &mut outcome);
            }
        }
        assert!(stack.connection_count() <= MAX_CONNECTIONS);
    }
    drain(&mut stack, FULL_BUFFER, &mut peers, &mut outcome);
    outcome.connections = stack.connection_count();
    outcome
}

fn detour(stack: &mut MmdsNetworkStack, frame: &[u8], outcome: &mut MmdsOutcome) {
    let may = stack.may_detour(&frame[..frame.len().min(DETOUR_HEAD_LEN)]);
    if stack.detour_frame(frame) {
        assert!(may, "the stack took a frame its head says is not its");
        outcome.detoured += 1;
    }
}

/// Takes the stack's frames into buffers of `room` bytes until it has none, checking each.
fn drain(
    stack: &mut MmdsNetworkStack,
    room: usize,
    peers: &mut HashMap<u16, Peer>,
    outcome: &mut MmdsOutcome,
) {
    let mut buf = vec![0u8; room];
    for _ in 0..MAX_DRAIN {
        let Some(len) = stack.write_next_frame(&mut buf) else {
            if room >= 64 {
                assert!(!stack.has_frames(), "a frame is left that was not written");
            }
            return;
        };
        assert!(len <= room, "the frame is longer than its buffer");
        outcome.sent += 1;
        check_frame(&buf[..len], peers, outcome);
    }
    panic!("the stack keeps writing frames");
}

/// Checks a frame the stack sent, and notes what the guest learns from it.
fn check_frame(frame: &[u8], peers: &mut HashMap<u16, Peer>, outcome: &mut MmdsOutcome) {
    let eth = ethernet::Frame::parse(frame).expect("a frame with an Ethernet header");
    assert_eq!(eth.source(), MMDS_MAC);
    match eth.ethertype() {
        ethernet::ETHERTYPE_ARP => {
            let reply = arp::Packet::parse(eth.payload()).expect("a right ARP packet");
            assert_eq!(reply.operation(), arp::OPER_REPLY);
            assert_eq!(reply.sender_mac(), MMDS_MAC);
            assert_eq!(reply.sender_ip(), MMDS_IP);
        }
        ethernet::ETHERTYPE_IPV4 => {
            let ip = ipv4::Packet::parse(eth.payload()).expect("a right IPv4 packet");
            assert_eq!(ip.source(), MMDS_IP);
            assert_eq!(
                ip.payload().len() + 34,
                frame.len(),
                "no bytes past the packet"
            );
            let seg = tcp::Segment::parse(ip.payload(), MMDS_IP, ip.destination())
                .expect("a right TCP segment");
            // Only a reset answers for another port.
            assert!(seg.source_port() == 80 || seg.has(tcp::RST));
            let data = seg.payload().len();
            outcome.answer_bytes += data;
            if let Some(peer) = peers.get_mut(&seg.destination_port()) {
                if !seg.has(tcp::RST) {
                    peer.stack_next = seg.seq().wrapping_add(seg.seq_len());
                }
            }
        }
        other => panic!("the stack sent ethertype {other:#06x}"),
    }
}

/// A frame from the guest to the stack carrying the segment of `header` and `payload`, with
/// right checksums.
pub fn segment_frame(header: &tcp::Header, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; 58 + payload.len()];
    ethernet::write_header(&mut frame, MMDS_MAC, GUEST_MAC, ethernet::ETHERTYPE_IPV4)
        .expect("room for the header");
    let len = tcp::write_segment(&mut frame[34..], GUEST_IP, MMDS_IP, header, payload)
        .expect("room for the segment");
    ipv4::write_header(
        &mut frame[14..],
        GUEST_IP,
        MMDS_IP,
        ipv4::PROTOCOL_TCP,
        0,
        len,
    )
    .expect("room for the header");
    frame.truncate(34 + len);
    frame
}

fn take<'a>(data: &mut &'a [u8], len: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(len.min(data.len()));
    *data = rest;
    head
}

fn take_u16(data: &mut &[u8]) -> u16 {
    let bytes = take(data, 2);
    let mut word = [0u8; 2];
    word[..bytes.len()].copy_from_slice(bytes);
    u16::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, corpus_dir, replay};

    fn frame_op(frame: &[u8]) -> Vec<u8> {
        let mut op = vec![OP_FRAME];
        op.extend_from_slice(&u16::try_from(frame.len()).unwrap().to_le_bytes());
        op.extend_from_slice(frame);
        op
    }

    fn segment_op(port: u8, flags: u8, seq_off: i8, ack_off: i8, data: &[u8]) -> Vec<u8> {
        let mut op = vec![
            OP_SEGMENT,
            port,
            flags,
            seq_off.to_ne_bytes()[0],
            ack_off.to_ne_bytes()[0],
            0xff,
            0xff,
            u8::try_from(data.len()).unwrap(),
        ];
        op.extend_from_slice(data);
        op
    }

    /// A SYN from `port` with an MSS of `mss8` times 8 bytes.
    fn syn_op(port: u8, mss8: u8) -> Vec<u8> {
        vec![OP_SEGMENT, port, tcp::SYN, 0, 0, 0xff, 0xff, mss8]
    }

    fn drain_op(room: u16) -> Vec<u8> {
        let mut op = vec![OP_DRAIN];
        op.extend_from_slice(&room.to_le_bytes());
        op
    }

    fn arp_request() -> Vec<u8> {
        let mut frame = vec![0u8; 42];
        ethernet::write_header(&mut frame, [0xff; 6], GUEST_MAC, ethernet::ETHERTYPE_ARP).unwrap();
        arp::write_reply(&mut frame[14..], GUEST_MAC, GUEST_IP, [0; 6], MMDS_IP).unwrap();
        frame[20..22].copy_from_slice(&arp::OPER_REQUEST.to_be_bytes());
        frame
    }

    const fn outcome(
        detoured: usize,
        sent: usize,
        answer_bytes: usize,
        connections: usize,
    ) -> MmdsOutcome {
        MmdsOutcome {
            detoured,
            sent,
            answer_bytes,
            connections,
        }
    }

    /// The target's seeds and what it makes of them.
    const MMDS_SEEDS: &[(&str, MmdsOutcome)] = &[
        ("empty", outcome(0, 0, 0, 0)),
        ("arp-request", outcome(1, 1, 0, 0)),
        ("http-exchange", outcome(4, 4, 900, 0)),
        ("small-buffers", outcome(3, 68, 400, 1)),
        ("bad-checksum", outcome(1, 0, 0, 0)),
        ("other-traffic", outcome(0, 0, 0, 0)),
        ("syn-flood", outcome(40, 40, 0, MAX_CONNECTIONS)),
        ("out-of-order", outcome(4, 2, 0, 1)),
    ];

    fn mmds_seeds() -> Seeds {
        let ack = tcp::ACK;
        // SYN; ACK; "GET c\r\n\r\n" (9 bytes, 900 of answer, then close); the guest's ACK of
        // the answer and FIN with its own FIN.
        let http = [
            syn_op(0, 182),
            drain_op(1514),
            segment_op(0, ack, 0, 0, b""),
            segment_op(0, ack | tcp::PSH, 0, 0, b"GET c\r\n\r\n"),
            drain_op(1514),
            segment_op(0, ack | tcp::FIN, 0, 0, b""),
            drain_op(1514),
        ]
        .concat();
        let small = [
            syn_op(1, 255),
            drain_op(1514),
            segment_op(1, ack, 0, 0, b""),
            segment_op(1, ack, 0, 0, b"\r\n\r\n"),
            drain_op(64),
        ]
        .concat();
        let mut bad = segment_frame(
            &tcp::Header {
                source_port: 40000,
                destination_port: 80,
                seq: 1,
                ack: 0,
                flags: tcp::SYN,
                window: 1000,
                mss: None,
            },
            b"",
        );
        bad[50] ^= 0xff;
        let mut other = arp_request();
        other[38..42].copy_from_slice(&[10, 0, 0, 1]);
        let mut ipv6 = bad.clone();
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        let other = [frame_op(&other), frame_op(&ipv6), frame_op(&bad[..13])].concat();
        let flood: Vec<u8> = (0..40u8).flat_map(|port| syn_op(port, 0)).collect();
        let out_of_order = [
            syn_op(2, 182),
            drain_op(1514),
            segment_op(2, ack, 0, 0, b""),
            segment_op(2, ack, 5, 0, b"late\r\n\r\n"),
            segment_op(2, ack, -3, 0, b"old"),
        ]
        .concat();
        vec![
            ("empty", Vec::new()),
            (
                "arp-request",
                [frame_op(&arp_request()), drain_op(64)].concat(),
            ),
            ("http-exchange", http),
            ("small-buffers", small),
            ("bad-checksum", frame_op(&bad)),
            ("other-traffic", other),
            ("syn-flood", flood),
            ("out-of-order", out_of_order),
        ]
    }

    #[test]
    fn mmds_stack_corpus_replays() {
        replay("mmds_stack", MMDS_SEEDS, mmds_stack);
    }

    #[test]
    fn mmds_stack_seeds_on_disk_are_the_generated_ones() {
        crate::tests::check_seeds(&[("mmds_stack", mmds_seeds())]);
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_mmds_seed_corpus() {
        let dir = corpus_dir("mmds_stack");
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in mmds_seeds() {
            fs::write(dir.join(name), data).unwrap();
        }
    }
}
