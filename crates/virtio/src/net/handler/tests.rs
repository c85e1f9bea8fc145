use std::os::unix::net::UnixDatagram;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::mmio::MmioInterrupt;
use crate::mock::{MockBuffer, MockDriver, bucket, counters_moved, guest_memory, wait_timer};
use crate::net::QUEUE_SIZE;
use crate::worker::WorkerGate;

const MEM_SIZE: usize = 0x40_0000;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const BUFFERS: u64 = 0x1_0000;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

type Handler<B = UnixDatagram> = NetHandler<Arc<GuestMemoryMmap<()>>, B>;

/// A handler over one end of a socket pair, with the mock driver on both queues.
struct Rig<B = UnixDatagram> {
    mem: Arc<GuestMemoryMmap<()>>,
    rx: MockDriver,
    tx: MockDriver,
    handler: Handler<B>,
    /// The other end of the socket pair: the network.
    peer: UnixDatagram,
    /// The handler's end, duplicated, to fill its send buffer.
    device_end: UnixDatagram,
    irq: EventFd,
    next_buffer: u64,
}

fn rig(features: u64) -> Rig {
    rig_with(features, NetRateLimiters::default())
}

fn rig_with(features: u64, rate_limiters: NetRateLimiters) -> Rig {
    rig_over(features, rate_limiters, |device| device)
}

/// A rig whose handler's backend `backend` makes from the handler's end of the socket pair.
fn rig_over<B: NetBackend>(
    features: u64,
    rate_limiters: NetRateLimiters,
    backend: impl FnOnce(UnixDatagram) -> B,
) -> Rig<B> {
    let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
    let rx = MockDriver::new(QUEUE_SIZE, GuestAddress(RX_RING));
    let tx = MockDriver::new(QUEUE_SIZE, GuestAddress(TX_RING));
    let (device, peer) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let device_end = device.try_clone().unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (mut rx_queue, mut tx_queue) = (rx.queue(), tx.queue());
    rx_queue.validate(&*mem).unwrap();
    tx_queue.validate(&*mem).unwrap();
    // As the transport hands them over: EVENT_IDX set as negotiated.
    let event_idx = features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
    rx_queue.set_event_idx(event_idx);
    tx_queue.set_event_idx(event_idx);
    let params = ActivateParams {
        mem: mem.clone(),
        features,
        queues: vec![rx_queue, tx_queue],
        queue_evts: vec![
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ],
        interrupt: Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())),
        executor: WorkerGate::new().into(),
    };
    let handler = NetHandler::new(backend(device), rate_limiters, params).unwrap();
    Rig {
        mem,
        rx,
        tx,
        handler,
        peer,
        device_end,
        irq,
        next_buffer: BUFFERS,
    }
}

/// A frame of `len` bytes, header included: a zero header, then bytes that differ with
/// `seed` and their position.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0u8; len];
    for (i, byte) in frame.iter_mut().enumerate().skip(VNET_HDR_LEN) {
        *byte = seed.wrapping_add((i % 251) as u8);
    }
    frame
}

impl<B: NetBackend> Rig<B> {
    /// Room for `len` bytes in guest memory, after the rings.
    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer = (addr + len as u64).next_multiple_of(16);
        assert!(
            self.next_buffer <= MEM_SIZE as u64,
            "the rig is out of memory"
        );
        addr
    }

    /// Offers `bytes` for transmission in one chain, cut into pieces of the given lengths
    /// (the last piece takes the rest).
    fn offer_tx(&mut self, bytes: &[u8], cuts: &[usize]) -> u16 {
        let mut buffers = Vec::new();
        let mut rest = bytes;
        for &cut in cuts {
            let (piece, tail) = rest.split_at(cut);
            buffers.push(self.readable(piece));
            rest = tail;
        }
        buffers.push(self.readable(rest));
        self.tx.add_chain(&*self.mem, &buffers).unwrap()
    }

    fn readable(&mut self, piece: &[u8]) -> MockBuffer {
        let addr = self.alloc(piece.len());
        self.mem.write_slice(piece, GuestAddress(addr)).unwrap();
        MockBuffer::readable(addr, u32::try_from(piece.len()).unwrap())
    }

    /// Offers one receive chain of one `len`-byte buffer; returns its head and address.
    fn offer_rx(&mut self, len: u32) -> (u16, u64) {
        let addr = self.alloc(len as usize);
        let head = self
            .rx
            .add_chain(&*self.mem, &[MockBuffer::writable(addr, len)])
            .unwrap();
        (head, addr)
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// What the network received, one datagram, if any.
    fn network_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
        match self.peer.recv(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                Some(buf)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
            Err(err) => panic!("{err}"),
        }
    }

    /// Interrupts raised since last asked.
    fn interrupts(&self) -> u64 {
        match self.irq.read() {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => panic!("{err}"),
        }
    }

    /// Fills the handler's send buffer, so that its next write finds the backend full.
    fn fill_backend(&self) {
        let filler = [0u8; 32 * 1024];
        loop {
            match self.device_end.send(&filler) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => panic!("{err}"),
            }
        }
    }
}

