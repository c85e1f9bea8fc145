//! The virtio targets: descriptor chains a guest lays out, and the MMIO register interface it
//! drives.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, OnceLock};

use ember_virtio::block::request::{Request, RequestType, status_addr};
use ember_virtio::block::{Disk, RawFile, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use ember_virtio::mmio::{CONFIG_OFFSET, MmioTransport};
use ember_virtio::mock::{CountingTrigger, MockDevice, MockDriver};
use ember_virtio::net::{MAX_BUFFER_LEN, NetHandler, NetRateLimiters, VNET_HDR_LEN};
use ember_virtio::{ActivateParams, Descriptor, DescriptorChain, Queue, WorkerGate};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory of the virtio targets: two regions with a hole between them, so that buffers
/// can straddle the hole or run off the end.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x8000), (0xc000, 0x4000)];

/// The largest queue the virtqueue target lays out.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Fresh guest memory for one input.
pub fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(addr, len)| (GuestAddress(addr), len))
        .collect();
    // Does not depend on the input: a failure is the host's, not a finding.
    GuestMemoryMmap::from_ranges(&ranges).expect("cannot map guest memory")
}

/// Takes `n` bytes off the front of `data` (fewer if it is shorter).
pub(crate) fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

pub(crate) fn take_u16(data: &mut &[u8]) -> u16 {
    let bytes = take(data, 2);
    u16::from_le_bytes([
        bytes.first().copied().unwrap_or(0),
        bytes.get(1).copied().unwrap_or(0),
    ])
}

pub(crate) fn take_u8(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

/// What the virtqueue target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Chains popped, served and returned.
    pub chains: usize,
    /// Entries the queue refused as invalid.
    pub errors: usize,
}

/// Lays out a queue from `data` and serves it until it is empty.
///
/// Input: one byte whose value mod 9 is log2 of the queue size, one flags byte (bit 0:
/// EVENT_IDX), the available index, the device's next available index and `used_event` (16 bits
/// each, little-endian); the rest is copied into guest memory from the descriptor table on:
/// descriptors, the available ring's entries and, past them, indirect tables and buffers.
///
/// Every chain the queue hands out must hold validated buffers inside guest memory, readable
/// ones first, of a total length that fits in 32 bits, and be handed back; every invalid one
/// must be an error; the queue must run dry within one pass over the ring.
///
/// # Panics
///
/// Only on a finding.
pub fn virtqueue(data: &[u8]) -> QueueOutcome {
    let (mem, mut queue) = lay_out_queue(data);
    serve(&mem, &mut queue, |chain| {
        check_chain(&mem, chain);
        let written = chain
            .write_from(&mem, &[0xa5; 64])
            .expect("validated buffers are writable");
        u32::try_from(written).expect("at most 64 bytes")
    })
}

/// The guest memory and the queue an input of the queue targets lays out (see [`virtqueue`]).
fn lay_out_queue(mut data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let data = &mut data;
    let size = 1u16 << (take_u8(data) % 9);
    let flags = take_u8(data);
    let avail_idx = take_u16(data);
    let next_avail = take_u16(data);
    let used_event = take_u16(data);

    let mem = guest_memory();
    let mut driver = MockDriver::new(size, GuestAddress(0));
    // Writes what fits of the rest into the first region, from the descriptor table on.
    let rest = take(data, REGIONS[0].1);
    mem.write_slice(rest, driver.desc_table())
        .expect("the first region holds the copy");
    driver
        .set_avail_idx(&mem, avail_idx)
        .expect("the ring is in memory");
    driver
        .set_used_event(&mem, used_event)
        .expect("the ring is in memory");

    let mut queue = driver.queue();
    queue
        .validate(&mem)
        .expect("the mock driver's rings are valid");
    queue.set_event_idx(flags & 1 != 0);
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_avail);
    (mem, queue)
}

/// Pops every chain the queue hands out, serves it with `serve` (which returns the used
/// length) and hands it back; checks that the queue runs dry within one pass over the ring.
fn serve(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(&DescriptorChain) -> u32,
) -> QueueOutcome {
    let mut outcome = QueueOutcome::default();
    // Each pop consumes an entry or ends the loop, so one pass over the ring is the most work.
    for _ in 0..=usize::from(queue.size()) {
        match queue.pop(mem) {
            Ok(Some(chain)) => {
                assert!(chain.head_index() < queue.size(), "head outside the table");
                let used = serve(&chain);
                queue
                    .add_used(mem, chain.head_index(), used)
                    .expect("a popped head goes back");
                outcome.chains += 1;
            }
            Ok(None) => break,
            Err(_) => outcome.errors += 1,
        }
    }
    assert!(
        matches!(queue.pop(mem), Ok(None) | Err(_)),
        "the queue serves more chains than its ring holds"
    );
    queue
        .needs_notification(mem)
        .expect("the used ring is in memory");
    queue
        .enable_notification(mem)
        .expect("the rings are in memory");
    outcome
}

