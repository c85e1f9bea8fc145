//! A snapshot of running ember-virtio devices, taken and restored by a VMM that is not ember:
//! the test is that VMM. It runs a block, a network and an entropy device behind their MMIO
//! transports, drives them through the mock guest driver, pauses them, saves the transports
//! and the devices, encodes the states as a snapshot file would, drops everything as a process
//! that exits, and restores new devices and transports over the same guest memory, as a new
//! process does. The guest goes on: what it made available before the snapshot is served once,
//! the used rings go on from where they were, and interrupts still come. With and without
//! EVENT_IDX.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_virtio::block::{Block, BlockState, Config, RawFile};
use ember_virtio::mmio::{MmioState, MmioTransport};
use ember_virtio::mock::{MockBuffer, MockDriver, bucket, guest_memory};
use ember_virtio::net::{MacAddr, Net, NetState, VNET_HDR_LEN};
use ember_virtio::rate_limiter::RateLimiter;
use ember_virtio::rng::{Rng, RngState};
use ember_virtio::{StateError, VirtioDevice, WorkerGate};
use serde::Serialize;
use serde::de::DeserializeOwned;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

type Mem = Arc<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x20_0000;
/// Where the tests' buffers start, past the rings of two queues.
const DATA: u64 = 0x1_0000;
const TIMEOUT: Duration = Duration::from_secs(10);
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// A device behind its transport, as this VMM runs it: its worker behind a gate, its
/// interrupt line an eventfd.
struct Vm<D: VirtioDevice<Mem>> {
    mem: Mem,
    transport: MmioTransport<Mem, D>,
    gate: WorkerGate,
    irq: EventFd,
}

impl<D: VirtioDevice<Mem> + 'static> Vm<D> {
    /// `device` behind a new transport over `mem`, in reset.
    fn new(mem: &Mem, device: D) -> Self {
        let gate = WorkerGate::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(
            mem.clone(),
            Box::new(device),
            irq.try_clone().unwrap(),
            gate.clone(),
        )
        .unwrap();
        Vm {
            mem: mem.clone(),
            transport,
            gate,
            irq,
        }
    }

    fn write(&mut self, register: u32, value: u32) {
        self.transport
            .write(u64::from(register), &value.to_le_bytes());
    }

    fn read(&self, register: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(u64::from(register), &mut data);
        u32::from_le_bytes(data)
    }

    /// What a driver does to start the device: negotiates the device's features, less
    /// EVENT_IDX unless `event_idx`, lays out each queue as `drivers` say, sets DRIVER_OK.
    fn start(&mut self, event_idx: bool, drivers: &[MockDriver]) {
        let offered = self.transport.device().features();
        let features = if event_idx {
            offered
        } else {
            offered & !EVENT_IDX
        };
        let acknowledge = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        let driver = acknowledge | VIRTIO_CONFIG_S_DRIVER;
        self.write(VIRTIO_MMIO_STATUS, acknowledge);
        self.write(VIRTIO_MMIO_STATUS, driver);
        for page in 0..2u32 {
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
            self.write(
                VIRTIO_MMIO_DRIVER_FEATURES,
                u32::try_from((features >> (32 * page)) & 0xffff_ffff).unwrap(),
            );
        }
        let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write(VIRTIO_MMIO_STATUS, features_ok);
        assert_eq!(self.read(VIRTIO_MMIO_STATUS), features_ok);
        for (index, queue) in drivers.iter().enumerate() {
            self.write(VIRTIO_MMIO_QUEUE_SEL, u32::try_from(index).unwrap());
            self.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(queue.size()));
            for (low, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, queue.desc_table()),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, queue.avail_ring()),
                (VIRTIO_MMIO_QUEUE_USED_LOW, queue.used_ring()),
            ] {
                self.write(low, u32::try_from(addr.0 & 0xffff_ffff).unwrap());
                self.write(low + 4, u32::try_from(addr.0 >> 32).unwrap());
            }
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.write(VIRTIO_MMIO_STATUS, features_ok | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(self.transport.is_activated());
    }

    /// Makes the next chain of `driver` ask for an interrupt (with EVENT_IDX), then publishes
    /// `buffers` as a chain and notifies queue `index`; returns the chain's head.
    fn submit(&mut self, driver: &mut MockDriver, index: u32, buffers: &[MockBuffer]) -> u16 {
        let used = driver.used_idx(&*self.mem).unwrap();
        driver.set_used_event(&*self.mem, used).unwrap();
        let head = driver.add_chain(&*self.mem, buffers).unwrap();
        self.write(VIRTIO_MMIO_QUEUE_NOTIFY, index);
        head
    }

    /// Waits until the used ring of `driver` holds `count` entries.
    fn wait_used(&self, driver: &MockDriver, count: u16) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let used = driver.used_idx(&*self.mem).unwrap();
            assert!(
                used <= count,
                "{used} chains used, more than the {count} given"
            );
            if used == count {
                return;
            }
            assert!(Instant::now() < deadline, "{used} of {count} chains used");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for an interrupt and acknowledges it, as the driver's interrupt handler does.
    fn wait_interrupt(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        while self.irq.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt came");
            std::thread::sleep(Duration::from_millis(1));
        }
        let status = self.read(VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write(VIRTIO_MMIO_INTERRUPT_ACK, status);
    }

    /// Pauses the device and saves the transport and, with `save`, the device, through the
    /// encoding of a snapshot file. The process then "exits": the device is stopped and
    /// dropped, and touches guest memory no more.
    fn snapshot<S: Serialize + DeserializeOwned>(
        mut self,
        save: impl FnOnce(&D) -> Result<S, StateError>,
    ) -> (MmioState, S) {
        self.gate.pause().unwrap();
        let mmio = round_trip(&self.transport.save_state().unwrap());
        let device = round_trip(&save(self.transport.device()).unwrap());
        self.write(VIRTIO_MMIO_STATUS, 0);
        (mmio, device)
    }

    /// What a new process does: `device`, built afresh, behind a new transport over `mem`,
    /// both restored from the snapshot.
    fn restore<S>(
        mem: &Mem,
        mut device: D,
        (mmio, saved): &(MmioState, S),
        restore: impl FnOnce(&mut D, &S) -> Result<(), StateError>,
    ) -> Self {
        restore(&mut device, saved).unwrap();
        let mut vm = Vm::new(mem, device);
        vm.transport.restore_state(mmio).unwrap();
        assert!(vm.transport.is_activated());
        vm
    }
}