#[test]
fn tx_of_a_one_descriptor_frame_arrives_byte_exact() {
    let mut rig = rig(VERSION_1);
    let sent = frame(1500, 1);
    let head = rig.offer_tx(&sent, &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.network_recv().unwrap(), sent);
    assert_eq!(rig.network_recv(), None);
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 1);
    assert_eq!(
        rig.tx.used_elem(&*rig.mem, 0).unwrap(),
        (u32::from(head), 0)
    );
    assert_eq!(rig.interrupts(), 1);
    assert_eq!(rig.handler.tx_dropped(), 0);
}

#[test]
fn tx_of_a_frame_over_several_descriptors_arrives_byte_exact() {
    let mut rig = rig(VERSION_1);
    // The header alone, then the frame in uneven pieces.
    let first = frame(9000, 2);
    rig.offer_tx(&first, &[VNET_HDR_LEN, 1, 4000, 3]);
    // The header split too, and the chain in an indirect table.
    let second = frame(600, 3);
    let mut buffers = Vec::new();
    for piece in [&second[..5], &second[5..300], &second[300..]] {
        buffers.push(rig.readable(piece));
    }
    let table = rig.alloc(16 * buffers.len());
    rig.tx
        .add_indirect_chain(&*rig.mem, GuestAddress(table), &buffers)
        .unwrap();
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.network_recv().unwrap(), first);
    assert_eq!(rig.network_recv().unwrap(), second);
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 2);
}

#[test]
fn a_tx_chain_shorter_than_the_header_is_dropped_and_the_next_frame_still_goes_out() {
    let mut rig = rig(VERSION_1);
    let short = rig.offer_tx(&[0u8; VNET_HDR_LEN - 1], &[]);
    let good = frame(100, 4);
    let head = rig.offer_tx(&good, &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.network_recv().unwrap(), good);
    assert_eq!(rig.network_recv(), None);
    assert_eq!(rig.handler.tx_dropped(), 1);
    // Both chains go back to the driver.
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 2);
    assert_eq!(
        rig.tx.used_elem(&*rig.mem, 0).unwrap(),
        (u32::from(short), 0)
    );
    assert_eq!(
        rig.tx.used_elem(&*rig.mem, 1).unwrap(),
        (u32::from(head), 0)
    );
}

#[test]
fn tx_chains_too_long_are_dropped() {
    let mut rig = rig(VERSION_1);
    rig.offer_tx(&frame(MAX_BUFFER_LEN + 1, 5), &[]);
    // The longest frame still goes out.
    let longest = frame(MAX_BUFFER_LEN, 7);
    rig.offer_tx(&longest, &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.handler.tx_dropped(), 1);
    assert_eq!(rig.network_recv().unwrap(), longest);
    assert_eq!(rig.network_recv(), None);
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 2);
}

#[test]
fn a_tx_chain_of_more_pieces_than_the_queue_breaks_the_protocol() {
    let mut rig = rig(VERSION_1);
    // One one-byte piece more than the queue holds, in an indirect table.
    let bytes = frame(usize::from(QUEUE_SIZE) + 1, 6);
    let buffers: Vec<MockBuffer> = bytes.chunks(1).map(|b| rig.readable(b)).collect();
    let table = rig.alloc(16 * buffers.len());
    rig.tx
        .add_indirect_chain(&*rig.mem, GuestAddress(table), &buffers)
        .unwrap();
    let err = rig.handler.process_tx().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Queue {
                source: queue::Error::InvalidIndirectTableLength { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(rig.network_recv(), None);
}

#[test]
fn a_full_backend_holds_the_tx_chain_until_it_is_writable() {
    let mut rig = rig(VERSION_1);
    rig.fill_backend();
    let sent = frame(1500, 8);
    let head = rig.offer_tx(&sent, &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 0, "the chain is held");
    assert!(rig.handler.backend_interest().contains(EventSet::OUT));
    assert_eq!(rig.interrupts(), 0);
    // Still full: the chain stays held, and nothing spins or drops.
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 0);

    while rig.network_recv().is_some_and(|d| d.len() != sent.len()) {}
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.network_recv().unwrap(), sent);
    assert_eq!(
        rig.tx.used_elem(&*rig.mem, 0).unwrap(),
        (u32::from(head), 0)
    );
    assert!(!rig.handler.backend_interest().contains(EventSet::OUT));
    assert_eq!(rig.handler.tx_dropped(), 0);
    assert_eq!(rig.interrupts(), 1);
}

