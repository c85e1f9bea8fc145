//! The virtio-vsock target: the packet header parser, and the connection state machine of
//! the Unix-socket backend driven by a guest and host processes at once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_virtio::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
use ember_virtio::vsock::{
    self, CONN_TX_BUF_SIZE, HDR_SIZE, MAX_CONNECTIONS, PacketHeader, VsockBackend, VsockHandler,
    VsockMetrics, VsockUnixBackend,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::virtio::{take_u8, take_u16};

/// The guest's context ID in the target.
pub const GUEST_CID: u64 = 3;
/// The most operations one input runs.
pub const MAX_OPS: usize = 64;
/// The most host streams one input holds at once.
pub const MAX_STREAMS: usize = 16;
/// The first of the four host ports the guest may reach (`<uds_path>_500` to `_503`).
pub const LISTEN_PORT: u32 = 500;

const MEM_SIZE: usize = 0x10_0000;
const QUEUE_SIZE: u16 = 64;
const RX_BUFS: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 4096 + 44;
const RX_SLOT: u64 = 0x1100;
const TX_BUFS: u64 = 0x8_0000;
const TX_SLOT: u64 = 0x200;
/// How many receive buffers the guest keeps handed over at most.
const RX_OUTSTANDING: u16 = 16;

type Mem = Arc<GuestMemoryMmap<()>>;
type Key = (u32, u32);

/// What the vsock target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockOutcome {
    /// Packets the guest transmitted.
    pub sent: usize,
    /// Packets the device handed the guest.
    pub received: usize,
    /// Of those, resets.
    pub resets: usize,
    /// Payload bytes the device handed the guest.
    pub rx_bytes: usize,
    /// Connections the device opened, from either side.
    pub conns_added: u64,
}

/// The guest's view of one connection, to check the device's flow control against.
#[derive(Clone, Copy, Debug, Default)]
struct Credit {
    buf_alloc: u32,
    fwd_cnt: u32,
    received: u32,
    /// The guest sent a packet the device may have dropped or reset the connection for: the
    /// guest's view and the device's may differ until the connection ends.
    unknown: bool,
}

/// One input's world: the guest's queues, the device's handler and the host processes.
struct World {
    mem: Mem,
    rx: MockDriver,
    tx: MockDriver,
    handler: VsockHandler<Mem, VsockUnixBackend>,
    path: PathBuf,
    dir: PathBuf,
    listeners: HashMap<u32, UnixListener>,
    streams: Vec<UnixStream>,
    rx_addrs: HashMap<u16, u64>,
    rx_slot: u64,
    rx_seen: u16,
    tx_slot: u64,
    /// Connections the host opened, as the guest saw their requests: (host port, guest port).
    requests: Vec<Key>,
    credit: HashMap<Key, Credit>,
    outcome: VsockOutcome,
}

