//! ember-virtio hosted by a VMM that is not ember: the test is that VMM. It owns the event loop
//! (a rust-vmm `EventManager` on a thread of its own), the guest memory (a `GuestMemoryAtomic`,
//! into which it plugs memory while the devices run), and an MSI-X style interrupt with one
//! vector per queue. It drives a block device on a scratch file and a network device on a
//! socket pair, with the mock guest driver, through nothing but the crate's public API: a
//! request served end to end, frames both ways, rate limits and a backing file changed and
//! devices reset while the loop runs.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ember_virtio::block::{self, Block};
use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
use ember_virtio::net::{Net, VNET_HDR_LEN};
use ember_virtio::rate_limiter::{BucketUpdate, TokenBucket};
use ember_virtio::worker::manager::Subscriber;
use ember_virtio::{ActivateParams, Executor, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use event_manager::EventManager;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory as this VMM holds it: a map it can replace under running devices.
type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x10_0000;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const TIMEOUT: Duration = Duration::from_secs(10);

/// This VMM's interrupt: one MSI-X vector (an eventfd a KVM VMM would register as an irqfd)
/// per queue, and one for configuration changes.
struct Msix {
    queues: Vec<EventFd>,
    config: EventFd,
    needs_reset: AtomicBool,
}

impl Msix {
    fn new(queues: usize) -> Arc<Self> {
        let vector = || EventFd::new(EFD_NONBLOCK).unwrap();
        Arc::new(Msix {
            queues: (0..queues).map(|_| vector()).collect(),
            config: vector(),
            needs_reset: AtomicBool::new(false),
        })
    }

    /// The vectors that fired since last asked: the queues' in order, then the configuration's.
    fn fired(&self) -> Vec<bool> {
        self.queues
            .iter()
            .chain([&self.config])
            .map(|vector| vector.read().is_ok())
            .collect()
    }

    /// Waits until some vector fires, and returns which fired.
    fn wait(&self) -> Vec<bool> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let fired = self.fired();
            if fired.contains(&true) {
                return fired;
            }
            assert!(Instant::now() < deadline, "no interrupt");
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl VirtioInterrupt for Msix {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        match kind {
            VirtioInterruptType::Queue(index) => self
                .queues
                .get(usize::from(index))
                .ok_or_else(|| io::Error::other("no such queue"))?
                .write(1),
            VirtioInterruptType::Config => self.config.write(1),
            VirtioInterruptType::NeedsReset => {
                self.needs_reset.store(true, Ordering::SeqCst);
                self.config.write(1)
            }
            _ => Ok(()),
        }
    }
}

/// This VMM's event loop, on a thread of its own until dropped.
struct EventLoop {
    executor: Executor,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EventLoop {
    fn start() -> Self {
        let mut manager = EventManager::<Subscriber>::new().unwrap();
        let executor = Executor::EventManager(manager.remote_endpoint());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::SeqCst) {
                    manager.run_with_timeout(10).unwrap();
                }
            }
        });
        EventLoop {
            executor,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// A scratch disk image of 64 sectors, removed when dropped.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ember-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 512]).unwrap();
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The guest driver's side of the block device.
struct BlockGuest {
    driver: MockDriver,
    kick: EventFd,
}

impl BlockGuest {
    /// Asks for `type_` (0: read, 1: write) of sector `sector`, with its data buffer at `data`,
    /// and notifies the queue.
    fn request(&mut self, mem: &Mem, type_: u32, sector: u64, data: u64) {
        let mem = mem.memory();
        let header = 0x2_0000 + u64::from(self.driver.avail_idx()) * 0x100;
        let status = header + 0x80;
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&type_.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(header)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let data = if type_ == 0 {
            MockBuffer::writable(data, 512)
        } else {
            MockBuffer::readable(data, 512)
        };
        self.driver
            .add_chain(
                &*mem,
                &[
                    MockBuffer::readable(header, 16),
                    data,
                    MockBuffer::writable(status, 1),
                ],
            )
            .unwrap();
        self.kick.write(1).unwrap();
    }

    fn used(&self, mem: &Mem) -> u16 {
        self.driver.used_idx(&*mem.memory()).unwrap()
    }
}

/// The guest driver's side of the network device.
struct NetGuest {
    rx: MockDriver,
    tx: MockDriver,
    rx_kick: EventFd,
    tx_kick: EventFd,
}

impl NetGuest {
    fn transmit(&mut self, mem: &Mem, frame: &[u8], at: u64) {
        let mem = mem.memory();
        mem.write_slice(frame, GuestAddress(at)).unwrap();
        let len = u32::try_from(frame.len()).unwrap();
        self.tx
            .add_chain(&*mem, &[MockBuffer::readable(at, len)])
            .unwrap();
        self.tx_kick.write(1).unwrap();
    }
}

/// What the VMM's transport does at DRIVER_OK: it checks the queues each driver laid out and
/// activates the device with their notification eventfds, its vectors and the loop's executor.
fn activate(
    device: &mut dyn VirtioDevice<Mem>,
    mem: &Mem,
    queues: &[(&MockDriver, &EventFd)],
    irq: &Arc<Msix>,
    executor: &Executor,
) {
    let (queues, kicks) = queues
        .iter()
        .map(|(driver, kick)| {
            let queue = driver.queue();
            queue.validate(&*mem.memory()).unwrap();
            (queue, kick.try_clone().unwrap())
        })
        .unzip();
    let interrupt: Arc<dyn VirtioInterrupt> = irq.clone();
    device
        .activate(ActivateParams::new(
            mem.clone(),
            VERSION_1,
            queues,
            kicks,
            interrupt,
            executor.clone(),
        ))
        .unwrap();
}

fn frame(seed: u8) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend((0..60u8).map(|i| i.wrapping_add(seed)));
    frame
}

