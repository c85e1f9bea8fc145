use std::sync::atomic::Ordering;

use super::*;
use crate::Handled;

const MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const MMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Answers each request that ends with an empty line with `answer`, closing the connection if
/// the request says `close`.
struct Echo {
    answer: Vec<u8>,
}

impl RequestHandler for Echo {
    fn handle(&mut self, received: &[u8]) -> Handled {
        match received.windows(4).position(|w| w == b"\r\n\r\n") {
            None => Handled::Incomplete,
            Some(end) => {
                let request = &received[..end];
                let mut bytes = self.answer.clone();
                bytes.extend_from_slice(&request[..request.len().min(3)]);
                Handled::Response {
                    consumed: end + 4,
                    bytes,
                    close: request.windows(5).any(|w| w == b"close"),
                }
            }
        }
    }
}

fn stack(answer: &[u8]) -> MmdsNetworkStack {
    MmdsNetworkStack::new(
        MAC,
        MMDS,
        Box::new(Echo {
            answer: answer.to_vec(),
        }),
    )
}

fn arp_request(target: Ipv4Addr, oper: u16) -> Vec<u8> {
    let mut frame = vec![0u8; 42];
    ethernet::write_header(&mut frame, [0xff; 6], GUEST_MAC, ethernet::ETHERTYPE_ARP).unwrap();
    arp::write_reply(&mut frame[14..], GUEST_MAC, GUEST, [0; 6], target).unwrap();
    frame[20..22].copy_from_slice(&oper.to_be_bytes());
    frame
}

/// A segment the guest sends from `port` to `to_port` on the stack's address.
struct Seg {
    port: u16,
    to_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
}

impl Seg {
    fn new(seq: u32, ack: u32, flags: u8) -> Self {
        Seg {
            port: 40000,
            to_port: 80,
            seq,
            ack,
            flags,
            window: 65535,
            mss: None,
        }
    }

    fn frame(&self, data: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 58 + data.len()];
        let header = tcp::Header {
            source_port: self.port,
            destination_port: self.to_port,
            seq: self.seq,
            ack: self.ack,
            flags: self.flags,
            window: self.window,
            mss: self.mss,
        };
        ethernet::write_header(&mut frame, MAC, GUEST_MAC, ethernet::ETHERTYPE_IPV4).unwrap();
        let tcp_len = tcp::write_segment(&mut frame[34..], GUEST, MMDS, &header, data).unwrap();
        ipv4::write_header(
            &mut frame[14..],
            GUEST,
            MMDS,
            ipv4::PROTOCOL_TCP,
            1,
            tcp_len,
        )
        .unwrap();
        frame.truncate(34 + tcp_len);
        frame
    }
}

/// What the stack sent, read back.
#[derive(Debug)]
struct Out {
    port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    data: Vec<u8>,
}

fn next(stack: &mut MmdsNetworkStack) -> Option<Out> {
    let mut buf = vec![0u8; 1514];
    let len = stack.write_next_frame(&mut buf)?;
    let eth = ethernet::Frame::parse(&buf[..len]).unwrap();
    assert_eq!(eth.source(), MAC);
    assert_eq!(eth.destination(), GUEST_MAC);
    assert_eq!(eth.ethertype(), ethernet::ETHERTYPE_IPV4);
    let ip = ipv4::Packet::parse(eth.payload()).unwrap();
    assert_eq!((ip.source(), ip.destination()), (MMDS, GUEST));
    let seg = tcp::Segment::parse(ip.payload(), MMDS, GUEST).unwrap();
    Some(Out {
        port: seg.destination_port(),
        seq: seg.seq(),
        ack: seg.ack(),
        flags: seg.flags(),
        window: seg.window(),
        mss: seg.mss(),
        data: seg.payload().to_vec(),
    })
}

fn drain(stack: &mut MmdsNetworkStack) -> Vec<Out> {
    std::iter::from_fn(|| next(stack)).collect()
}