impl World {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ember-fuzz-vsock-{}-{n}", std::process::id()));
        // Neither depends on the input: a failure is the host's, not a finding.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot make a socket directory");
        let path = dir.join("v.sock");
        let metrics = Arc::new(VsockMetrics::default());
        let backend = VsockUnixBackend::new(GUEST_CID, &path)
            .expect("cannot bind the socket")
            .with_metrics(metrics.clone());
        let mem = Arc::new(guest_memory(MEM_SIZE).expect("cannot map guest memory"));
        let rx = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let tx = MockDriver::new(QUEUE_SIZE, GuestAddress(0x4000));
        let ev = MockDriver::new(QUEUE_SIZE, GuestAddress(0x8000));
        let evt = || EventFd::new(EFD_NONBLOCK).expect("eventfds are available");
        let handler = VsockHandler::new(
            GUEST_CID,
            backend,
            mem.clone(),
            [rx.queue(), tx.queue(), ev.queue()],
            [evt(), evt(), evt()],
            Arc::new(CountingTrigger::default()),
        )
        .with_metrics(metrics);
        World {
            mem,
            rx,
            tx,
            handler,
            path,
            dir,
            listeners: HashMap::new(),
            streams: Vec::new(),
            rx_addrs: HashMap::new(),
            rx_slot: 0,
            rx_seen: 0,
            tx_slot: 0,
            requests: Vec::new(),
            credit: HashMap::new(),
            outcome: VsockOutcome::default(),
        }
    }

    /// Transmits a packet laid out from the input.
    fn packet(&mut self, data: &mut &[u8]) {
        let shape = take_u8(data);
        let op = u16::from(take_u8(data) % 8);
        let src = take_u8(data);
        let dst = take_u8(data);
        let flags = u32::from(take_u8(data) % 4);
        let buf_alloc = u32::from(take_u16(data)) << 4;
        let fwd_cnt = u32::from(take_u16(data)) << 4;
        let len = usize::from(take_u8(data));
        let (src_port, dst_port) = if dst & 0x80 != 0 && !self.requests.is_empty() {
            let (local, peer) = self.requests[usize::from(dst & 0x7f) % self.requests.len()];
            (peer, local)
        } else {
            (1000 + u32::from(src % 8), LISTEN_PORT + u32::from(dst % 6))
        };
        let header = PacketHeader {
            src_cid: if shape & 1 != 0 { 7 } else { GUEST_CID },
            dst_cid: if shape & 2 != 0 {
                9
            } else {
                vsock::VSOCK_HOST_CID
            },
            src_port,
            dst_port,
            // A length past the chain when asked.
            len: u32::try_from(len).unwrap_or(0) + u32::from(shape & 0x10 != 0),
            type_: if shape & 4 != 0 {
                2
            } else {
                vsock::TYPE_STREAM
            },
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        let payload = vec![src; len];
        let addr = TX_BUFS + (self.tx_slot % u64::from(QUEUE_SIZE)) * TX_SLOT;
        self.tx_slot += 1;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .expect("the buffer is in memory");
        self.mem
            .write_slice(&payload, GuestAddress(addr + 44))
            .expect("the buffer is in memory");
        let total = u32::try_from(HDR_SIZE + len).unwrap_or(0);
        let buffers = if shape & 8 != 0 {
            // The header split across two buffers.
            vec![
                MockBuffer::readable(addr, 10),
                MockBuffer::readable(addr + 10, total - 10),
            ]
        } else {
            vec![MockBuffer::readable(addr, total)]
        };
        self.tx
            .add_chain(&*self.mem, &buffers)
            .expect("the ring is in memory");
        self.outcome.sent += 1;
        // The guest's model of the connection's credit follows what the device accepts.
        let key = (dst_port, src_port);
        let valid = shape & 0x17 == 0;
        if valid && op == vsock::OP_RST {
            self.credit.remove(&key);
        } else if valid {
            let credit = self.credit.entry(key).or_default();
            if op == vsock::OP_REQUEST {
                // A new connection, or the end of the one there was.
                *credit = Credit::default();
            }
            credit.buf_alloc = buf_alloc;
            credit.fwd_cnt = fwd_cnt;
        } else {
            self.credit.entry(key).or_default().unknown = true;
        }
        self.handler
            .process_tx()
            .expect("the mock driver keeps the protocol");
        self.collect_rx();
    }

    /// Gives the device receive buffers, lets it fill them and checks each packet.
    fn receive(&mut self) {
        let used = self.rx.used_idx(&*self.mem).expect("the ring is in memory");
        let outstanding = self.rx.avail_idx().wrapping_sub(used);
        for _ in outstanding..RX_OUTSTANDING {
            let addr = RX_BUFS + (self.rx_slot % u64::from(QUEUE_SIZE)) * RX_SLOT;
            self.rx_slot += 1;
            let head = self
                .rx
                .add_chain(&*self.mem, &[MockBuffer::writable(addr, RX_BUF_LEN)])
                .expect("the ring is in memory");
            self.rx_addrs.insert(head, addr);
        }
        self.handler
            .process_rx()
            .expect("the mock driver keeps the protocol");
        self.collect_rx();
    }

    /// Checks the packets the device handed the guest since the last call, at once, so that
    /// they are checked against the credit the guest had given when they were made.
    fn collect_rx(&mut self) {
        let used = self.rx.used_idx(&*self.mem).expect("the ring is in memory");
        while self.rx_seen != used {
            let (head, len) = self
                .rx
                .used_elem(&*self.mem, self.rx_seen)
                .expect("the ring is in memory");
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = self.rx_addrs[&u16::try_from(head).expect("heads fit in 16 bits")];
            let mut bytes = [0u8; HDR_SIZE];
            self.mem
                .read_slice(&mut bytes, GuestAddress(addr))
                .expect("the buffer is in memory");
            self.check_packet(&PacketHeader::from_bytes(&bytes), len);
        }
    }

    /// Checks a packet the device handed the guest.
    fn check_packet(&mut self, header: &PacketHeader, used: u32) {
        self.outcome.received += 1;
        assert_eq!(header.src_cid, vsock::VSOCK_HOST_CID, "{header:?}");
        assert_eq!(header.dst_cid, GUEST_CID, "{header:?}");
        assert_eq!(header.type_, vsock::TYPE_STREAM, "{header:?}");
        assert!((1..=7).contains(&header.op), "{header:?}");
        assert!(header.len <= RX_BUF_LEN - 44, "{header:?}");
        assert_eq!(used, 44 + header.len, "{header:?}");
        if header.op != vsock::OP_RW {
            assert_eq!(header.len, 0, "{header:?}");
        }
        let key = (header.src_port, header.dst_port);
        match header.op {
            vsock::OP_RST => {
                self.outcome.resets += 1;
                self.credit.remove(&key);
            }
            vsock::OP_REQUEST => {
                assert!(header.src_port >= 1 << 30, "{header:?}");
                self.credit.remove(&key);
                if self.requests.len() < 128 {
                    self.requests.push(key);
                }
            }
            vsock::OP_RW => {
                self.outcome.rx_bytes += header.len as usize;
                if let Some(credit) = self.credit.get_mut(&key).filter(|c| !c.unknown) {
                    credit.received = credit.received.wrapping_add(header.len);
                    let in_flight = credit.received.wrapping_sub(credit.fwd_cnt);
                    assert!(
                        in_flight <= credit.buf_alloc,
                        "the device sent past the guest's credit: {credit:?}, {header:?}"
                    );
                }
            }
            _ => {}
        }
    }

    fn stream(&mut self, data: &mut &[u8]) -> Option<usize> {
        let index = usize::from(take_u8(data));
        (!self.streams.is_empty()).then(|| index % self.streams.len())
    }

    /// Runs one operation off the input; `false` when the input is spent.
    fn step(&mut self, data: &mut &[u8]) -> bool {
        if data.is_empty() {
            return false;
        }
        let kind = take_u8(data);
        match kind % 9 {
            0 => self.packet(data),
            1 => {
                let port = take_u8(data);
                if self.streams.len() < MAX_STREAMS {
                    if let Ok(mut stream) = UnixStream::connect(&self.path) {
                        let line = if port & 0x80 != 0 {
                            format!("CONNECT x{port}\n")
                        } else {
                            format!("CONNECT {}\n", 2000 + u32::from(port))
                        };
                        let _ = stream.write_all(line.as_bytes());
                        let _ = stream.set_nonblocking(true);
                        self.streams.push(stream);
                    }
                }
            }
            2 => {
                let len = usize::from(take_u8(data)) * 64;
                if let Some(i) = self.stream(data) {
                    let _ = self.streams[i].write(&vec![0x5a; len]);
                }
            }
            3 => {
                if let Some(i) = self.stream(data) {
                    let mut buf = [0u8; 4096];
                    for _ in 0..64 {
                        if !matches!(self.streams[i].read(&mut buf), Ok(1..)) {
                            break;
                        }
                    }
                }
            }
            4 => {
                if let Some(i) = self.stream(data) {
                    let _ = self.streams[i].shutdown(Shutdown::Write);
                }
            }
            5 => {
                if let Some(i) = self.stream(data) {
                    self.streams.swap_remove(i);
                }
            }
            6 => self.receive(),
            7 => {
                let port = LISTEN_PORT + u32::from(take_u8(data) % 4);
                if !self.listeners.contains_key(&port) {
                    let path = format!("{}_{port}", self.path.display());
                    if let Ok(listener) = UnixListener::bind(path) {
                        let _ = listener.set_nonblocking(true);
                        self.listeners.insert(port, listener);
                    }
                }
                for listener in self.listeners.values() {
                    while self.streams.len() < MAX_STREAMS {
                        let Ok((stream, _)) = listener.accept() else {
                            break;
                        };
                        let _ = stream.set_nonblocking(true);
                        self.streams.push(stream);
                    }
                }
            }
            _ => {
                // Twice: a connection the first accepts has its line read by the second.
                for _ in 0..2 {
                    self.handler
                        .backend_event(EventSet::IN)
                        .expect("the mock driver keeps the protocol");
                    self.collect_rx();
                }
            }
        }
        let backend = self.handler.backend();
        assert!(backend.connections() <= MAX_CONNECTIONS);
        assert!(
            backend.buffered_bytes() <= backend.connections() * CONN_TX_BUF_SIZE as usize,
            "more guest data held than the connections' credit"
        );
        true
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Drives a vsock device with its Unix-socket backend through a sequence of operations: the
/// guest's packets and receive buffers, and host processes that connect, write, read, shut
/// down and close.
///
/// Input: operations, each a kind byte (mod 9) and its arguments: 0, a guest packet (a shape
/// byte: bit 0 a wrong source CID, bit 1 a wrong destination CID, bit 2 a wrong type, bit 3
/// the header split across two buffers, bit 4 a length one past the chain; then the op mod 8,
/// the source and destination port selectors (bit 7 of the destination: a connection the host
/// opened), the flags, `buf_alloc` and `fwd_cnt` (16 bits, times 16) and the payload's length);
/// 1, a host process connects (a port byte; bit 7 a bad line); 2, a host stream writes (a
/// length byte, times 64, and the stream); 3, reads; 4, shuts its write half; 5, closes;
/// 6, the guest gives receive buffers and takes packets; 7, a host listener at
/// `<uds_path>_<500 + n mod 4>` (a byte), and accepts; 8, the backend handles its events
/// twice. At most [`MAX_OPS`].
///
/// Every packet the device hands the guest must come from the host's CID to the guest's, be a
/// stream packet with a known op, fit its buffer, carry a payload only when it is RW, and
/// stay within the credit the guest gave; the connections stay under the cap, and the guest
/// data held under their credit.
///
/// # Panics
///
/// Only on a finding.
pub fn virtio_vsock(mut data: &[u8]) -> VsockOutcome {
    let mut world = World::new();
    let data = &mut data;
    for _ in 0..MAX_OPS {
        if !world.step(data) {
            break;
        }
    }
    // Whatever is left reaches the guest.
    world.receive();
    world.outcome.conns_added = world
        .handler
        .metrics()
        .get("conns_added")
        .unwrap_or_default();
    world.handler.backend_mut().reset();
    world.outcome
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, check_seeds, corpus_dir, replay};

    const fn outcome(
        sent: usize,
        received: usize,
        resets: usize,
        rx_bytes: usize,
        conns_added: u64,
    ) -> VsockOutcome {
        VsockOutcome {
            sent,
            received,
            resets,
            rx_bytes,
            conns_added,
        }
    }

    /// The vsock target's seeds and what it makes of them.
    const VSOCK_SEEDS: &[(&str, VsockOutcome)] = &[
        ("empty", outcome(0, 0, 0, 0, 0)),
        ("host-connect", outcome(2, 2, 0, 64, 1)),
        ("guest-connect", outcome(2, 2, 0, 64, 1)),
        ("refused", outcome(1, 1, 1, 0, 0)),
        ("malformed", outcome(4, 0, 0, 0, 0)),
    ];

    /// A guest packet operation.
    #[allow(clippy::too_many_arguments)]
    fn packet(shape: u8, op: u8, src: u8, dst: u8, buf_alloc: u16, fwd: u16, len: u8) -> Vec<u8> {
        let mut bytes = vec![0, shape, op, src, dst, 0];
        bytes.extend_from_slice(&buf_alloc.to_le_bytes());
        bytes.extend_from_slice(&fwd.to_le_bytes());
        bytes.push(len);
        bytes
    }

    fn seeds() -> Seeds {
        let rw = vsock::OP_RW as u8;
        vec![
            ("empty", vec![]),
            (
                "host-connect",
                [
                    vec![1, 7], // CONNECT 2007
                    vec![8],    // the backend reads it
                    vec![6],    // the guest gets the REQUEST
                    packet(0, vsock::OP_RESPONSE as u8, 0, 0x80, 0x1000, 0, 0),
                    packet(0, rw, 0, 0x80, 0x1000, 0, 16),
                    vec![3, 0],    // the host reads OK and the data
                    vec![2, 1, 0], // the host writes 64 bytes
                    vec![8, 6],
                ]
                .concat(),
            ),
            (
                "guest-connect",
                [
                    vec![7, 1], // a listener at _501
                    packet(0, vsock::OP_REQUEST as u8, 0, 1, 0x1000, 0, 0),
                    vec![6, 7, 1], // RESPONSE; the listener accepts
                    packet(0, rw, 0, 1, 0x1000, 0, 32),
                    vec![2, 1, 0, 8, 6],
                ]
                .concat(),
            ),
            (
                "refused",
                [
                    packet(0, vsock::OP_REQUEST as u8, 0, 3, 0x1000, 0, 0),
                    vec![6],
                ]
                .concat(),
            ),
            (
                "malformed",
                [
                    packet(1, rw, 0, 0, 0x1000, 0, 8),
                    packet(2, rw, 0, 0, 0x1000, 0, 8),
                    packet(0x08, vsock::OP_RST as u8, 0, 0, 0, 0, 0),
                    packet(0x18, vsock::OP_RST as u8, 0, 0, 0, 0, 3),
                    vec![6],
                ]
                .concat(),
            ),
        ]
    }

    #[test]
    fn virtio_vsock_corpus_replays() {
        replay("virtio_vsock", VSOCK_SEEDS, virtio_vsock);
    }

    #[test]
    fn vsock_seeds_on_disk_are_the_generated_ones() {
        check_seeds(&[("virtio_vsock", seeds())]);
    }

    #[test]
    fn an_empty_input_does_nothing() {
        assert_eq!(virtio_vsock(&[]), VsockOutcome::default());
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_vsock_seed_corpus() {
        let dir = corpus_dir("virtio_vsock");
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds() {
            fs::write(dir.join(name), data).unwrap();
        }
    }
}