#[test]
fn rx_of_a_small_frame_fills_one_chain() {
    let mut rig = rig(VERSION_1);
    let (head, addr) = rig.offer_rx(1526);
    let received = frame(60, 9);
    rig.peer.send(&received).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 1);
    assert_eq!(
        rig.rx.used_elem(&*rig.mem, 0).unwrap(),
        (u32::from(head), 60)
    );
    let mut expected = received.clone();
    // num_buffers is 1 without MRG_RXBUF.
    expected[NUM_BUFFERS_OFFSET] = 1;
    assert_eq!(rig.read_guest(addr, 60), expected);
    assert_eq!(rig.interrupts(), 1);
    assert!(rig.handler.backend_interest().contains(EventSet::IN));
}

#[test]
fn rx_of_a_64k_frame_spreads_over_chains_with_mrg_rxbuf() {
    let mut rig = rig(VERSION_1 | MRG_RXBUF);
    let chains: Vec<(u16, u64)> = (0..20).map(|_| rig.offer_rx(4096)).collect();
    let received = frame(VNET_HDR_LEN + 65536, 10);
    rig.peer.send(&received).unwrap();
    rig.handler.process_rx().unwrap();

    // 65548 bytes: 16 full chains and 12 bytes in a 17th.
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 17);
    let mut gathered = Vec::new();
    for (i, &(head, addr)) in chains.iter().take(17).enumerate() {
        let len = if i < 16 { 4096 } else { 12 };
        let idx = u16::try_from(i).unwrap();
        assert_eq!(
            rig.rx.used_elem(&*rig.mem, idx).unwrap(),
            (u32::from(head), len)
        );
        gathered.extend(rig.read_guest(addr, len as usize));
    }
    let num_buffers = u16::from_le_bytes([gathered[10], gathered[11]]);
    assert_eq!(num_buffers, 17);
    gathered[10..12].fill(0);
    assert_eq!(gathered, received);
    assert_eq!(rig.interrupts(), 1);

    // The next frame starts in the 18th chain.
    rig.peer.send(&frame(100, 11)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(
        rig.rx.used_elem(&*rig.mem, 17).unwrap(),
        (u32::from(chains[17].0), 100)
    );
}

#[test]
fn without_mrg_rxbuf_a_frame_too_big_for_the_chain_is_dropped_and_the_next_delivered() {
    let mut rig = rig(VERSION_1);
    let (head, addr) = rig.offer_rx(1526);
    rig.peer.send(&frame(1527, 12)).unwrap();
    let next = frame(1526, 13);
    rig.peer.send(&next).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.handler.rx_dropped(), 1);
    // The chain the big frame did not fit stays for the next one.
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 1);
    assert_eq!(
        rig.rx.used_elem(&*rig.mem, 0).unwrap(),
        (u32::from(head), 1526)
    );
    let delivered = rig.read_guest(addr, 1526);
    assert_eq!(delivered[VNET_HDR_LEN..], next[VNET_HDR_LEN..]);
    // Nothing was written past the chain.
    assert_eq!(rig.read_guest(addr + 1526, 1), [0]);
}

#[test]
fn without_rx_buffers_the_frame_waits_unwatched_until_the_driver_adds_some() {
    let mut rig = rig(VERSION_1);
    let first = frame(200, 14);
    let second = frame(300, 15);
    rig.peer.send(&first).unwrap();
    rig.peer.send(&second).unwrap();
    rig.handler.process_rx().unwrap();
    // The handler holds the frame, stops reading the backend and asks to be notified.
    assert!(!rig.handler.backend_interest().contains(EventSet::IN));
    assert_eq!(rig.rx.used_flags(&*rig.mem).unwrap(), 0);
    assert_eq!(rig.interrupts(), 0);
    assert_eq!(rig.handler.rx_dropped(), 0);
    // A second look, without buffers, changes nothing.
    rig.handler.process_rx().unwrap();
    assert!(!rig.handler.backend_interest().contains(EventSet::IN));

    // The driver adds buffers and notifies: both frames arrive, in order.
    let (_, a) = rig.offer_rx(1526);
    let (_, b) = rig.offer_rx(1526);
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 2);
    assert_eq!(rig.read_guest(a + 12, 188), first[12..]);
    assert_eq!(rig.read_guest(b + 12, 288), second[12..]);
    assert!(rig.handler.backend_interest().contains(EventSet::IN));
    // The handler reads the backend again, so it no longer wants notifications.
    assert_eq!(
        rig.rx.used_flags(&*rig.mem).unwrap(),
        VRING_USED_F_NO_NOTIFY as u16
    );
    assert_eq!(rig.interrupts(), 1);
}