/// Opens a connection from `port` with a SYN at sequence number 1000: returns the stack's
/// next sequence number.
fn open(stack: &mut MmdsNetworkStack, port: u16, mss: Option<u16>, window: u16) -> u32 {
    let syn = Seg {
        port,
        mss,
        window,
        ..Seg::new(1000, 0, tcp::SYN)
    };
    assert!(stack.detour_frame(&syn.frame(b"")));
    let syn_ack = next(stack).unwrap();
    assert_eq!(syn_ack.flags, tcp::SYN | tcp::ACK);
    assert_eq!(syn_ack.ack, 1001);
    assert_eq!(syn_ack.port, port);
    assert_eq!(syn_ack.mss, Some(connection::OUR_MSS));
    let iss = syn_ack.seq;
    let ack = Seg {
        port,
        window,
        ..Seg::new(1001, iss.wrapping_add(1), tcp::ACK)
    };
    assert!(stack.detour_frame(&ack.frame(b"")));
    assert!(next(stack).is_none(), "a bare ACK is not answered");
    iss.wrapping_add(1)
}

fn metric(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[test]
fn an_arp_request_for_the_address_is_answered_with_the_stacks_mac() {
    let mut stack = stack(b"");
    assert!(stack.detour_frame(&arp_request(MMDS, arp::OPER_REQUEST)));
    assert!(stack.has_frames());
    let mut buf = [0u8; 100];
    let len = stack.write_next_frame(&mut buf).unwrap();
    let eth = ethernet::Frame::parse(&buf[..len]).unwrap();
    assert_eq!(eth.destination(), GUEST_MAC);
    assert_eq!(eth.source(), MAC);
    let reply = arp::Packet::parse(eth.payload()).unwrap();
    assert_eq!(reply.operation(), arp::OPER_REPLY);
    assert_eq!(reply.sender_mac(), MAC);
    assert_eq!(reply.sender_ip(), MMDS);
    assert_eq!(reply.target_ip(), GUEST);
    assert!(!stack.has_frames());
    assert_eq!(stack.write_next_frame(&mut buf), None);

    // Another address's ARP goes on; a reply about the stack's address is taken, unanswered.
    assert!(!stack.detour_frame(&arp_request(Ipv4Addr::new(10, 0, 0, 1), arp::OPER_REQUEST)));
    assert!(stack.detour_frame(&arp_request(MMDS, arp::OPER_REPLY)));
    assert!(!stack.has_frames());
    assert_eq!(metric(&stack.metrics().rx_accepted), 2);
    assert_eq!(metric(&stack.metrics().rx_accepted_unusual), 1);
    assert_eq!(metric(&stack.metrics().tx_frames), 1);
    assert_eq!(metric(&stack.metrics().tx_bytes), 42);
    let values = stack.metrics().values();
    assert_eq!(values[0], ("rx_accepted", 2));
    assert!(values.contains(&("tx_frames", 1)));
}

#[test]
fn a_whole_exchange_splits_the_answer_by_mss_and_window_and_closes() {
    let answer = vec![b'x'; 500];
    let mut stack = stack(&answer);
    let mut iss = open(&mut stack, 40000, Some(100), 250);
    assert_eq!(stack.connection_count(), 1);

    // The request in three segments, each acknowledged.
    let request = b"GET / close\r\n\r\n";
    let mut seq = 1001u32;
    for piece in [&request[..5], &request[5..12], &request[12..]] {
        let seg = Seg {
            window: 250,
            ..Seg::new(seq, iss, tcp::ACK | tcp::PSH)
        };
        assert!(stack.detour_frame(&seg.frame(piece)));
        seq += piece.len() as u32;
        if seq < 1001 + request.len() as u32 {
            let ack = next(&mut stack).unwrap();
            assert_eq!((ack.flags, ack.ack), (tcp::ACK, seq));
            assert!(ack.data.is_empty());
            assert_eq!(
                usize::from(ack.window),
                DEFAULT_REQUEST_LIMIT - (seq - 1001) as usize
            );
        }
    }

    // 503 bytes of answer, in segments of at most 100 bytes and 250 in flight.
    let mut received = Vec::new();
    let sent = drain(&mut stack);
    assert_eq!(
        sent.iter().map(|s| s.data.len()).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    for s in &sent {
        assert_eq!(s.ack, seq, "the data acknowledges the request");
        assert_eq!(s.seq, iss + received.len() as u32);
        received.extend_from_slice(&s.data);
    }
    assert!(!stack.has_frames(), "the window is full");
    iss += 250;
    let ack = Seg {
        window: 250,
        ..Seg::new(seq, iss, tcp::ACK)
    };
    assert!(stack.detour_frame(&ack.frame(b"")));
    let sent = drain(&mut stack);
    assert_eq!(
        sent.iter().map(|s| s.data.len()).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    received.extend(sent.iter().flat_map(|s| s.data.clone()));
    iss += 250;
    let ack = Seg::new(seq, iss, tcp::ACK);
    assert!(stack.detour_frame(&ack.frame(b"")));
    let sent = drain(&mut stack);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].data.len(), 3);
    assert!(sent[0].flags & tcp::PSH != 0);
    received.extend_from_slice(&sent[0].data);
    let mut expected = answer.clone();
    expected.extend_from_slice(b"GET");
    assert_eq!(received, expected);

    // The request said close: the stack's FIN follows the answer.
    assert_eq!(sent[1].flags, tcp::FIN | tcp::ACK);
    assert_eq!(sent[1].seq, iss + 3);
    let fin_ack = Seg::new(seq, iss + 4, tcp::ACK | tcp::FIN);
    assert!(stack.detour_frame(&fin_ack.frame(b"")));
    let last = next(&mut stack).unwrap();
    assert_eq!((last.flags, last.ack), (tcp::ACK, seq + 1));
    assert!(next(&mut stack).is_none());
    assert_eq!(stack.connection_count(), 0);
    let m = stack.metrics();
    assert_eq!(metric(&m.connections_created), 1);
    assert_eq!(metric(&m.connections_destroyed), 1);
    assert_eq!(metric(&m.tx_count), 7);
    assert_eq!(metric(&m.rx_accepted_err), 0);
}

#[test]
fn the_guest_closing_first_gets_the_answer_then_a_fin() {
    let mut stack = stack(b"ok");
    let iss = open(&mut stack, 40000, None, 65535);
    // The request and the FIN in one segment.
    let seg = Seg::new(1001, iss, tcp::ACK | tcp::FIN);
    assert!(stack.detour_frame(&seg.frame(b"GET /\r\n\r\n")));
    let sent = drain(&mut stack);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].data, b"okGET");
    assert_eq!(sent[0].ack, 1001 + 9 + 1, "the FIN is acknowledged");
    assert_eq!(sent[1].flags, tcp::FIN | tcp::ACK);
    let ack = Seg::new(1011, iss + 6, tcp::ACK);
    assert!(stack.detour_frame(&ack.frame(b"")));
    assert_eq!(stack.connection_count(), 0);
    assert!(!stack.has_frames());
}