/// `value` through postcard, as a snapshot file holds it.
fn round_trip<T: Serialize + DeserializeOwned>(value: &T) -> T {
    let bytes = postcard::to_stdvec(value).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

/// Checks that the used ring of `driver` holds `heads`, in order, with `len` bytes each.
fn assert_used(mem: &Mem, driver: &MockDriver, heads: &[u16], len: Option<u32>) {
    assert_eq!(
        driver.used_idx(&**mem).unwrap(),
        u16::try_from(heads.len()).unwrap()
    );
    for (i, &head) in heads.iter().enumerate() {
        let (id, used_len) = driver.used_elem(&**mem, u16::try_from(i).unwrap()).unwrap();
        assert_eq!(id, u32::from(head), "used entry {i}");
        if let Some(len) = len {
            assert_eq!(used_len, len, "used entry {i}");
        }
    }
}

// ---- entropy

/// A limiter of 100 operations that refills none within the test.
fn ops_limiter() -> RateLimiter {
    RateLimiter::new(None, bucket(100, 1 << 40)).unwrap()
}

fn rng_goes_on_after_a_restore(event_idx: bool) {
    let mem: Mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
    let mut driver = MockDriver::new(256, GuestAddress(0));
    let mut vm = Vm::new(&mem, Rng::new(ops_limiter()));
    vm.start(event_idx, std::slice::from_ref(&driver));
    let request = |n: u64| [MockBuffer::writable(DATA + n * 0x100, 64)];
    let mut heads = Vec::new();
    for n in 0..3 {
        heads.push(vm.submit(&mut driver, 0, &request(n)));
        vm.wait_used(&driver, heads.len().try_into().unwrap());
        vm.wait_interrupt();
    }
    // Made available and notified once the device is paused: the old process never sees it.
    vm.gate.pause().unwrap();
    heads.push(vm.submit(&mut driver, 0, &request(3)));
    let snapshot = vm.snapshot(Rng::save_state);
    assert_eq!(snapshot.0.queues[0].next_avail, 3);
    assert_eq!(snapshot.1.rate_limiter.ops.as_ref().unwrap().budget, 97);

    let mut vm = Vm::restore(
        &mem,
        Rng::new(RateLimiter::default()),
        &snapshot,
        Rng::restore_state,
    );
    vm.wait_used(&driver, 4);
    vm.wait_interrupt();
    heads.push(vm.submit(&mut driver, 0, &request(4)));
    vm.wait_used(&driver, 5);
    vm.wait_interrupt();
    assert_used(&mem, &driver, &heads, Some(64));
    // The limiter went on from the saved budget.
    let state = vm.transport.device().save_state().unwrap();
    assert_eq!(state.rate_limiter.ops.unwrap().budget, 95);
}

#[test]
fn rng_goes_on_after_a_restore_without_event_idx() {
    rng_goes_on_after_a_restore(false);
}

#[test]
fn rng_goes_on_after_a_restore_with_event_idx() {
    rng_goes_on_after_a_restore(true);
}

// ---- block

/// A disk image of `sectors` sectors, sector `n` filled with the byte `n + 1`, removed when
/// dropped.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, sectors: u8) -> Self {
        let path = std::env::temp_dir().join(format!(
            "ember-snapshot-{name}-{}-{sectors}",
            std::process::id()
        ));
        let bytes: Vec<u8> = (0..sectors).flat_map(|n| [n + 1; 512]).collect();
        std::fs::write(&path, bytes).unwrap();
        Image(path)
    }

    fn block(&self) -> Block {
        block_on(&self.0)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn block_on(path: &Path) -> Block {
    let limiter = ops_limiter();
    Block::new(
        RawFile::open(path, false).unwrap(),
        Config::new("rootfs").with_rate_limiter(limiter),
    )
    .unwrap()
}

/// A request of `type_` on `sector` with a one-sector data buffer, its header, data and
/// status in slot `n` of the data area.
fn block_request(mem: &Mem, n: u64, type_: u32, sector: u64) -> [MockBuffer; 3] {
    let base = DATA + n * 0x1000;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&type_.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(base)).unwrap();
    let data = if type_ == VIRTIO_BLK_T_OUT {
        MockBuffer::readable(base + 0x200, 512)
    } else {
        MockBuffer::writable(base + 0x200, 512)
    };
    [
        MockBuffer::readable(base, 16),
        data,
        MockBuffer::writable(base + 0x400, 1),
    ]
}