#[test]
fn with_mrg_rxbuf_too_few_buffers_leave_the_frame_waiting_and_the_chains_available() {
    let mut rig = rig(VERSION_1 | MRG_RXBUF | EVENT_IDX);
    let a = rig.offer_rx(4096);
    let b = rig.offer_rx(4096);
    let received = frame(10000, 16);
    rig.peer.send(&received).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 0);
    assert!(!rig.handler.backend_interest().contains(EventSet::IN));
    // The driver is to notify at the next buffer it adds.
    assert_eq!(rig.rx.avail_event(&*rig.mem).unwrap(), 2);

    let c = rig.offer_rx(4096);
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 3);
    let lens = [4096, 4096, 10000 - 8192];
    for (i, ((head, _), len)) in [a, b, c].iter().zip(lens).enumerate() {
        let idx = u16::try_from(i).unwrap();
        assert_eq!(
            rig.rx.used_elem(&*rig.mem, idx).unwrap(),
            (u32::from(*head), len)
        );
    }
    assert_eq!(rig.read_guest(a.1 + 10, 2), [3, 0], "num_buffers");
    assert_eq!(rig.read_guest(c.1, 1808), received[8192..]);
}

#[test]
fn with_mrg_rxbuf_a_frame_takes_at_most_the_queue_size_of_descriptors() {
    let mut rig = rig(VERSION_1 | MRG_RXBUF);
    // Three chains, each an indirect table of 100 buffers of 64 bytes: 6400 bytes.
    let mut heads = Vec::new();
    for _ in 0..3 {
        let buffers: Vec<MockBuffer> = (0..100)
            .map(|_| MockBuffer::writable(rig.alloc(64), 64))
            .collect();
        let table = rig.alloc(16 * buffers.len());
        let head = rig
            .rx
            .add_indirect_chain(&*rig.mem, GuestAddress(table), &buffers)
            .unwrap();
        heads.push(head);
    }
    // 300 descriptors would hold this frame: more than the queue's 256.
    rig.peer.send(&frame(3 * 6400, 18)).unwrap();
    // Two chains, 200 descriptors, hold this one.
    rig.peer.send(&frame(2 * 6400, 19)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.handler.rx_dropped(), 1);
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 2);
    for (i, head) in heads.iter().take(2).enumerate() {
        let idx = u16::try_from(i).unwrap();
        assert_eq!(
            rig.rx.used_elem(&*rig.mem, idx).unwrap(),
            (u32::from(*head), 6400)
        );
    }
}

#[test]
fn calls_and_pauses_are_served_within_a_few_budgets_while_both_directions_flood() {
    use crate::mock::EndlessNetwork;
    use crate::worker::Worker;
    use std::sync::atomic::AtomicBool;

    let mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
    let mut rx = MockDriver::new(QUEUE_SIZE, GuestAddress(RX_RING));
    let mut tx = MockDriver::new(QUEUE_SIZE, GuestAddress(TX_RING));
    // One receive buffer too small for any frame of the network, which never runs dry:
    // every frame read is dropped, and the buffer stays.
    rx.add_chain(&*mem, &[MockBuffer::writable(BUFFERS, 20)])
        .unwrap();
    // A transmit ring full of frames, which the guest offers again as soon as they are
    // used.
    for _ in 0..QUEUE_SIZE {
        tx.add_chain(&*mem, &[MockBuffer::readable(BUFFERS + 0x1000, 60)])
            .unwrap();
    }
    let (rx_kick, tx_kick) = (
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    let params = ActivateParams {
        mem: mem.clone(),
        features: VERSION_1,
        queues: vec![rx.queue(), tx.queue()],
        queue_evts: vec![rx_kick.try_clone().unwrap(), tx_kick.try_clone().unwrap()],
        interrupt: Arc::new(MmioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )),
        executor: WorkerGate::new().into(),
    };
    let handler = NetHandler::new(
        EndlessNetwork::new(100).unwrap(),
        NetRateLimiters::default(),
        params,
    )
    .unwrap();
    let metrics = handler.metrics().clone();
    let gate = WorkerGate::new();
    let worker = Worker::spawn("test-net-storm".into(), handler, &gate).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (mem, mut tx, stop) = (mem.clone(), tx.clone(), stop.clone());
        let kick = tx_kick.try_clone().unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tx.refill(&*mem).unwrap();
                let _ = kick.write(1);
                std::thread::yield_now();
            }
        })
    };
    tx_kick.write(1).unwrap();
    while tx.used_idx(&*mem).unwrap() == 0 || metrics.rx_fails.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    let dropped = || metrics.rx_fails.load(Ordering::Relaxed);
    for _ in 0..3 {
        let (sent, received) = (tx.used_idx(&*mem).unwrap(), dropped());
        let (sent_at, received_at) = worker
            .call(|h, _| {
                (
                    h.tx.next_used(),
                    h.metrics().rx_fails.load(Ordering::Relaxed),
                )
            })
            .unwrap();
        assert!(usize::from(sent_at.wrapping_sub(sent)) <= 3 * TX_BUDGET);
        assert!(received_at - received <= 3 * RX_BUDGET as u64);
    }
    let (sent, received) = (tx.used_idx(&*mem).unwrap(), dropped());
    gate.pause().unwrap();
    let (sent_at, received_at) = (tx.used_idx(&*mem).unwrap(), dropped());
    assert!(usize::from(sent_at.wrapping_sub(sent)) <= 3 * TX_BUDGET);
    assert!(received_at - received <= 3 * RX_BUDGET as u64);
    // Paused, it moves nothing.
    assert_eq!(worker.call(|h, _| h.tx.next_used()).unwrap(), sent_at);
    assert_eq!(dropped(), received_at);
    gate.resume().unwrap();
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    let handler = worker.stop().unwrap();
    assert!(!handler.is_broken());
    assert_eq!(rx.used_idx(&*mem).unwrap(), 0, "no frame fit the buffer");
}

