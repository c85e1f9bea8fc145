//! A vsock device saved from one VMM and restored in another, as a snapshot does it, through
//! nothing but the crate's public API: the test is both VMMs and the guest's driver. A host
//! process and the guest exchange data over a connection; the workers are paused, the queues
//! and state saved (the state through postcard) and the device dropped. A new device, bound
//! at the same path in the same guest memory and activated with the saved queues, tells the
//! guest at once that its connections are gone (TRANSPORT_RESET), answers the packet the guest
//! sent before the snapshot with a reset, serves nothing twice, and carries new connections.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ember_virtio::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
use ember_virtio::vsock::{
    self, EVENT_TRANSPORT_RESET, Error, HDR_SIZE, PacketHeader, Vsock, VsockState,
};
use ember_virtio::{ActivateParams, Queue, StateError, VirtioDevice, WorkerGate};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

type Mem = Arc<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x40_0000;
const GUEST_CID: u64 = 7;
const RX_BUFS: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 0x1000;
const TX_BUFS: u64 = 0x20_0000;
const EV_BUFS: u64 = 0x30_0000;
const QSIZE: u16 = 64;
const TIMEOUT: Duration = Duration::from_secs(10);

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-vsock-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// The guest's driver: its memory, its three queues, and what it has read so far.
struct Guest {
    mem: Mem,
    rx: MockDriver,
    tx: MockDriver,
    ev: MockDriver,
    rx_seen: u16,
    tx_slot: u64,
}

impl Guest {
    fn new() -> Self {
        let mut guest = Guest {
            mem: Arc::new(guest_memory(MEM_SIZE).unwrap()),
            rx: MockDriver::new(QSIZE, GuestAddress(0)),
            tx: MockDriver::new(QSIZE, GuestAddress(0x1_0000)),
            ev: MockDriver::new(QSIZE, GuestAddress(0x2_0000)),
            rx_seen: 0,
            tx_slot: 0,
        };
        // Receive buffers, one per descriptor, each at the address of its head.
        for i in 0..QSIZE {
            let addr = RX_BUFS + u64::from(i) * u64::from(RX_BUF_LEN);
            let head = guest
                .rx
                .add_chain(&*guest.mem, &[MockBuffer::writable(addr, RX_BUF_LEN)])
                .unwrap();
            assert_eq!(head, i);
        }
        // Four event buffers, filled with a pattern that is no event.
        for i in 0..4u64 {
            let addr = EV_BUFS + i * 0x10;
            guest
                .mem
                .write_slice(&[0xff; 4], GuestAddress(addr))
                .unwrap();
            guest
                .ev
                .add_chain(&*guest.mem, &[MockBuffer::writable(addr, 4)])
                .unwrap();
        }
        guest
    }

    fn queues(&self) -> Vec<Queue> {
        vec![self.rx.queue(), self.tx.queue(), self.ev.queue()]
    }

    /// Makes a packet available on the transmit queue.
    fn transmit(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
        let header = PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: vsock::VSOCK_HOST_CID,
            src_port,
            dst_port,
            len: u32::try_from(payload.len()).unwrap(),
            type_: vsock::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: vsock::CONN_TX_BUF_SIZE,
            fwd_cnt: 0,
        };
        let addr = TX_BUFS + (self.tx_slot % u64::from(QSIZE)) * 0x1000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_SIZE as u64))
            .unwrap();
        let len = u32::try_from(HDR_SIZE + payload.len()).unwrap();
        self.tx
            .add_chain(&*self.mem, &[MockBuffer::readable(addr, len)])
            .unwrap();
    }

    /// The packets the device put in the receive queue since the last call.
    fn received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut packets = Vec::new();
        let used = self.rx.used_idx(&*self.mem).unwrap();
        while self.rx_seen != used {
            let (head, len) = self.rx.used_elem(&*self.mem, self.rx_seen).unwrap();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BUFS + u64::from(head) * u64::from(RX_BUF_LEN);
            let mut bytes = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let header = PacketHeader::from_bytes(&bytes);
            let mut payload = vec![0u8; header.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            assert_eq!(len as usize, HDR_SIZE + payload.len());
            packets.push((header, payload));
        }
        packets
    }

    /// Waits for a packet with `op` in the receive queue and returns it; packets before it
    /// are returned too, in order.
    fn receive_until(&mut self, op: u16) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut packets = Vec::new();
        wait_for("a packet", || {
            packets.extend(self.received());
            packets.iter().any(|(h, _)| h.op == op)
        });
        packets
    }

    fn event_used(&self) -> u16 {
        self.ev.used_idx(&*self.mem).unwrap()
    }
}