#[test]
fn requests_on_one_connection_are_answered_in_order() {
    let mut stack = stack(b"A:");
    let iss = open(&mut stack, 40000, None, 65535);
    let seg = Seg::new(1001, iss, tcp::ACK);
    assert!(stack.detour_frame(&seg.frame(b"one\r\n\r\ntwo\r\n\r\n")));
    let sent = drain(&mut stack);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].data, b"A:one");
    // The second answer waits for the first to be acknowledged.
    let ack = Seg::new(1015, iss + 5, tcp::ACK);
    assert!(stack.detour_frame(&ack.frame(b"")));
    let sent = drain(&mut stack);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].data, b"A:two");
    assert_eq!(sent[0].seq, iss + 5);
}

#[test]
fn out_of_order_and_repeated_data_get_the_expected_acknowledgment() {
    let mut stack = stack(b"");
    let iss = open(&mut stack, 40000, None, 65535);
    // Ahead of what is expected: dropped.
    let ahead = Seg::new(1005, iss, tcp::ACK);
    assert!(stack.detour_frame(&ahead.frame(b"\r\n\r\n")));
    let dup = next(&mut stack).unwrap();
    assert_eq!((dup.flags, dup.ack), (tcp::ACK, 1001));
    // A retransmission that overlaps what came: only the new bytes count.
    assert!(stack.detour_frame(&Seg::new(1001, iss, tcp::ACK).frame(b"GE")));
    assert_eq!(next(&mut stack).unwrap().ack, 1003);
    assert!(stack.detour_frame(&Seg::new(1001, iss, tcp::ACK).frame(b"GET")));
    assert_eq!(next(&mut stack).unwrap().ack, 1004);
    // All of it seen already.
    assert!(stack.detour_frame(&Seg::new(1001, iss, tcp::ACK).frame(b"GET")));
    assert_eq!(next(&mut stack).unwrap().ack, 1004);
    assert!(stack.detour_frame(&Seg::new(1004, iss, tcp::ACK).frame(b"\r\n\r\n")));
    let answer = next(&mut stack).unwrap();
    assert_eq!(answer.data, b"GET");
}