#[test]
fn rx_frames_shorter_than_the_header_are_dropped() {
    let mut rig = rig(VERSION_1);
    let (head, _) = rig.offer_rx(1526);
    rig.peer.send(&[1, 2, 3]).unwrap();
    rig.peer.send(&frame(64, 17)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.handler.rx_dropped(), 1);
    assert_eq!(
        rig.rx.used_elem(&*rig.mem, 0).unwrap(),
        (u32::from(head), 64)
    );
}

#[test]
fn event_idx_suppresses_interrupts_as_the_driver_asks() {
    let mut rig = rig(VERSION_1 | EVENT_IDX);
    // The driver wants an interrupt once the used entry at index 2 is filled.
    rig.tx.set_used_event(&*rig.mem, 2).unwrap();
    let mut interrupts = Vec::new();
    for seed in 0..4 {
        rig.offer_tx(&frame(64, seed), &[]);
        rig.handler.process_tx().unwrap();
        interrupts.push(rig.interrupts());
    }
    // The first check has nothing to compare with, so it interrupts.
    assert_eq!(interrupts, [1, 0, 1, 0]);
    // The handler asks to be notified at the next chain.
    assert_eq!(rig.tx.avail_event(&*rig.mem).unwrap(), 4);

    // Three chains in one go pass used_event = 5 once: one interrupt.
    rig.tx.set_used_event(&*rig.mem, 5).unwrap();
    for seed in 0..3 {
        rig.offer_tx(&frame(64, seed), &[]);
    }
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.interrupts(), 1);

    // The same on the receive side.
    rig.rx.set_used_event(&*rig.mem, 0).unwrap();
    rig.offer_rx(1526);
    rig.offer_rx(1526);
    rig.peer.send(&frame(64, 18)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.interrupts(), 1);
    rig.peer.send(&frame(64, 19)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.interrupts(), 0, "used_event 0 is behind");
}

#[test]
fn no_interrupt_flag_suppresses_interrupts_without_event_idx() {
    let mut rig = rig(VERSION_1);
    rig.tx
        .set_avail_flags(&*rig.mem, VRING_AVAIL_F_NO_INTERRUPT as u16)
        .unwrap();
    rig.offer_tx(&frame(64, 20), &[]);
    rig.handler.process_tx().unwrap();
    assert!(rig.network_recv().is_some());
    assert_eq!(rig.interrupts(), 0);
}

#[test]
fn a_broken_transmit_queue_is_an_error() {
    let mut rig = rig(VERSION_1);
    // A head index outside the descriptor table.
    rig.tx.set_avail_entry(&*rig.mem, 0, QUEUE_SIZE).unwrap();
    rig.tx.set_avail_idx(&*rig.mem, 1).unwrap();
    let err = rig.handler.process_tx().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Queue {
                queue: "transmit",
                source: queue::Error::HeadIndexOutOfRange { .. }
            }
        ),
        "{err:?}"
    );
    assert_eq!(rig.network_recv(), None);
}

