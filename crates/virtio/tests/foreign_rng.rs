//! ember-virtio's entropy device hosted by a VMM that is not ember: the test is that VMM. It
//! serves the device on its own rust-vmm `EventManager` loop, and on a worker thread of the
//! device's own, with guest memory it can replace under the running device, and reads random
//! bytes through the mock guest driver, with and without a rate limit, through nothing but the
//! crate's public API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ember_virtio::mock::{CountingTrigger, MockBuffer, MockDriver, bucket, guest_memory};
use ember_virtio::rate_limiter::RateLimiter;
use ember_virtio::rng::Rng;
use ember_virtio::worker::manager::Subscriber;
use ember_virtio::{ActivateParams, Executor, VirtioDevice, WorkerGate};
use event_manager::EventManager;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory as this VMM holds it: a map it can replace under running devices.
type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x10_0000;
const DATA: u64 = 0x8000;
const TIMEOUT: Duration = Duration::from_secs(10);

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

/// The guest driver's side of the device.
struct Guest {
    mem: Mem,
    driver: MockDriver,
    kick: EventFd,
    irq: CountingTrigger,
}

impl Guest {
    /// Activates `rng` with a fresh queue, its handler run where `executor` says.
    fn activate(rng: &mut Rng, executor: Executor) -> Guest {
        let mem = GuestMemoryAtomic::new(guest_memory(MEM_SIZE).unwrap());
        let driver = MockDriver::new(64, GuestAddress(0));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = CountingTrigger::default();
        let device: &mut dyn VirtioDevice<Mem> = rng;
        assert_eq!(device.device_type(), VIRTIO_ID_RNG);
        assert_eq!(device.queue_max_sizes(), [256]);
        device
            .activate(ActivateParams::new(
                mem.clone(),
                1 << VIRTIO_F_VERSION_1,
                vec![driver.queue()],
                vec![kick.try_clone().unwrap()],
                Arc::new(irq.clone()),
                executor,
            ))
            .unwrap();
        Guest {
            mem,
            driver,
            kick,
            irq,
        }
    }

    /// Asks for `len` bytes into the buffer at `addr`.
    fn request(&mut self, addr: u64, len: u32) {
        let mem = self.mem.memory();
        self.driver
            .add_chain(&*mem, &[MockBuffer::writable(addr, len)])
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Waits until the device handed back `count` chains in all.
    fn wait_used(&self, count: u16) {
        wait_for("the used chains", || {
            self.driver.used_idx(&*self.mem.memory()).unwrap() >= count
        });
    }

    /// Waits until the device interrupted the driver at least once. The device publishes the
    /// used ring before it interrupts, so a driver that saw the chains may not have the
    /// interrupt yet.
    fn wait_interrupt(&self) {
        wait_for("an interrupt", || self.irq.count() >= 1);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut data, GuestAddress(addr))
            .unwrap();
        data
    }
}

/// Polls `done` until it holds, failing the test after [`TIMEOUT`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "the device did not hand back {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

fn reads_random_bytes(executor: Executor) {
    let mut rng = Rng::new(RateLimiter::default());
    let metrics = rng.metrics().clone();
    for round in 0..2u16 {
        let mut guest = Guest::activate(&mut rng, executor.clone());
        guest.request(DATA, 4096);
        guest.wait_used(1);
        let (_, len) = guest.driver.used_elem(&*guest.mem.memory(), 0).unwrap();
        assert_eq!(len, 4096);
        assert!(guest.read(DATA, 4096).iter().any(|&b| b != 0));
        guest.wait_interrupt();
        VirtioDevice::<Mem>::reset(&mut rng);
        assert!(!rng.is_active(), "round {round}");
    }
    assert_eq!(metrics.get("entropy_bytes"), Some(8192));
    assert_eq!(metrics.get("activate_fails"), Some(0));
}

#[test]
fn the_entropy_device_runs_on_the_vmm_event_manager() {
    let event_loop = EventLoop::start();
    reads_random_bytes(event_loop.executor.clone());
}

#[test]
fn the_entropy_device_runs_on_a_worker_thread() {
    reads_random_bytes(WorkerGate::new().into());
}

#[test]
fn the_rate_limit_paces_requests_on_the_event_manager() {
    let event_loop = EventLoop::start();
    // 4 KiB per 100 ms, after the first 4 KiB.
    let limiter = RateLimiter::new(bucket(4096, 100), None).unwrap();
    let mut rng = Rng::new(limiter);
    let mut guest = Guest::activate(&mut rng, event_loop.executor.clone());
    let start = Instant::now();
    for i in 0..4u64 {
        guest.request(DATA + i * 4096, 4096);
    }
    guest.wait_used(4);
    let elapsed = start.elapsed();
    // Three refills of 100 ms each.
    assert!(elapsed >= Duration::from_millis(280), "{elapsed:?}");
    assert!(
        rng.metrics().get("entropy_rate_limiter_throttled") >= Some(1),
        "{:?}",
        rng.metrics().values()
    );
    VirtioDevice::<Mem>::reset(&mut rng);
}