#[test]
fn a_zero_window_holds_the_answer_until_the_guest_opens_it() {
    let mut stack = stack(b"0123456789");
    let iss = open(&mut stack, 40000, None, 0);
    let seg = Seg {
        window: 0,
        ..Seg::new(1001, iss, tcp::ACK)
    };
    assert!(stack.detour_frame(&seg.frame(b"x\r\n\r\n")));
    let ack = next(&mut stack).unwrap();
    assert!(ack.data.is_empty());
    assert!(!stack.has_frames());
    let update = Seg {
        window: 4,
        ..Seg::new(1006, iss, tcp::ACK)
    };
    assert!(stack.detour_frame(&update.frame(b"")));
    assert_eq!(next(&mut stack).unwrap().data, b"0123");
    assert!(!stack.has_frames());
}

#[test]
fn a_repeated_syn_gets_the_same_syn_ack_and_a_late_one_a_reset() {
    let mut stack = stack(b"");
    let syn = Seg::new(1000, 0, tcp::SYN);
    assert!(stack.detour_frame(&syn.frame(b"")));
    let first = next(&mut stack).unwrap();
    assert!(stack.detour_frame(&syn.frame(b"")));
    let again = next(&mut stack).unwrap();
    assert_eq!(
        (again.seq, again.ack, again.flags),
        (first.seq, first.ack, first.flags)
    );
    assert_eq!(stack.connection_count(), 1);
    // Once established, a SYN resets the connection.
    assert!(stack.detour_frame(&Seg::new(1001, first.seq + 1, tcp::ACK).frame(b"")));
    assert!(stack.detour_frame(&Seg::new(5000, 0, tcp::SYN).frame(b"")));
    let reset = next(&mut stack).unwrap();
    assert_eq!(reset.flags, tcp::RST | tcp::ACK);
    assert_eq!(stack.connection_count(), 0);
}

#[test]
fn an_ack_of_something_else_during_the_handshake_resets() {
    let mut stack = stack(b"");
    assert!(stack.detour_frame(&Seg::new(1000, 0, tcp::SYN).frame(b"")));
    let syn_ack = next(&mut stack).unwrap();
    assert!(stack.detour_frame(&Seg::new(1001, syn_ack.seq + 7, tcp::ACK).frame(b"")));
    assert_eq!(next(&mut stack).unwrap().flags & tcp::RST, tcp::RST);
    assert_eq!(stack.connection_count(), 0);
}

#[test]
fn a_reset_from_the_guest_ends_the_connection_only_in_window() {
    let mut stack = stack(b"");
    let iss = open(&mut stack, 40000, None, 65535);
    assert!(stack.detour_frame(&Seg::new(1001 + 100_000, iss, tcp::RST).frame(b"")));
    assert_eq!(stack.connection_count(), 1, "a blind reset is ignored");
    assert!(stack.detour_frame(&Seg::new(1001, iss, tcp::RST).frame(b"")));
    assert_eq!(stack.connection_count(), 0);
    assert!(!stack.has_frames(), "a reset is never answered");
}