#[test]
fn tx_frames_move_their_counters_by_their_amounts() {
    let mut rig = rig(VERSION_1);
    let metrics = rig.handler.metrics().clone();
    let before = metrics.values();
    rig.offer_tx(&frame(1500, 1), &[100]);
    rig.offer_tx(&frame(60, 2), &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [
            ("tx_bytes_count", 1560),
            ("tx_packets_count", 2),
            ("tx_count", 2)
        ]
    );

    // A chain shorter than the header, and one too long.
    let before = metrics.values();
    rig.offer_tx(&[0u8; VNET_HDR_LEN - 1], &[]);
    rig.offer_tx(&frame(MAX_BUFFER_LEN + 1, 3), &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [("tx_malformed_frames", 2)]
    );

    // A frame held back by a full backend counts once, when it goes.
    rig.fill_backend();
    let sent = frame(700, 4);
    rig.offer_tx(&sent, &[]);
    rig.handler.process_tx().unwrap();
    let before = metrics.values();
    while rig.network_recv().is_some_and(|d| d.len() != sent.len()) {}
    rig.handler.process_tx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [
            ("tx_bytes_count", 700),
            ("tx_packets_count", 1),
            ("tx_count", 1)
        ]
    );
}

#[test]
fn rx_frames_move_their_counters_by_their_amounts() {
    let mut rig = rig(VERSION_1);
    let metrics = rig.handler.metrics().clone();
    rig.offer_rx(1526);
    rig.offer_rx(1526);
    let before = metrics.values();
    rig.peer.send(&frame(60, 1)).unwrap();
    rig.peer.send(&frame(1526, 2)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [
            ("rx_bytes_count", 1586),
            ("rx_packets_count", 2),
            ("rx_count", 2)
        ]
    );

    // Too short, too big for the one chain: read, and dropped.
    rig.offer_rx(1526);
    let before = metrics.values();
    rig.peer.send(&[1, 2, 3]).unwrap();
    rig.peer.send(&frame(1527, 3)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [("rx_fails", 2), ("rx_count", 2)]
    );

    // The chain the big frame did not fit is left for the next frame; the one after it
    // waits for a buffer, and counts as delivered once it is.
    let before = metrics.values();
    rig.peer.send(&frame(100, 4)).unwrap();
    rig.peer.send(&frame(200, 5)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [
            ("no_rx_avail_buffer", 1),
            ("rx_bytes_count", 100),
            ("rx_packets_count", 1),
            ("rx_count", 2)
        ]
    );
    rig.offer_rx(1526);
    let before = metrics.values();
    rig.handler.process_rx().unwrap();
    assert_eq!(
        counters_moved(&before, &metrics.values()),
        [("rx_bytes_count", 200), ("rx_packets_count", 1)]
    );
}

#[test]
fn a_throttled_tx_stops_and_resumes_when_the_timer_fires_and_drops_nothing() {
    // 4 KiB per 100 ms, the bucket full at the start: two 1500-byte frames go at once.
    let limiters = NetRateLimiters {
        tx: RateLimiter::new(bucket(4096, 100), None).unwrap(),
        ..NetRateLimiters::default()
    };
    let mut rig = rig_with(VERSION_1, limiters);
    let start = Instant::now();
    let frames: Vec<Vec<u8>> = (0..5).map(|seed| frame(1500, seed)).collect();
    for sent in &frames {
        rig.offer_tx(sent, &[]);
    }
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 2);
    assert!(rig.handler.is_tx_throttled());
    // The frame held back waits for the timer, not for the backend.
    assert!(!rig.handler.backend_interest().contains(EventSet::OUT));
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 2);
    let mut timer_events = 0;
    while rig.tx.used_idx(&*rig.mem).unwrap() < 5 {
        wait_timer(&rig.handler.rate_limiters().tx);
        rig.handler.rate_limiter_event(false).unwrap();
        timer_events += 1;
        assert!(timer_events <= 10, "the frames do not go");
    }
    // 7500 bytes through a bucket of 4096 refilled at 4096 per 100 ms: at least 83 ms.
    assert!(start.elapsed() >= Duration::from_millis(80));
    for sent in &frames {
        assert_eq!(&rig.network_recv().unwrap(), sent);
    }
    assert_eq!(rig.network_recv(), None);
    assert_eq!(rig.handler.tx_dropped(), 0);
    let metrics = rig.handler.metrics();
    assert_eq!(metrics.get("tx_packets_count"), Some(5));
    assert_eq!(
        metrics.get("tx_rate_limiter_event_count"),
        Some(timer_events)
    );
    assert!(metrics.get("tx_rate_limiter_throttled") >= Some(timer_events));
}