fn sector_in_slot(mem: &Mem, n: u64) -> Vec<u8> {
    let mut data = vec![0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA + n * 0x1000 + 0x200))
        .unwrap();
    data
}

fn block_goes_on_after_a_restore(event_idx: bool) {
    let image = Image::new(if event_idx { "blk-ei" } else { "blk" }, 16);
    let mem: Mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
    let mut driver = MockDriver::new(256, GuestAddress(0));
    let mut vm = Vm::new(&mem, image.block());
    vm.start(event_idx, std::slice::from_ref(&driver));
    let mut heads = Vec::new();
    for n in 0..3 {
        let request = block_request(&mem, n, VIRTIO_BLK_T_IN, n);
        heads.push(vm.submit(&mut driver, 0, &request));
        vm.wait_used(&driver, heads.len().try_into().unwrap());
        vm.wait_interrupt();
        assert_eq!(sector_in_slot(&mem, n), [u8::try_from(n).unwrap() + 1; 512]);
    }
    vm.gate.pause().unwrap();
    // A write made available while paused: served once, after the restore.
    mem.write_slice(&[0xee; 512], GuestAddress(DATA + 3 * 0x1000 + 0x200))
        .unwrap();
    let request = block_request(&mem, 3, VIRTIO_BLK_T_OUT, 9);
    heads.push(vm.submit(&mut driver, 0, &request));
    let snapshot = vm.snapshot(Block::save_state);
    assert_eq!(snapshot.1.capacity, 16);
    assert_eq!(snapshot.1.rate_limiter.ops.as_ref().unwrap().budget, 97);

    let mut vm = Vm::restore(&mem, image.block(), &snapshot, Block::restore_state);
    vm.wait_used(&driver, 4);
    vm.wait_interrupt();
    assert_eq!(
        std::fs::read(&image.0).unwrap()[9 * 512..10 * 512],
        [0xee; 512]
    );
    let request = block_request(&mem, 4, VIRTIO_BLK_T_IN, 9);
    heads.push(vm.submit(&mut driver, 0, &request));
    vm.wait_used(&driver, 5);
    vm.wait_interrupt();
    assert_eq!(sector_in_slot(&mem, 4), [0xee; 512]);
    assert_used(&mem, &driver, &heads, None);
    for n in 0..5 {
        let status: u8 = mem
            .read_obj(GuestAddress(DATA + n * 0x1000 + 0x400))
            .unwrap();
        assert_eq!(status, 0, "request {n}");
    }
    let state = vm.transport.device().save_state().unwrap();
    assert_eq!(state.rate_limiter.ops.unwrap().budget, 95);
}