#[test]
fn segments_without_a_connection_or_to_another_port_are_reset() {
    let mut stack = stack(b"");
    // An ACK for no connection: RST at its acknowledgment number.
    assert!(stack.detour_frame(&Seg::new(7, 1234, tcp::ACK).frame(b"data")));
    let reset = next(&mut stack).unwrap();
    assert_eq!((reset.flags, reset.seq), (tcp::RST, 1234));
    // A SYN to another port: RST-ACK of the SYN.
    let other = Seg {
        to_port: 22,
        ..Seg::new(7, 0, tcp::SYN)
    };
    assert!(stack.detour_frame(&other.frame(b"")));
    let reset = next(&mut stack).unwrap();
    assert_eq!(
        (reset.flags, reset.seq, reset.ack),
        (tcp::RST | tcp::ACK, 0, 8)
    );
    // A reset for no connection is dropped.
    assert!(stack.detour_frame(&Seg::new(7, 0, tcp::RST).frame(b"")));
    // Data without ACK and without a connection: RST-ACK past it.
    assert!(stack.detour_frame(&Seg::new(7, 0, tcp::FIN).frame(b"ab")));
    let reset = next(&mut stack).unwrap();
    assert_eq!((reset.flags, reset.ack), (tcp::RST | tcp::ACK, 10));
    assert!(!stack.has_frames());
    assert_eq!(stack.connection_count(), 0);
    assert_eq!(metric(&stack.metrics().rx_accepted_unusual), 1);
}

#[test]
fn a_request_past_the_limit_resets_the_connection() {
    let mut stack = stack(b"").with_request_limit(10);
    let iss = open(&mut stack, 40000, None, 65535);
    let syn_window = {
        assert!(stack.detour_frame(&Seg::new(1001, iss, tcp::ACK).frame(b"12345")));
        next(&mut stack).unwrap().window
    };
    assert_eq!(syn_window, 5);
    // More than the window: only what fits is taken, and the request is then full.
    assert!(stack.detour_frame(&Seg::new(1006, iss, tcp::ACK).frame(b"6789abc")));
    let reset = next(&mut stack).unwrap();
    assert_eq!(reset.flags, tcp::RST | tcp::ACK);
    assert_eq!(reset.ack, 1011);
    assert_eq!(stack.connection_count(), 0);
}

#[test]
fn malformed_frames_of_every_kind_are_dropped_or_passed_on() {
    let mut stack = stack(b"");
    let good = Seg::new(1000, 0, tcp::SYN).frame(b"");

    // Too short for Ethernet, or another ethertype (a VLAN tag): the host's.
    assert!(!stack.detour_frame(&good[..13]));
    let mut vlan = good.clone();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    assert!(!stack.detour_frame(&vlan));
    // Short ARP: the host's.
    assert!(!stack.detour_frame(&arp_request(MMDS, 1)[..41]));
    // IPv4 to another address, or too short to say: the host's.
    let mut elsewhere = good.clone();
    elsewhere[33] = 1;
    assert!(!stack.detour_frame(&elsewhere));
    assert!(!stack.detour_frame(&good[..33]));

    // To the stack's address but malformed: taken and dropped.
    let mut bad_ip_sum = good.clone();
    bad_ip_sum[22] ^= 1;
    let mut truncated = good.clone();
    truncated.truncate(40);
    let mut bad_tcp_sum = good.clone();
    bad_tcp_sum[40] ^= 1;
    let mut bad_offset = good.clone();
    bad_offset[46] = 0x10;
    for frame in [&bad_ip_sum, &truncated, &bad_tcp_sum, &bad_offset] {
        assert!(stack.detour_frame(frame));
    }
    assert_eq!(metric(&stack.metrics().rx_accepted_err), 4);

    // Not TCP, or a fragment: taken, not served.
    let mut udp = good.clone();
    udp[23] = 17;
    udp[24..26].copy_from_slice(&[0, 0]);
    let sum = ipv4::checksum(&[&udp[14..34]]);
    udp[24..26].copy_from_slice(&sum.to_be_bytes());
    assert!(stack.detour_frame(&udp));
    let mut fragment = good.clone();
    fragment[20] = 0x20;
    fragment[24..26].copy_from_slice(&[0, 0]);
    let sum = ipv4::checksum(&[&fragment[14..34]]);
    fragment[24..26].copy_from_slice(&sum.to_be_bytes());
    assert!(stack.detour_frame(&fragment));
    assert_eq!(metric(&stack.metrics().rx_accepted_unusual), 2);

    assert!(!stack.has_frames());
    assert_eq!(stack.connection_count(), 0);
    assert_eq!(metric(&stack.metrics().rx_bad_eth), 1);
    assert_eq!(metric(&stack.metrics().rx_count), 11);
}