/// An operations bucket of one token that takes a minute to refill.
fn one_op_a_minute() -> BucketUpdate {
    BucketUpdate::Update(TokenBucket::new(1, 0, 60_000).unwrap())
}

fn settle() {
    thread::sleep(Duration::from_millis(100));
}

#[test]
fn a_foreign_event_loop_serves_block_and_net_with_per_queue_vectors() {
    let event_loop = EventLoop::start();
    let mem: Mem = GuestMemoryAtomic::new(guest_memory(MEM_SIZE).unwrap());

    // The block device, on its own vector.
    let image = Image::new("foreign");
    let mut block = Block::new(
        block::RawFile::open(&image.0, false).unwrap(),
        block::Config::new("foreign"),
    )
    .unwrap();
    let block_irq = Msix::new(1);
    let mut blk = BlockGuest {
        driver: MockDriver::new(block::QUEUE_SIZE, GuestAddress(0)),
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    activate(
        &mut block,
        &mem,
        &[(&blk.driver, &blk.kick)],
        &block_irq,
        &event_loop.executor,
    );
    assert!(block.is_active());

    // The network device, with a vector per queue.
    let (backend, network) = UnixDatagram::pair().unwrap();
    backend.set_nonblocking(true).unwrap();
    network.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut net = Net::new(backend, None);
    let net_irq = Msix::new(2);
    let mut guest = NetGuest {
        rx: MockDriver::new(256, GuestAddress(0x8000)),
        tx: MockDriver::new(256, GuestAddress(0xc000)),
        rx_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        tx_kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    activate(
        &mut net,
        &mem,
        &[(&guest.rx, &guest.rx_kick), (&guest.tx, &guest.tx_kick)],
        &net_irq,
        &event_loop.executor,
    );

    // A write and a read of the disk, end to end: vector 0 of the block device fires.
    mem.memory()
        .write_slice(&[0x5a; 512], GuestAddress(0x4_0000))
        .unwrap();
    blk.request(&mem, 1, 3, 0x4_0000);
    assert_eq!(block_irq.wait(), [true, false]);
    assert_eq!(blk.used(&mem), 1);
    let on_disk = std::fs::read(&image.0).unwrap();
    assert_eq!(on_disk[3 * 512..4 * 512], [0x5a; 512]);
    blk.request(&mem, 0, 3, 0x5_0000);
    assert_eq!(block_irq.wait(), [true, false]);
    let mut read = [0u8; 512];
    mem.memory()
        .read_slice(&mut read, GuestAddress(0x5_0000))
        .unwrap();
    assert_eq!(read, [0x5a; 512]);

    // A frame received: the receive queue's vector, 0, fires and no other.
    guest
        .rx
        .add_chain(&*mem.memory(), &[MockBuffer::writable(0x6_0000, 2048)])
        .unwrap();
    guest.rx_kick.write(1).unwrap();
    network.send(&frame(1)).unwrap();
    assert_eq!(net_irq.wait(), [true, false, false]);
    assert_eq!(
        guest.rx.used_elem(&*mem.memory(), 0).unwrap(),
        (0, u32::try_from(frame(1).len()).unwrap())
    );
    // A frame transmitted: the transmit queue's vector, 1.
    guest.transmit(&mem, &frame(2), 0x7_0000);
    let mut received = [0u8; 2048];
    let len = network.recv(&mut received).unwrap();
    assert_eq!(received[..len], frame(2));
    assert_eq!(net_irq.wait(), [false, true, false]);

    // New rate limits, made on the loop's thread while it runs: one operation a minute.
    block
        .update_rate_limiter(BucketUpdate::None, one_op_a_minute())
        .unwrap()
        .wait()
        .unwrap();
    blk.request(&mem, 0, 0, 0x5_0000);
    blk.request(&mem, 0, 1, 0x5_0000);
    assert_eq!(block_irq.wait(), [true, false]);
    settle();
    assert_eq!(blk.used(&mem), 3, "the second request is held back");
    // Lifted: the request held back goes at once.
    block
        .update_rate_limiter(BucketUpdate::None, BucketUpdate::Disabled)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(block_irq.wait(), [true, false]);
    assert_eq!(blk.used(&mem), 4);

    // A new backing file, taken on the loop's thread: the capacity changes, and the
    // configuration vector fires.
    let bigger_image = Image::new("foreign-bigger");
    std::fs::write(&bigger_image.0, vec![0u8; 128 * 512]).unwrap();
    let disk = block::RawFile::open(&bigger_image.0, false).unwrap();
    block.update_disk(disk).unwrap().wait().unwrap();
    assert_eq!(block.capacity(), 128);
    assert_eq!(block_irq.wait(), [false, true]);
    blk.request(&mem, 1, 100, 0x4_0000);
    assert_eq!(block_irq.wait(), [true, false]);
    let on_disk = std::fs::read(&bigger_image.0).unwrap();
    assert_eq!(on_disk[100 * 512..101 * 512], [0x5a; 512]);

    net.update_rate_limiters(
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::None,
        one_op_a_minute(),
    )
    .unwrap()
    .wait()
    .unwrap();
    guest.transmit(&mem, &frame(3), 0x7_0000);
    assert_eq!(network.recv(&mut received).unwrap(), frame(3).len());
    guest.transmit(&mem, &frame(4), 0x7_1000);
    settle();
    network.set_nonblocking(true).unwrap();
    assert!(network.recv(&mut received).is_err(), "held back");
    net.update_rate_limiters(
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::None,
        BucketUpdate::Disabled,
    )
    .unwrap()
    .wait()
    .unwrap();
    network.set_nonblocking(false).unwrap();
    let len = network.recv(&mut received).unwrap();
    assert_eq!(received[..len], frame(4));

    // Reset while the loop runs: the net device leaves the loop, which goes on serving block.
    VirtioDevice::<Mem>::reset(&mut net);
    assert!(!net.is_active());
    net_irq.fired();
    guest.transmit(&mem, &frame(5), 0x7_0000);
    settle();
    assert_eq!(net_irq.fired(), [false, false, false]);
    network.set_nonblocking(true).unwrap();
    assert!(network.recv(&mut received).is_err(), "no longer served");

    // Memory plugged in under the running block device is reached at its next batch.
    let end = u64::try_from(MEM_SIZE).unwrap();
    let plugged =
        Arc::new(GuestRegionMmap::<()>::from_range(GuestAddress(end), MEM_SIZE, None).unwrap());
    let bigger = mem.memory().insert_region(plugged).unwrap();
    mem.lock().unwrap().replace(bigger);
    let far = end + 0x1000;
    blk.request(&mem, 0, 100, far);
    assert_eq!(block_irq.wait(), [true, false]);
    mem.memory()
        .read_slice(&mut read, GuestAddress(far))
        .unwrap();
    assert_eq!(read, [0x5a; 512]);

    VirtioDevice::<Mem>::reset(&mut block);
    assert!(!block.is_active());
    assert!(!block_irq.needs_reset.load(Ordering::SeqCst));
    assert!(!net_irq.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn a_driver_that_breaks_the_protocol_gets_needs_reset_on_the_config_vector() {
    let event_loop = EventLoop::start();
    let mem: Mem = GuestMemoryAtomic::new(guest_memory(MEM_SIZE).unwrap());
    let image = Image::new("broken");
    let mut block = Block::new(
        block::RawFile::open(&image.0, false).unwrap(),
        block::Config::new("broken"),
    )
    .unwrap();
    let irq = Msix::new(1);
    let mut driver = MockDriver::new(16, GuestAddress(0));
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    activate(
        &mut block,
        &mem,
        &[(&driver, &kick)],
        &irq,
        &event_loop.executor,
    );
    // An available index far ahead of what the ring can hold.
    driver.set_avail_idx(&*mem.memory(), 100).unwrap();
    kick.write(1).unwrap();
    assert_eq!(irq.wait(), [false, true]);
    assert!(irq.needs_reset.load(Ordering::SeqCst));
    // The device is reset, and can start again.
    VirtioDevice::<Mem>::reset(&mut block);
    let driver = MockDriver::new(16, GuestAddress(0x4000));
    activate(
        &mut block,
        &mem,
        &[(&driver, &kick)],
        &irq,
        &event_loop.executor,
    );
    assert!(block.is_active());
    VirtioDevice::<Mem>::reset(&mut block);
}