#[test]
fn a_throttled_rx_leaves_the_next_frames_in_the_backend_until_the_timer_fires() {
    // Two frames per 100 ms.
    let limiters = NetRateLimiters {
        rx: RateLimiter::new(None, bucket(2, 100)).unwrap(),
        ..NetRateLimiters::default()
    };
    let mut rig = rig_with(VERSION_1, limiters);
    let buffers: Vec<u64> = (0..5).map(|_| rig.offer_rx(1526).1).collect();
    let frames: Vec<Vec<u8>> = (0..5).map(|seed| frame(200, seed)).collect();
    for received in &frames {
        rig.peer.send(received).unwrap();
    }
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 2);
    assert!(rig.handler.is_rx_throttled());
    assert!(!rig.handler.backend_interest().contains(EventSet::IN));
    // The handler read the frame it holds and left the others in the backend.
    let metrics = rig.handler.metrics().clone();
    assert_eq!(metrics.get("rx_count"), Some(3));
    // A notification of the receive queue does not get round the limiter.
    rig.handler.process_rx().unwrap();
    assert_eq!(metrics.get("rx_count"), Some(3));
    let mut timer_events = 0;
    while rig.rx.used_idx(&*rig.mem).unwrap() < 5 {
        wait_timer(&rig.handler.rate_limiters().rx);
        rig.handler.rate_limiter_event(true).unwrap();
        timer_events += 1;
        assert!(timer_events <= 10, "the frames do not arrive");
    }
    assert!(rig.handler.backend_interest().contains(EventSet::IN));
    for (addr, received) in buffers.iter().zip(&frames) {
        assert_eq!(rig.read_guest(addr + 12, 188), received[12..]);
    }
    assert_eq!(metrics.get("rx_packets_count"), Some(5));
    assert_eq!(metrics.get("rx_fails"), Some(0));
    assert_eq!(
        metrics.get("rx_event_rate_limiter_count"),
        Some(timer_events)
    );
    assert!(metrics.get("rx_rate_limiter_throttled") >= Some(timer_events));
}

#[test]
fn a_frame_paid_for_is_not_charged_again_when_it_waits_for_buffers_or_the_backend() {
    // One operation per 10 s each way.
    let limiters = NetRateLimiters {
        rx: RateLimiter::new(None, bucket(1, 10_000)).unwrap(),
        tx: RateLimiter::new(None, bucket(1, 10_000)).unwrap(),
    };
    let mut rig = rig_with(VERSION_1, limiters);
    // No receive buffer yet: the frame is paid for and waits for one.
    let received = frame(300, 1);
    rig.peer.send(&received).unwrap();
    rig.handler.process_rx().unwrap();
    assert!(!rig.handler.is_rx_throttled());
    let (_, addr) = rig.offer_rx(1526);
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.read_guest(addr + 12, 288), received[12..]);
    // A full backend: the frame is paid for and waits for room.
    rig.fill_backend();
    let sent = frame(700, 2);
    rig.offer_tx(&sent, &[]);
    rig.handler.process_tx().unwrap();
    assert!(!rig.handler.is_tx_throttled());
    assert!(rig.handler.backend_interest().contains(EventSet::OUT));
    while rig.network_recv().is_some_and(|d| d.len() != sent.len()) {}
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.network_recv().unwrap(), sent);
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 1);
}

#[test]
fn an_update_lifts_a_throttled_direction_at_once_and_keeps_the_other() {
    let limiters = NetRateLimiters {
        rx: RateLimiter::new(None, bucket(1, 10_000)).unwrap(),
        tx: RateLimiter::new(None, bucket(1, 10_000)).unwrap(),
    };
    let mut rig = rig_with(VERSION_1, limiters);
    for seed in 0..3 {
        rig.offer_tx(&frame(100, seed), &[]);
    }
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 1);
    assert!(rig.handler.is_tx_throttled());
    rig.handler.update_rate_limiters(
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::Disabled,
    );
    // The timer fires at once, and the rest goes.
    wait_timer(&rig.handler.rate_limiters().tx);
    rig.handler.rate_limiter_event(false).unwrap();
    assert_eq!(rig.tx.used_idx(&*rig.mem).unwrap(), 3);
    assert!(!rig.handler.is_tx_throttled());
    // The receive limiter kept its bucket: one frame, then the wait.
    rig.offer_rx(1526);
    rig.offer_rx(1526);
    rig.peer.send(&frame(100, 1)).unwrap();
    rig.peer.send(&frame(100, 2)).unwrap();
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 1);
    assert!(rig.handler.is_rx_throttled());
    assert_eq!(
        rig.handler.rate_limiters().rx.ops().map(|b| b.config()),
        bucket(1, 10_000)
    );
}

/// A backend that answers every frame it is given itself, with `answers` frames that wait in
/// memory, as a VMM's metadata service does; its socket never becomes readable.
struct Answering {
    socket: UnixDatagram,
    answers: usize,
    pending: std::collections::VecDeque<Vec<u8>>,
}