fn check_chain(mem: &GuestMemoryMmap, chain: &DescriptorChain) {
    assert!(!chain.descriptors().is_empty(), "a chain without buffers");
    let mut total = 0u64;
    let mut seen_writable = false;
    for desc in chain.descriptors() {
        let len = usize::try_from(desc.len).expect("32-bit lengths fit");
        assert!(
            len == 0 || GuestMemoryBackend::check_range(mem, desc.addr, len),
            "buffer {desc:?} outside guest memory"
        );
        assert!(
            desc.writable || !seen_writable,
            "readable buffer after a writable one"
        );
        seen_writable |= desc.writable;
        total += u64::from(desc.len);
    }
    assert!(total <= u64::from(u32::MAX), "chain longer than 4 GiB");
    assert_eq!(
        u64::from(chain.readable_len()) + u64::from(chain.writable_len()),
        total
    );
}

/// Sectors of the block target's disk.
pub const DISK_SECTORS: u64 = 128;

/// The block target's disk image, made once per process: an unlinked file, reached through
/// its descriptor, so that nothing is left behind.
fn disk_image() -> &'static std::path::Path {
    static IMAGE: OnceLock<(std::fs::File, std::path::PathBuf)> = OnceLock::new();
    let (_, path) = IMAGE.get_or_init(|| {
        let name = std::env::temp_dir().join(format!("ember-fuzz-disk-{}", std::process::id()));
        let len = usize::try_from(DISK_SECTORS * 512).expect("64 KiB fit");
        std::fs::write(&name, vec![0x5a; len]).expect("cannot write the disk image");
        // Read-write: the drive at `/proc/self/fd/N` is this very descriptor, and a drive that
        // is not read-only needs one open for writing.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .expect("cannot open the disk image");
        std::fs::remove_file(&name).expect("cannot unlink the disk image");
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    });
    path
}

/// What the block target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOutcome {
    /// Chains served and errors, as for [`virtqueue`].
    pub queue: QueueOutcome,
    /// Chains that parsed as requests.
    pub requests: usize,
    /// Requests that completed with VIRTIO_BLK_S_OK.
    pub ok: usize,
}

/// Lays out a queue from `data` as [`virtqueue`] does, and serves every chain as a block
/// request against a 64 KiB disk (read-only when bit 1 of the flags byte is set).
///
/// Every chain that parses must be a request inside the disk, of whole sectors for reads and
/// writes, and its status byte must end up OK, IOERR or UNSUPP; the used length never exceeds
/// the chain's writable part.
///
/// # Panics
///
/// Only on a finding.
pub fn block_request(data: &[u8]) -> BlockOutcome {
    let read_only = data.get(1).is_some_and(|flags| flags & 2 != 0);
    let (mem, mut queue) = lay_out_queue(data);
    let backend = RawFile::open(disk_image(), read_only).expect("the image opens");
    let mut disk = Disk::new(backend, read_only, "fuzz").expect("the image opens");
    let mut outcome = BlockOutcome::default();
    outcome.queue = serve(&mem, &mut queue, |chain| {
        let parsed = Request::parse(chain, &mem, DISK_SECTORS);
        if let Ok(request) = &parsed {
            outcome.requests += 1;
            check_request(request, chain);
        }
        let used = disk.handle(&mem, chain);
        assert!(used <= chain.writable_len(), "used length past the chain");
        if let Some(addr) = status_addr(chain).filter(|_| used > 0) {
            let status: u8 = mem.read_obj(addr).expect("the status byte is in memory");
            assert!(
                [STATUS_OK, STATUS_IOERR, STATUS_UNSUPP].contains(&status),
                "status {status}"
            );
            if parsed.is_ok() && status == STATUS_OK {
                outcome.ok += 1;
            }
        }
        used
    });
    outcome
}

fn check_request(request: &Request<'_>, chain: &DescriptorChain) {
    let inside = |sector: u64, sectors: u64| {
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= DISK_SECTORS)
    };
    match request.request_type() {
        RequestType::In { sector, len } | RequestType::Out { sector, len } => {
            assert_eq!(len % 512, 0, "a read or write of part of a sector");
            assert!(inside(sector, u64::from(len) / 512), "I/O past the disk");
            let data: u64 = request.data().map(|d| u64::from(d.len)).sum();
            assert_eq!(data, u64::from(len), "data buffers of another length");
        }
        RequestType::Discard(segment) | RequestType::WriteZeroes(segment) => {
            assert!(
                inside(segment.sector, u64::from(segment.num_sectors)),
                "a segment past the disk"
            );
        }
        RequestType::Flush | RequestType::GetId { .. } => {}
        // A type added later is checked by its own arm once the target knows it.
        _ => {}
    }
    assert!(chain.writable_len() >= 1, "a request without a status byte");
}