#[test]
fn block_goes_on_after_a_restore_without_event_idx() {
    block_goes_on_after_a_restore(false);
}

#[test]
fn block_goes_on_after_a_restore_with_event_idx() {
    block_goes_on_after_a_restore(true);
}

#[test]
fn a_disk_of_another_size_or_name_is_refused_on_restore() {
    let image = Image::new("blk-size", 16);
    let state: BlockState = round_trip(&image.block().save_state().unwrap());
    let bigger = Image::new("blk-size", 32);
    let err = bigger.block().restore_state(&state).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StateError::Invalid(_)), "{err:?}");
    assert!(
        message.contains("holds 32 sectors, and held 16"),
        "{message}"
    );
    let mut renamed =
        Block::new(RawFile::open(&image.0, false).unwrap(), Config::new("data")).unwrap();
    assert!(matches!(
        renamed.restore_state(&state),
        Err(StateError::Invalid(_))
    ));
    let mut read_only = Block::new(
        RawFile::open(&image.0, true).unwrap(),
        Config::new("rootfs").with_read_only(true),
    )
    .unwrap();
    assert!(matches!(
        read_only.restore_state(&state),
        Err(StateError::Invalid(_))
    ));
    image.block().restore_state(&state).unwrap();
}

// ---- network

fn mac() -> MacAddr {
    "06:00:ac:10:00:02".parse().unwrap()
}

/// A backend for the device and the network's end of it.
fn network() -> (UnixDatagram, UnixDatagram) {
    let (device, peer) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    (device, peer)
}

/// A frame as the backend carries it: the virtio-net header, then `len` bytes of `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![seed; VNET_HDR_LEN + len];
    frame[..VNET_HDR_LEN].fill(0);
    frame
}