/// One VMM process's side of the device: its notification eventfds and its worker gate.
struct Host {
    kicks: Vec<EventFd>,
    gate: WorkerGate,
}

impl Host {
    fn new() -> Self {
        Host {
            kicks: (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            gate: WorkerGate::new(),
        }
    }

    fn activate(&self, vsock: &mut Vsock, mem: &Mem, queues: Vec<Queue>) {
        VirtioDevice::<Mem>::activate(
            vsock,
            ActivateParams::new(
                mem.clone(),
                vsock::FEATURES,
                queues,
                self.kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
                Arc::new(CountingTrigger::default()),
                self.gate.clone(),
            ),
        )
        .unwrap();
    }

    fn kick(&self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
    }
}

/// A host process connects to the guest's `port`; the guest accepts. Returns the stream and
/// the host-side port the device chose.
fn connect(guest: &mut Guest, host: &Host, path: &PathBuf, port: u32) -> (UnixStream, u32) {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let packets = guest.receive_until(vsock::OP_REQUEST);
    let (request, _) = packets.last().unwrap();
    assert_eq!((request.dst_cid, request.dst_port), (GUEST_CID, port));
    let local = request.src_port;
    guest.transmit(vsock::OP_RESPONSE, port, local, &[]);
    host.kick(vsock::TX_QUEUE);
    let mut line = Vec::new();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert_eq!(line, format!("OK {local}\n").as_bytes());
    (stream, local)
}

/// Bytes go both ways over an established connection.
fn exchange(guest: &mut Guest, host: &Host, stream: &mut UnixStream, port: u32, local: u32) {
    stream.write_all(b"from the host").unwrap();
    let packets = guest.receive_until(vsock::OP_RW);
    let (header, payload) = packets.iter().find(|(h, _)| h.op == vsock::OP_RW).unwrap();
    assert_eq!((header.src_port, header.dst_port), (local, port));
    assert_eq!(payload, b"from the host");
    guest.transmit(vsock::OP_RW, port, local, b"from the guest");
    host.kick(vsock::TX_QUEUE);
    let mut back = [0u8; 14];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"from the guest");
}