/// The features the transport target's device offers: VERSION_1, EVENT_IDX and bit 0.
pub const TRANSPORT_FEATURES: u64 = (1 << 32) | (1 << 29) | 1;

/// What the transport target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportOutcome {
    /// Register accesses made.
    pub accesses: usize,
    /// Times the device was activated.
    pub activations: usize,
}

/// Drives an MMIO transport (over a device with two queues of up to 16 entries) through a
/// sequence of register accesses.
///
/// Input: accesses of 8 bytes each: a kind byte (bit 0: write), the offset in the register
/// page (16 bits, little-endian, taken mod 0x200: registers and some configuration space), a
/// size byte (mod 4 selects 1, 2, 4 or 8 bytes) and a 32-bit value.
///
/// After every access the status must be one the transition table reaches, the device must be
/// active exactly when DRIVER_OK is set without DEVICE_NEEDS_RESET, and every activation must
/// hand over ready, valid queues.
///
/// # Panics
///
/// Only on a finding.
pub fn mmio_transport(mut data: &[u8]) -> TransportOutcome {
    let data = &mut data;
    let mem = Arc::new(guest_memory());
    let (device, log) = MockDevice::new(2, &[16, 16], TRANSPORT_FEATURES, &[1, 2, 3, 4, 5, 6]);
    let mut transport = MmioTransport::new(
        mem.clone(),
        Box::new(device),
        CountingTrigger::default(),
        WorkerGate::new(),
    )
    .expect("eventfds are available");
    let mut outcome = TransportOutcome::default();
    while data.len() >= 8 {
        let kind = take_u8(data);
        let offset = u64::from(take_u16(data) % 0x200);
        let len = [1, 2, 4, 8][usize::from(take_u8(data) % 4)];
        let value = take(data, 4);
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(value);
        if kind & 1 == 0 {
            transport.read(offset, &mut bytes[..len]);
            if offset >= CONFIG_OFFSET + 6 {
                assert!(
                    bytes[..len].iter().all(|&b| b == 0),
                    "config read past its end"
                );
            }
        } else {
            transport.write(offset, &bytes[..len]);
        }
        outcome.accesses += 1;
        check_transport(&transport, mem.as_ref(), &log.lock().expect("not poisoned"));
    }
    outcome.activations = log.lock().expect("not poisoned").activations.len();
    outcome
}

fn check_transport(
    transport: &MmioTransport<Arc<GuestMemoryMmap>, MockDevice>,
    mem: &GuestMemoryMmap,
    log: &ember_virtio::mock::MockDeviceLog,
) {
    const FAILED: u32 = 0x80;
    const NEEDS_RESET: u32 = 0x40;
    let status = transport.status() & !(FAILED | NEEDS_RESET);
    assert!(
        [0, 1, 3, 11, 15].contains(&status),
        "status {status:#x} is not reachable"
    );
    let active = log.activations.len().checked_sub(log.resets);
    assert!(
        matches!(active, Some(0 | 1)),
        "{} activations, {} resets",
        log.activations.len(),
        log.resets
    );
    if let Some((features, queues)) = log.activations.last().filter(|_| active == Some(1)) {
        assert!(transport.is_activated(), "device active without DRIVER_OK");
        assert_eq!(features & !TRANSPORT_FEATURES, 0, "unoffered features");
        for queue in queues {
            assert!(queue.ready(), "activated with a queue not ready");
            queue
                .validate(mem)
                .expect("activated with an invalid queue");
        }
    }
}

/// Where the net target lays out its receive queue.
pub const NET_RX_RING: u64 = 0;
/// Where the net target lays out its transmit queue.
pub const NET_TX_RING: u64 = 0x2000;
/// The most frames the net target's network sends the device in one input.
pub const NET_MAX_FRAMES: u8 = 8;

/// VIRTIO_F_VERSION_1.
const VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX.
const EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_NET_F_MRG_RXBUF.
const MRG_RXBUF: u64 = 1 << 15;

/// What the net target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetOutcome {
    /// Frames the network received from the device.
    pub sent: usize,
    /// Used elements the device returned on the transmit queue.
    pub tx_used: usize,
    /// Used elements the device returned on the receive queue.
    pub rx_used: usize,
    /// Transmit chains the device dropped.
    pub tx_dropped: u64,
    /// Received frames the device dropped.
    pub rx_dropped: u64,
}

/// One queue of the net target: its header fields in the input, its driver and the chains its
/// ring held before the device ran.
struct NetQueue {
    driver: MockDriver,
    queue: Queue,
    avail_idx: u16,
    used_event: u16,
    next_avail: u16,
}

impl NetQueue {
    /// Reads the queue's header fields off `data`: the size's log2 (mod 9), the available
    /// index, the device's next available index and `used_event`.
    fn decode(data: &mut &[u8], base: u64) -> Self {
        let size = 1u16 << (take_u8(data) % 9);
        let avail_idx = take_u16(data);
        let next_avail = take_u16(data);
        let used_event = take_u16(data);
        let driver = MockDriver::new(size, GuestAddress(base));
        let queue = driver.queue();
        NetQueue {
            driver,
            queue,
            avail_idx,
            used_event,
            next_avail,
        }
    }