#[test]
fn a_connection_past_the_cap_evicts_the_least_recently_active() {
    let mut stack = stack(b"");
    for port in 0..MAX_CONNECTIONS as u16 {
        open(&mut stack, 1000 + port, None, 65535);
    }
    assert_eq!(stack.connection_count(), MAX_CONNECTIONS);
    // The first connection speaks again, so the second is the idlest.
    let first = Seg {
        port: 1000,
        ..Seg::new(1001, 0, tcp::ACK)
    };
    assert!(stack.detour_frame(&first.frame(b"")));
    let syn = Seg {
        port: 5000,
        ..Seg::new(1000, 0, tcp::SYN)
    };
    assert!(stack.detour_frame(&syn.frame(b"")));
    assert_eq!(stack.connection_count(), MAX_CONNECTIONS);
    let sent = drain(&mut stack);
    let reset = sent.iter().find(|s| s.flags & tcp::RST != 0).unwrap();
    assert_eq!(reset.port, 1001);
    assert!(
        sent.iter()
            .any(|s| s.port == 5000 && s.flags == tcp::SYN | tcp::ACK)
    );
    assert_eq!(metric(&stack.metrics().connections_destroyed), 1);
}

#[test]
fn the_pending_queue_is_bounded() {
    let mut stack = stack(b"");
    let request = arp_request(MMDS, arp::OPER_REQUEST);
    for _ in 0..MAX_PENDING_FRAMES + 50 {
        assert!(stack.detour_frame(&request));
    }
    let mut buf = [0u8; 64];
    let mut count = 0;
    while stack.write_next_frame(&mut buf).is_some() {
        count += 1;
    }
    assert_eq!(count, MAX_PENDING_FRAMES);
    assert_eq!(metric(&stack.metrics().tx_errors), 50);
}

#[test]
fn a_buffer_too_small_loses_only_that_frame() {
    let mut stack = stack(b"");
    assert!(stack.detour_frame(&arp_request(MMDS, arp::OPER_REQUEST)));
    assert!(stack.detour_frame(&arp_request(MMDS, arp::OPER_REQUEST)));
    assert_eq!(stack.write_next_frame(&mut [0u8; 41]), None);
    assert_eq!(metric(&stack.metrics().tx_errors), 2);
    assert!(!stack.has_frames());
}

#[test]
fn the_answer_fits_the_buffer_it_is_written_to() {
    let mut stack = stack(&[b'y'; 1000]);
    let iss = open(&mut stack, 40000, None, 65535);
    assert!(stack.detour_frame(&Seg::new(1001, iss, tcp::ACK).frame(b"\r\n\r\n")));
    let mut buf = [0u8; HEADERS_LEN + 10];
    let len = stack.write_next_frame(&mut buf).unwrap();
    assert_eq!(len, 54 + 10);
    assert!(stack.has_frames());
}

#[test]
fn may_detour_is_true_for_every_frame_taken_from_its_head() {
    let stack = stack(b"");
    let syn = Seg::new(1000, 0, tcp::SYN).frame(b"");
    assert!(stack.may_detour(&syn[..DETOUR_HEAD_LEN]));
    assert!(stack.may_detour(&arp_request(MMDS, arp::OPER_REQUEST)[..DETOUR_HEAD_LEN]));
    let mut elsewhere = syn.clone();
    elsewhere[33] = 1;
    assert!(!stack.may_detour(&elsewhere[..DETOUR_HEAD_LEN]));
    assert!(!stack.may_detour(&syn[..20]));
    assert!(!stack.may_detour(&[]));
    let mut ipv6 = syn.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert!(!stack.may_detour(&ipv6));
}