#[test]
fn a_restored_vsock_resets_the_guests_connections_at_once_and_serves_new_ones() {
    let path = socket_path("restore.sock");
    let mut guest = Guest::new();
    let first = Host::new();
    let mut vsock = Vsock::new(GUEST_CID, &path).unwrap();
    first.activate(&mut vsock, &guest.mem, guest.queues());
    let (mut old_stream, old_local) = connect(&mut guest, &first, &path, 52);
    exchange(&mut guest, &first, &mut old_stream, 52, old_local);
    assert_eq!(guest.event_used(), 0);

    // The VM is paused; the guest had one more packet for the connection made available (its
    // notification is lost with the old process). Then the snapshot is taken.
    first.gate.pause().unwrap();
    guest.transmit(vsock::OP_RW, 52, old_local, b"late");
    first.kick(vsock::TX_QUEUE);
    let saved = VirtioDevice::<Mem>::save_queues(&vsock).unwrap();
    assert_eq!(saved.len(), 3);
    let tx_taken = saved[vsock::TX_QUEUE].next_used();
    assert_eq!(
        saved[vsock::TX_QUEUE].next_avail(),
        tx_taken,
        "nothing held"
    );
    assert_eq!(saved[vsock::EV_QUEUE].next_avail(), 0, "event buffers left");
    let rx_used = saved[vsock::RX_QUEUE].next_used();
    assert_eq!(saved[vsock::RX_QUEUE].next_avail(), rx_used, "nothing held");
    let bytes = postcard::to_stdvec(&vsock.save_state()).unwrap();
    // The old process ends: its host streams close and its socket path is free. (A process
    // that exits takes its worker threads along; here the device is reset to stop its own.)
    VirtioDevice::<Mem>::reset(&mut vsock);
    drop(vsock);
    let mut buf = [0u8; 8];
    assert_eq!(old_stream.read(&mut buf).unwrap(), 0);

    // A new process binds the same path and restores the device.
    let state: VsockState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(state.guest_cid, GUEST_CID);
    let second = Host::new();
    let mut restored = Vsock::from_state(&state, &path).unwrap();
    let mut cid = [0u8; 8];
    VirtioDevice::<Mem>::read_config(&restored, 0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    second.activate(&mut restored, &guest.mem, saved);

    // The transport reset is in the event queue's first buffer as the activation returns,
    // and in no other.
    assert_eq!(guest.event_used(), 1);
    let (head, len) = guest.ev.used_elem(&*guest.mem, 0).unwrap();
    assert_eq!((head, len), (0, 4));
    let event: u32 = guest.mem.read_obj(GuestAddress(EV_BUFS)).unwrap();
    assert_eq!(event, EVENT_TRANSPORT_RESET);
    let untouched: u32 = guest.mem.read_obj(GuestAddress(EV_BUFS + 0x10)).unwrap();
    assert_eq!(untouched, u32::MAX);

    // The late packet is taken, once, and answered with a reset: its connection is gone.
    wait_for("the late packet", || {
        guest.tx.used_idx(&*guest.mem).unwrap() == tx_taken.wrapping_add(1)
    });
    let packets = guest.receive_until(vsock::OP_RST);
    assert_eq!(packets.len(), 1, "nothing served twice: {packets:?}");
    let (rst, _) = &packets[0];
    assert_eq!((rst.src_port, rst.dst_port), (old_local, 52));

    // A new connection works both ways.
    let (mut stream, local) = connect(&mut guest, &second, &path, 53);
    exchange(&mut guest, &second, &mut stream, 53, local);
    assert_eq!(guest.event_used(), 1, "one reset only");
    assert_eq!(restored.metrics().get("tx_queue_event_fails"), Some(0));
    assert_eq!(restored.metrics().get("ev_queue_event_fails"), Some(0));
    VirtioDevice::<Mem>::reset(&mut restored);
}

#[test]
fn a_restored_vsock_without_event_buffers_sends_the_reset_when_the_guest_gives_one() {
    let path = socket_path("late-event.sock");
    let mem: Mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
    let drivers: Vec<MockDriver> = (0..3u64)
        .map(|i| MockDriver::new(QSIZE, GuestAddress(i * 0x1_0000)))
        .collect();
    let host = Host::new();
    let state = VsockState {
        guest_cid: GUEST_CID,
    };
    let mut vsock = Vsock::from_state(&state, &path).unwrap();
    host.activate(
        &mut vsock,
        &mem,
        drivers.iter().map(MockDriver::queue).collect(),
    );
    let mut ev = drivers[2].clone();
    assert_eq!(ev.used_idx(&*mem).unwrap(), 0);
    ev.add_chain(&*mem, &[MockBuffer::writable(EV_BUFS, 4)])
        .unwrap();
    host.kick(vsock::EV_QUEUE);
    wait_for("the reset", || ev.used_idx(&*mem).unwrap() == 1);
    let event: u32 = mem.read_obj(GuestAddress(EV_BUFS)).unwrap();
    assert_eq!(event, EVENT_TRANSPORT_RESET);
    VirtioDevice::<Mem>::reset(&mut vsock);
}

#[test]
fn states_that_do_not_fit_the_vsock_device_are_refused() {
    let path = socket_path("refused.sock");
    let mut vsock = Vsock::new(GUEST_CID, &path).unwrap();
    let invalid = |result: Result<(), StateError>| match result {
        Err(StateError::Invalid(why)) => why,
        other => panic!("{other:?}"),
    };
    // Another guest's CID, or a reserved one.
    let why = invalid(vsock.restore_state(&VsockState { guest_cid: 8 }));
    assert!(why.contains('8'), "{why}");
    for cid in [0, 2, u64::from(u32::MAX), u64::MAX] {
        invalid(vsock.restore_state(&VsockState { guest_cid: cid }));
    }
    let other = socket_path("refused-other.sock");
    assert!(matches!(
        Vsock::from_state(&VsockState { guest_cid: 2 }, &other),
        Err(Error::InvalidCid(2))
    ));
    assert!(!other.exists(), "nothing was bound for a refused state");
    // No queues to save before activation; no state to restore after.
    assert!(matches!(
        VirtioDevice::<Mem>::save_queues(&vsock),
        Err(StateError::NotActive)
    ));
    let guest = Guest::new();
    let host = Host::new();
    host.activate(&mut vsock, &guest.mem, guest.queues());
    let state = vsock.save_state();
    invalid(vsock.restore_state(&state));
    // The refused restore sent no reset.
    assert_eq!(guest.event_used(), 0);
    VirtioDevice::<Mem>::reset(&mut vsock);
    assert!(matches!(
        VirtioDevice::<Mem>::save_queues(&vsock),
        Err(StateError::NotActive)
    ));
    // A truncated file is an error of the decoder, never a panic.
    let bytes = postcard::to_stdvec(&state).unwrap();
    for len in 0..bytes.len() {
        assert!(postcard::from_bytes::<VsockState>(&bytes[..len]).is_err());
    }
}