    /// Writes the indices to guest memory and hands the queue over as the transport does.
    fn activate(&mut self, mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
        self.driver
            .set_avail_idx(mem, self.avail_idx)
            .expect("the ring is in memory");
        self.driver
            .set_used_event(mem, self.used_event)
            .expect("the ring is in memory");
        self.queue
            .validate(mem)
            .expect("the mock driver's rings are valid");
        self.queue.set_event_idx(event_idx);
        self.queue.set_next_avail(self.next_avail);
        self.queue.set_next_used(self.next_avail);
        // The device never reads the used index; setting it to where the device starts tells
        // the elements it adds from what the guest left there.
        let used_idx = GuestAddress(self.driver.used_ring().0 + 2);
        mem.write_obj(self.next_avail.to_le(), used_idx)
            .expect("the ring is in memory");
        self.queue.clone()
    }

    /// The chains the ring holds now, by head, popped from a copy of the queue.
    fn chains(&self, mem: &GuestMemoryMmap) -> HashMap<u16, Vec<Descriptor>> {
        let mut queue = self.queue.clone();
        let mut chains = HashMap::new();
        for _ in 0..=usize::from(queue.size()) {
            match queue.pop(mem) {
                Ok(Some(chain)) => {
                    chains.insert(chain.head_index(), chain.descriptors().to_vec());
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
        chains
    }

    /// The guest memory of the rings: the descriptor table to the end of the used ring.
    fn rings(&self) -> (u64, u64) {
        let end = self.driver.used_ring().0 + 6 + 8 * u64::from(self.driver.size());
        (self.driver.desc_table().0, end)
    }

    /// The used elements the device added, as (head, length); empty when the ring's index in
    /// memory says more than a ring's worth.
    fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let used_idx = self.driver.used_idx(mem).expect("the ring is in memory");
        let count = used_idx.wrapping_sub(self.next_avail);
        if count > self.driver.size() {
            return Vec::new();
        }
        (0..count)
            .map(|i| {
                self.driver
                    .used_elem(mem, self.next_avail.wrapping_add(i))
                    .expect("the ring is in memory")
            })
            .collect()
    }
}

/// Runs a virtio-net device over a socket pair (the network at the other end) with queues
/// and frames decoded from `data`: what it transmits, and what it receives.
///
/// Input: a features byte (bit 0: EVENT_IDX, bit 1: MRG_RXBUF; VERSION_1 always), the receive
/// queue's and then the transmit queue's header (log2 of the size mod 9, the available index,
/// the device's next available index and `used_event`, 16 bits each, little-endian), a count of
/// frames the network sends (mod [`NET_MAX_FRAMES`] + 1) and each frame, its length (16 bits)
/// then its bytes, the virtio-net header first; the rest is copied into guest memory from 0 on,
/// where the receive queue lies, the transmit queue at [`NET_TX_RING`], and the buffers and
/// indirect tables after them.
///
/// The device transmits, the network sends its frames, and the device receives and transmits
/// again. Every frame the network gets must be a header and at most one largest frame; a
/// transmit chain comes back with a used length of 0, a receive chain with at most the bytes
/// it can hold, and the receive chains at most the bytes the network sent. The lengths are
/// checked against the chains the rings held before the device ran when the device cannot have
/// changed the rings meanwhile: no writable buffer overlaps them, and the chains pop the same
/// after as before.
///
/// # Panics
///
/// Only on a finding.
pub fn virtio_net(mut data: &[u8]) -> NetOutcome {
    let data = &mut data;
    let flags = take_u8(data);
    let mut features = VERSION_1;
    if flags & 1 != 0 {
        features |= EVENT_IDX;
    }
    if flags & 2 != 0 {
        features |= MRG_RXBUF;
    }
    let mut rx = NetQueue::decode(data, NET_RX_RING);
    let mut tx = NetQueue::decode(data, NET_TX_RING);
    let frame_count = take_u8(data) % (NET_MAX_FRAMES + 1);
    let frames: Vec<&[u8]> = (0..frame_count)
        .map(|_| {
            let len = take_u16(data);
            take(data, usize::from(len))
        })
        .collect();

    let mem = Arc::new(guest_memory());
    mem.write_slice(take(data, REGIONS[0].1), GuestAddress(0))
        .expect("the first region holds the copy");
    let event_idx = features & EVENT_IDX != 0;
    let queues = vec![rx.activate(&mem, event_idx), tx.activate(&mem, event_idx)];
    let rx_before = rx.chains(&mem);
    let tx_before = tx.chains(&mem);

    let (device, network) = UnixDatagram::pair().expect("sockets are available");
    device
        .set_nonblocking(true)
        .expect("a socket turns non-blocking");
    network
        .set_nonblocking(true)
        .expect("a socket turns non-blocking");
    let eventfd = || EventFd::new(EFD_NONBLOCK).expect("eventfds are available");
    let params = ActivateParams::new(
        mem.clone(),
        features,
        queues,
        vec![eventfd(), eventfd()],
        Arc::new(CountingTrigger::default()),
        WorkerGate::new(),
    );
    let mut handler = NetHandler::new(device, NetRateLimiters::default(), params)
        .expect("two queues and two eventfds");

    let mut outcome = NetOutcome::default();
    // An error is the guest's (a ring that breaks the protocol): the device stops, no finding.
    let _ = handler.process_tx();
    outcome.sent += drain_network(&network);
    let mut rx_bytes = 0u64;
    for frame in &frames {
        if network.send(frame).is_ok() {
            rx_bytes += frame.len() as u64;
        }
    }
    let _ = handler.process_rx();
    let _ = handler.process_tx();
    outcome.sent += drain_network(&network);
    outcome.tx_dropped = handler.tx_dropped();
    outcome.rx_dropped = handler.rx_dropped();

    let tx_used = tx.used(&mem);
    let rx_used = rx.used(&mem);
    outcome.tx_used = tx_used.len();
    outcome.rx_used = rx_used.len();
    let rings = [rx.rings(), tx.rings()];
    let untouched = |before: &HashMap<u16, Vec<Descriptor>>, queue: &NetQueue| {
        let writes_rings = [&rx_before, &tx_before].iter().any(|chains| {
            chains.values().flatten().any(|desc| {
                let (start, end) = (desc.addr.0, desc.addr.0 + u64::from(desc.len));
                desc.writable && rings.iter().any(|&(lo, hi)| start < hi && lo < end)
            })
        });
        !writes_rings && queue.chains(&mem) == *before
    };
    if untouched(&tx_before, &tx) {
        for &(head, len) in &tx_used {
            assert!(
                tx_before.contains_key(&u16::try_from(head).expect("a 16-bit head")),
                "head {head} was not available"
            );
            assert_eq!(len, 0, "a transmit chain used with {len} bytes");
        }
    }
    if untouched(&rx_before, &rx) {
        let mut total = 0u64;
        for &(head, len) in &rx_used {
            let chain = u16::try_from(head)
                .ok()
                .and_then(|head| rx_before.get(&head))
                .unwrap_or_else(|| panic!("head {head} was not available"));
            let room: u64 = chain
                .iter()
                .filter(|desc| desc.writable)
                .map(|desc| u64::from(desc.len))
                .sum();
            assert!(u64::from(len) <= room, "{len} bytes used of {room}");
            total += u64::from(len);
        }
        assert!(total <= rx_bytes, "{total} bytes received of {rx_bytes}");
    }
    outcome
}

/// Reads every frame the device sent the network, checks its length, and returns how many.
fn drain_network(network: &UnixDatagram) -> usize {
    let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
    let mut frames = 0;
    loop {
        match network.recv(&mut buf) {
            Ok(len) => {
                assert!(
                    (VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&len),
                    "a {len}-byte frame sent"
                );
                frames += 1;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return frames,
            Err(err) => panic!("the network cannot read: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use ember_virtio::mock::{DESC_F_NEXT, MockBuffer, RawDescriptor};

    use super::*;
    use crate::tests::{Seeds, corpus_dir, replay};

    /// The virtqueue target's seeds and what it makes of them.
    const QUEUE_SEEDS: &[(&str, QueueOutcome)] = &[
        (
            "empty",
            QueueOutcome {
                chains: 0,
                errors: 0,
            },
        ),
        (
            "one-chain",
            QueueOutcome {
                chains: 1,
                errors: 0,
            },
        ),
        (
            "mixed-chains",
            QueueOutcome {
                chains: 3,
                errors: 0,
            },
        ),
        (
            "looping-chain",
            QueueOutcome {
                chains: 0,
                errors: 1,
            },
        ),
        (
            "avail-too-far",
            QueueOutcome {
                chains: 0,
                errors: 17,
            },
        ),
    ];

    /// The block target's seeds and what it makes of them.
    const BLOCK_SEEDS: &[(&str, BlockOutcome)] = &[
        ("read", block_outcome(1, 1, 1)),
        ("write", block_outcome(1, 1, 1)),
        ("get-id", block_outcome(1, 1, 1)),
        ("write-zeroes", block_outcome(1, 1, 1)),
        ("past-the-end", block_outcome(1, 0, 0)),
        ("no-status", block_outcome(1, 0, 0)),
        ("read-write-flush", block_outcome(3, 3, 3)),
    ];

    const fn block_outcome(chains: usize, requests: usize, ok: usize) -> BlockOutcome {
        BlockOutcome {
            queue: QueueOutcome { chains, errors: 0 },
            requests,
            ok,
        }
    }

    /// A block request for the seeds.
    #[derive(Clone, Copy)]
    struct Req {
        /// Which 8 KiB from 0x1000 it is laid out in.
        slot: u64,
        type_: u32,
        sector: u64,
        /// Bytes of data, at 0x100 in the slot; writable for reads.
        data: u32,
        data_writable: bool,
        /// Bytes for the status, at 0x1f00 in the slot; 0 for none.
        status: u32,
    }

    /// Lays `req` out (header at the start of its slot) and publishes it.
    fn add_request(mem: &GuestMemoryMmap, driver: &mut MockDriver, req: Req) {
        let base = 0x1000 + req.slot * 0x2000;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&req.type_.to_le_bytes());
        header[8..].copy_from_slice(&req.sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(base)).unwrap();
        let mut buffers = vec![MockBuffer::readable(base, 16)];
        if req.data > 0 {
            buffers.push(MockBuffer {
                addr: GuestAddress(base + 0x100),
                len: req.data,
                writable: req.data_writable,
            });
        }
        if req.status > 0 {
            buffers.push(MockBuffer::writable(base + 0x1f00, req.status));
        }
        driver.add_chain(mem, &buffers).unwrap();
    }

    fn req(slot: u64, type_: u32, sector: u64, data: u32, data_writable: bool, status: u32) -> Req {
        Req {
            slot,
            type_,
            sector,
            data,
            data_writable,
            status,
        }
    }

    fn block_seeds() -> Seeds {
        let one = |r: Req| queue_input(4, None, move |mem, driver| add_request(mem, driver, r));
        let write_zeroes = queue_input(4, None, |mem, driver| {
            // One segment: sector 4, 2 sectors, no flags.
            let mut segment = [0u8; 16];
            segment[..8].copy_from_slice(&4u64.to_le_bytes());
            segment[8..12].copy_from_slice(&2u32.to_le_bytes());
            mem.write_slice(&segment, GuestAddress(0x1100)).unwrap();
            add_request(mem, driver, req(0, 13, 0, 16, false, 1));
        });
        vec![
            ("read", one(req(0, 0, 1, 512, true, 1))),
            ("write", one(req(0, 1, 2, 1024, false, 1))),
            ("get-id", one(req(0, 8, 0, 20, true, 1))),
            ("write-zeroes", write_zeroes),
            ("past-the-end", one(req(0, 0, 127, 1024, true, 1))),
            ("no-status", one(req(0, 0, 1, 512, false, 0))),
            (
                "read-write-flush",
                queue_input(4, None, |mem, driver| {
                    add_request(mem, driver, req(0, 0, 0, 4096, true, 1));
                    add_request(mem, driver, req(1, 1, 8, 4096, false, 1));
                    add_request(mem, driver, req(2, 4, 0, 0, false, 1));
                }),
            ),
        ]
    }

    /// The transport target's seeds and what it makes of them.
    const TRANSPORT_SEEDS: &[(&str, TransportOutcome)] = &[
        (
            "driver-init",
            TransportOutcome {
                accesses: 25,
                activations: 1,
            },
        ),
        (
            "init-reset-init",
            TransportOutcome {
                accesses: 51,
                activations: 2,
            },
        ),
        (
            "skip-features-ok",
            TransportOutcome {
                accesses: 4,
                activations: 0,
            },
        ),
    ];

    /// A virtqueue input: the header fields, then region 0 from the descriptor table on as
    /// `build` leaves it.
    fn queue_input(
        size_log2: u8,
        avail_idx: Option<u16>,
        build: impl FnOnce(&GuestMemoryMmap, &mut MockDriver),
    ) -> Vec<u8> {
        let mem = guest_memory();
        let mut driver = MockDriver::new(1 << size_log2, GuestAddress(0));
        build(&mem, &mut driver);
        let avail_idx = avail_idx.unwrap_or(driver.avail_idx());
        let mut input = vec![size_log2, 1];
        input.extend_from_slice(&avail_idx.to_le_bytes());
        input.extend_from_slice(&0u16.to_le_bytes());
        input.extend_from_slice(&0u16.to_le_bytes());
        // The first region, without the zeros at its end.
        let mut region = vec![0u8; REGIONS[0].1];
        mem.read_slice(&mut region, GuestAddress(0)).unwrap();
        let used = region.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        input.extend_from_slice(&region[..used]);
        input
    }

    fn queue_seeds() -> Seeds {
        vec![
            ("empty", vec![]),
            (
                "one-chain",
                queue_input(4, None, |mem, driver| {
                    driver
                        .add_chain(mem, &[MockBuffer::writable(0x1000, 64)])
                        .unwrap();
                }),
            ),
            (
                "mixed-chains",
                queue_input(4, None, |mem, driver| {
                    driver
                        .add_chain(
                            mem,
                            &[
                                MockBuffer::readable(0x1000, 16),
                                MockBuffer::readable(0x7ff0, 16),
                                MockBuffer::writable(0x2000, 512),
                            ],
                        )
                        .unwrap();
                    driver
                        .add_indirect_chain(
                            mem,
                            GuestAddress(0x3000),
                            &[
                                MockBuffer::readable(0x1000, 16),
                                MockBuffer::writable(0x2000, 1),
                            ],
                        )
                        .unwrap();
                    driver
                        .add_chain(mem, &[MockBuffer::readable(0x1000, 0)])
                        .unwrap();
                }),
            ),
            (
                "looping-chain",
                queue_input(4, None, |mem, driver| {
                    let desc = RawDescriptor {
                        addr: 0x1000,
                        len: 8,
                        flags: DESC_F_NEXT,
                        next: 0,
                    };
                    driver.write_descriptor(mem, 0, desc).unwrap();
                    driver.publish(mem, 0).unwrap();
                }),
            ),
            ("avail-too-far", queue_input(4, Some(17), |_, _| {})),
        ]
    }

    /// One access of the transport target.
    fn access(write: bool, offset: u16, value: u32) -> [u8; 8] {
        let mut bytes = [0u8; 8];
        bytes[0] = u8::from(write);
        bytes[1..3].copy_from_slice(&offset.to_le_bytes());
        // Size code 2: 4 bytes.
        bytes[3] = 2;
        bytes[4..].copy_from_slice(&value.to_le_bytes());
        bytes
    }

    /// The accesses of a Linux driver bringing up the transport target's device: 25 of them.
    fn driver_init() -> Vec<u8> {
        let mut ops = vec![
            access(false, 0x000, 0),
            access(false, 0x004, 0),
            access(true, 0x070, 1),
            access(true, 0x070, 3),
            access(true, 0x024, 0),
            access(true, 0x020, 1 | (1 << 29)),
            access(true, 0x024, 1),
            access(true, 0x020, 1),
            access(true, 0x070, 11),
        ];
        for (queue, base) in [(0u32, 0x1000u32), (1, 0x2000)] {
            let driver = MockDriver::new(16, GuestAddress(u64::from(base)));
            let low = |addr: GuestAddress| u32::try_from(addr.0).unwrap();
            ops.extend([
                access(true, 0x030, queue),
                access(true, 0x038, 16),
                access(true, 0x080, low(driver.desc_table())),
                access(true, 0x090, low(driver.avail_ring())),
                access(true, 0x0a0, low(driver.used_ring())),
                access(true, 0x044, 1),
            ]);
        }
        ops.extend([
            access(true, 0x070, 15),
            access(true, 0x050, 0),
            access(false, 0x060, 0),
            access(true, 0x064, 1),
        ]);
        ops.concat()
    }

    fn transport_seeds() -> Seeds {
        let init = driver_init();
        let mut twice = init.clone();
        twice.extend_from_slice(&access(true, 0x070, 0));
        twice.extend_from_slice(&init);
        let skip = [
            access(true, 0x070, 1),
            access(true, 0x070, 3),
            access(true, 0x070, 7),
            access(false, 0x070, 0),
        ]
        .concat();
        vec![
            ("driver-init", init),
            ("init-reset-init", twice),
            ("skip-features-ok", skip),
        ]
    }

    const fn net(
        sent: usize,
        tx_used: usize,
        rx_used: usize,
        tx_dropped: u64,
        rx_dropped: u64,
    ) -> NetOutcome {
        NetOutcome {
            sent,
            tx_used,
            rx_used,
            tx_dropped,
            rx_dropped,
        }
    }

    /// The net target's seeds and what it makes of them.
    const NET_SEEDS: &[(&str, NetOutcome)] = &[
        ("empty", net(0, 0, 0, 0, 0)),
        ("one-tx-frame", net(1, 1, 0, 0, 0)),
        ("tx-indirect", net(1, 1, 0, 0, 0)),
        ("tx-too-short", net(0, 1, 0, 1, 0)),
        ("one-rx-frame", net(0, 0, 1, 0, 0)),
        ("rx-too-big", net(0, 0, 0, 0, 1)),
        ("mrg-rxbuf", net(0, 0, 3, 0, 0)),
        ("tx-and-rx-event-idx", net(2, 2, 2, 0, 0)),
    ];

    /// A frame of `len` bytes behind a zero virtio-net header.
    fn net_frame(len: usize, seed: u8) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
        frame
    }

    /// A net input: the features byte, both queues of 16 entries as `build` leaves them (the
    /// receive queue's driver first), the frames the network sends, then the first region.
    fn net_input(
        flags: u8,
        frames: &[Vec<u8>],
        build: impl FnOnce(&GuestMemoryMmap, &mut MockDriver, &mut MockDriver),
    ) -> Vec<u8> {
        let mem = guest_memory();
        let mut rx = MockDriver::new(16, GuestAddress(NET_RX_RING));
        let mut tx = MockDriver::new(16, GuestAddress(NET_TX_RING));
        build(&mem, &mut rx, &mut tx);
        let mut input = vec![flags];
        for driver in [&rx, &tx] {
            input.push(4);
            input.extend_from_slice(&driver.avail_idx().to_le_bytes());
            input.extend_from_slice(&0u16.to_le_bytes());
            input.extend_from_slice(&0u16.to_le_bytes());
        }
        input.push(u8::try_from(frames.len()).unwrap());
        for frame in frames {
            input.extend_from_slice(&u16::try_from(frame.len()).unwrap().to_le_bytes());
            input.extend_from_slice(frame);
        }
        let mut region = vec![0u8; REGIONS[0].1];
        mem.read_slice(&mut region, GuestAddress(0)).unwrap();
        let used = region.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        input.extend_from_slice(&region[..used]);
        input
    }

    /// Writes `bytes` at `addr` and returns a readable buffer of them.
    fn readable(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> MockBuffer {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        MockBuffer::readable(addr, u32::try_from(bytes.len()).unwrap())
    }

    fn net_seeds() -> Seeds {
        let frame = net_frame(60, 1);
        vec![
            ("empty", vec![]),
            (
                "one-tx-frame",
                net_input(0, &[], |mem, _, tx| {
                    let buffer = readable(mem, 0x4000, &frame);
                    tx.add_chain(mem, &[buffer]).unwrap();
                }),
            ),
            (
                "tx-indirect",
                net_input(0, &[], |mem, _, tx| {
                    let header = readable(mem, 0x4000, &frame[..VNET_HDR_LEN]);
                    let body = readable(mem, 0x4100, &frame[VNET_HDR_LEN..]);
                    tx.add_indirect_chain(mem, GuestAddress(0x5000), &[header, body])
                        .unwrap();
                }),
            ),
            (
                "tx-too-short",
                net_input(0, &[], |mem, _, tx| {
                    let buffer = readable(mem, 0x4000, &frame[..8]);
                    tx.add_chain(mem, &[buffer]).unwrap();
                }),
            ),
            (
                "one-rx-frame",
                net_input(0, &[net_frame(62, 2)], |mem, rx, _| {
                    rx.add_chain(mem, &[MockBuffer::writable(0x4000, 2048)])
                        .unwrap();
                }),
            ),
            (
                "rx-too-big",
                net_input(0, &[net_frame(1000, 3)], |mem, rx, _| {
                    rx.add_chain(mem, &[MockBuffer::writable(0x4000, 100)])
                        .unwrap();
                }),
            ),
            (
                "mrg-rxbuf",
                net_input(2, &[net_frame(1200, 4)], |mem, rx, _| {
                    for i in 0..4 {
                        rx.add_chain(mem, &[MockBuffer::writable(0x4000 + i * 0x200, 512)])
                            .unwrap();
                    }
                }),
            ),
            (
                "tx-and-rx-event-idx",
                net_input(1, &[net_frame(100, 5), net_frame(200, 6)], |mem, rx, tx| {
                    for i in 0..2 {
                        rx.add_chain(mem, &[MockBuffer::writable(0x4000 + i * 0x800, 0x800)])
                            .unwrap();
                        let buffer = readable(mem, 0x6000 + i * 0x100, &frame);
                        tx.add_chain(mem, &[buffer]).unwrap();
                    }
                }),
            ),
        ]
    }

    #[test]
    fn virtio_net_corpus_replays() {
        replay("virtio_net", NET_SEEDS, virtio_net);
    }

    #[test]
    fn virtqueue_corpus_replays() {
        replay("virtqueue", QUEUE_SEEDS, virtqueue);
    }

    #[test]
    fn block_request_corpus_replays() {
        replay("block_request", BLOCK_SEEDS, block_request);
    }

    #[test]
    fn mmio_transport_corpus_replays() {
        replay("mmio_transport", TRANSPORT_SEEDS, mmio_transport);
    }

    /// Each target's seeds, by target.
    fn all_seeds() -> [(&'static str, Seeds); 4] {
        [
            ("virtqueue", queue_seeds()),
            ("block_request", block_seeds()),
            ("mmio_transport", transport_seeds()),
            ("virtio_net", net_seeds()),
        ]
    }

    #[test]
    fn seeds_on_disk_are_the_generated_ones() {
        for (target, seeds) in all_seeds() {
            for (name, data) in seeds {
                let path = corpus_dir(target).join(name);
                assert_eq!(fs::read(&path).unwrap(), data, "{}", path.display());
            }
        }
    }

    #[test]
    fn short_inputs_are_an_empty_queue() {
        assert_eq!(virtqueue(&[]), QueueOutcome::default());
        assert_eq!(mmio_transport(&[1, 2, 3]), TransportOutcome::default());
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_virtio_seed_corpus() {
        for (target, seeds) in all_seeds() {
            let dir = corpus_dir(target);
            fs::create_dir_all(&dir).unwrap();
            for (name, data) in seeds {
                fs::write(dir.join(name), data).unwrap();
            }
        }
    }
}