fn net_goes_on_after_a_restore(event_idx: bool) {
    let mem: Mem = Arc::new(guest_memory(MEM_SIZE).unwrap());
    let mut rx = MockDriver::new(256, GuestAddress(0));
    let mut tx = MockDriver::new(256, GuestAddress(0x8000));
    let (device, peer) = network();
    let net = Net::new(device, Some(mac())).with_rate_limiters(
        RateLimiter::new(None, bucket(100, 1 << 40)).unwrap(),
        RateLimiter::default(),
    );
    let mut vm = Vm::new(&mem, net);
    vm.start(event_idx, &[rx.clone(), tx.clone()]);
    let rx_buffer = |n: u64| [MockBuffer::writable(DATA + n * 0x1000, 2048)];
    let tx_frame = |vm: &mut Vm<Net<UnixDatagram>>, tx: &mut MockDriver, n: u64, seed: u8| {
        let bytes = frame(100, seed);
        let addr = DATA + 0x10_0000 + n * 0x1000;
        vm.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let len = u32::try_from(bytes.len()).unwrap();
        vm.submit(tx, 1, &[MockBuffer::readable(addr, len)])
    };
    // Room for four frames, and two frames each way.
    let mut rx_heads: Vec<u16> = (0..4)
        .map(|n| vm.submit(&mut rx, 0, &rx_buffer(n)))
        .collect();
    let mut tx_heads = Vec::new();
    for n in 0..2u8 {
        tx_heads.push(tx_frame(&mut vm, &mut tx, n.into(), n));
        assert_eq!(peer.recv(&mut [0u8; 4096]).unwrap(), VNET_HDR_LEN + 100);
        vm.wait_used(&tx, u16::from(n) + 1);
        vm.wait_interrupt();
        rx.set_used_event(&*mem, u16::from(n)).unwrap();
        peer.send(&frame(200, 0x10 + n)).unwrap();
        vm.wait_used(&rx, u16::from(n) + 1);
        vm.wait_interrupt();
    }
    vm.gate.pause().unwrap();
    tx_heads.push(tx_frame(&mut vm, &mut tx, 2, 2));
    let snapshot = vm.snapshot(Net::save_state);
    assert_eq!(snapshot.0.queues[0].next_avail, 2);
    assert_eq!(snapshot.0.queues[1].next_avail, 2);
    assert_eq!(snapshot.1.mac, Some(mac().bytes()));
    drop(peer);

    // Another backend, as a clone restored on a TAP of its own.
    let (device, peer) = network();
    let mut vm = Vm::restore(
        &mem,
        Net::new(device, Some(mac())),
        &snapshot,
        Net::restore_state,
    );
    // The frame the guest sent while paused goes out once, on the new backend.
    let mut buf = [0u8; 4096];
    assert_eq!(peer.recv(&mut buf).unwrap(), VNET_HDR_LEN + 100);
    assert_eq!(buf[VNET_HDR_LEN], 2);
    vm.wait_used(&tx, 3);
    vm.wait_interrupt();
    // A frame from the network lands in the next buffer the guest gave before the snapshot.
    rx.set_used_event(&*mem, 2).unwrap();
    peer.send(&frame(200, 0x12)).unwrap();
    vm.wait_used(&rx, 3);
    vm.wait_interrupt();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 2 * 0x1000 + 0x40))
            .unwrap(),
        0x12
    );
    tx_heads.push(tx_frame(&mut vm, &mut tx, 3, 3));
    assert_eq!(peer.recv(&mut buf).unwrap(), VNET_HDR_LEN + 100);
    assert_eq!(buf[VNET_HDR_LEN], 3);
    vm.wait_used(&tx, 4);
    assert_used(&mem, &tx, &tx_heads, Some(0));
    rx_heads.truncate(3);
    assert_used(&mem, &rx, &rx_heads, None);
    let state = vm.transport.device().save_state().unwrap();
    assert_eq!(state.rx_rate_limiter.ops.unwrap().budget, 97);
}

#[test]
fn net_goes_on_after_a_restore_on_another_backend_without_event_idx() {
    net_goes_on_after_a_restore(false);
}

#[test]
fn net_goes_on_after_a_restore_on_another_backend_with_event_idx() {
    net_goes_on_after_a_restore(true);
}

#[test]
fn a_network_device_with_another_mac_is_refused_on_restore() {
    let (device, _peer) = network();
    let state: NetState = round_trip(&Net::new(device, Some(mac())).save_state().unwrap());
    let (device, _peer) = network();
    let other: MacAddr = "06:00:ac:10:00:03".parse().unwrap();
    let err = Net::new(device, Some(other))
        .restore_state(&state)
        .unwrap_err();
    assert!(err.to_string().contains("06:00:ac:10:00:03"), "{err}");
    let (device, _peer) = network();
    assert!(Net::new(device, None).restore_state(&state).is_err());
}

#[test]
fn an_rng_state_with_an_invalid_bucket_is_refused() {
    let mut state: RngState = Rng::new(ops_limiter()).save_state().unwrap();
    state.rate_limiter.ops.as_mut().unwrap().budget = 101;
    let mut rng = Rng::new(RateLimiter::default());
    assert!(matches!(
        rng.restore_state(&state),
        Err(StateError::RateLimiter(_))
    ));
}