impl Answering {
    fn new(socket: UnixDatagram, answers: usize) -> Self {
        Answering {
            socket,
            answers,
            pending: std::collections::VecDeque::new(),
        }
    }
}

impl AsRawFd for Answering {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

impl NetBackend for Answering {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.pending.pop_front() {
            Some(frame) => {
                buf[..frame.len()].copy_from_slice(&frame);
                Ok(frame.len())
            }
            None => self.socket.read_frame(buf),
        }
    }

    fn write_frame<M: vm_memory::GuestMemory + ?Sized>(
        &mut self,
        frame: &GuestIoVecs<'_, M>,
    ) -> io::Result<usize> {
        let mut copy = vec![0u8; frame.len()];
        frame.copy_to(&mut copy).map_err(io::Error::other)?;
        for i in 0..self.answers {
            let mut answer = copy.clone();
            answer[VNET_HDR_LEN..].reverse();
            answer.push(i as u8);
            self.pending.push_back(answer);
        }
        Ok(copy.len())
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn has_pending_frames(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[test]
fn frames_a_backend_holds_reach_the_guest_without_its_descriptor_readable() {
    let mut rig = rig_over(VERSION_1, NetRateLimiters::default(), |s| {
        Answering::new(s, 1)
    });
    let (_, addr) = rig.offer_rx(1526);
    let sent = frame(100, 3);
    rig.offer_tx(&sent, &[]);
    // The answer is delivered by the transmission that caused it.
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 1);
    let mut answer = sent[VNET_HDR_LEN..].to_vec();
    answer.reverse();
    answer.push(0);
    assert_eq!(rig.read_guest(addr + 12, 89), answer);
    assert!(rig.network_recv().is_none(), "nothing went to the network");

    // Without a receive buffer the answer waits, and the driver's next buffers take it.
    rig.offer_tx(&frame(60, 4), &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 1);
    assert!(!rig.handler.backend_interest().contains(EventSet::IN));
    let (_, addr) = rig.offer_rx(1526);
    rig.handler.process_rx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), 2);
    assert_eq!(rig.read_guest(addr + 12 + 48, 1), [0]);
    assert_eq!(rig.handler.rx_dropped(), 0);
}

#[test]
fn held_frames_past_the_rx_budget_bring_the_worker_back_through_the_rx_eventfd() {
    let answers = RX_BUDGET + 10;
    let mut rig = rig_over(VERSION_1, NetRateLimiters::default(), |s| {
        Answering::new(s, answers)
    });
    let big = 64 * 1024u32;
    let addr = rig.alloc(big as usize);
    // One large buffer per answer, each a chain of its own.
    for i in 0..u64::from(QUEUE_SIZE) {
        rig.rx
            .add_chain(&*rig.mem, &[MockBuffer::writable(addr + i * 128, 128)])
            .unwrap();
    }
    rig.offer_tx(&frame(40, 5), &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.rx.used_idx(&*rig.mem).unwrap(), RX_BUDGET as u16);
    // The handler left itself a wake-up for the rest.
    assert_eq!(rig.handler.rx_evt.read().unwrap(), 1);
}

#[test]
fn log_limiter_lets_one_through_per_interval_and_counts_the_rest() {
    let mut limiter = LogLimiter::default();
    assert_eq!(limiter.allow(), Some(0));
    assert_eq!(limiter.allow(), None);
    assert_eq!(limiter.allow(), None);
    limiter.last = Instant::now().checked_sub(LOG_INTERVAL);
    assert_eq!(limiter.allow(), Some(2));
}

#[test]
fn the_saved_queues_give_back_the_tx_chain_the_backend_holds() {
    let mut rig = rig(VERSION_1);
    rig.offer_rx(2048);
    let first = frame(100, 1);
    rig.offer_tx(&first, &[]);
    rig.handler.process_tx().unwrap();
    assert_eq!(rig.network_recv().unwrap(), first);
    let [rx, tx] = <[Queue; 2]>::try_from(rig.handler.saved_queues()).unwrap();
    assert_eq!(tx.next_avail(), 1);
    // No receive chain is taken before a frame arrives.
    assert_eq!((rx.next_avail(), rx.next_used()), (0, 0));

    rig.fill_backend();
    rig.offer_tx(&frame(1500, 2), &[]);
    rig.handler.process_tx().unwrap();
    assert!(rig.handler.backend_interest().contains(EventSet::OUT));
    let [_, tx] = <[Queue; 2]>::try_from(rig.handler.saved_queues()).unwrap();
    // The held chain is still available in the saved queue; the one sent is used.
    assert_eq!((tx.next_avail(), tx.next_used()), (1, 1));
}
