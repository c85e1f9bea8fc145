//! The malicious guest suite: attacks a guest driver can make on the virtio devices, each run
//! through the crate's public API with the mock driver, checking that the device stays in
//! control and that the host heap the attack costs stays under 1 MiB per device.
//!
//! A counting global allocator measures the heap: the most bytes live at once during an
//! attack, beyond those live when it began. The tests of this file run one at a time, so that
//! each measures only itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use ember_rate_limiter::{BucketConfig, BucketUpdate, RateLimiter};
use ember_virtio::block::{self, Block, BlockWorker, Disk, RawFile};
use ember_virtio::mock::{
    CountingTrigger, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, EndlessNetwork, MockBuffer,
    MockDriver, RawDescriptor, guest_memory,
};
use ember_virtio::net::{self, Net, NetHandler, NetRateLimiters};
use ember_virtio::queue::{self, Queue};
use ember_virtio::rng::{self, HostRng, RngHandler};
use ember_virtio::{ActivateParams, VirtioDevice, WorkerGate};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

type Mem = GuestMemoryMmap<()>;

/// The most host heap an attack may cost one device.
const MIB: usize = 1 << 20;

/// Counts the bytes live on the heap, and the most live at once.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst).saturating_add(by);
    PEAK.fetch_max(now, Ordering::SeqCst);
}

fn shrank(by: usize) {
    LIVE.fetch_sub(by, Ordering::SeqCst);
}

// SAFETY: every call goes to the system allocator with the caller's arguments; the counts are
// only bookkeeping on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Held by each test for its whole run, so that no other test allocates meanwhile.
static ALONE: Mutex<()> = Mutex::new(());

/// Runs `attack` alone and returns the most heap it held at once beyond what was live when it
/// began.
fn heap_growth(attack: impl FnOnce()) -> usize {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    attack();
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

fn assert_bounded(growth: usize, what: &str) {
    assert!(
        growth < MIB,
        "{what} cost {growth} bytes of host heap, more than 1 MiB"
    );
    println!("{what}: {growth} bytes of host heap at most");
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor {
        addr,
        len,
        flags,
        next,
    }
}

/// Writes `descs` as a descriptor table at `table`.
fn write_table(mem: &Mem, table: u64, descs: impl IntoIterator<Item = RawDescriptor>) {
    for (i, desc) in (0u64..).zip(descs) {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&desc.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&desc.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        bytes[14..].copy_from_slice(&desc.next.to_le_bytes());
        mem.write_obj(bytes, GuestAddress(table + 16 * i)).unwrap();
    }
}

/// A chain of `len` descriptors in a table, each pointing at the next, with `flags`.
fn linked(buffer: u64, len: u32, flags: u16) -> impl Iterator<Item = RawDescriptor> {
    (1..=len).map(move |next| {
        let more = if next < len { DESC_F_NEXT } else { 0 };
        raw(buffer, 1, flags | more, u16::try_from(next).unwrap_or(0))
    })
}

/// A disk image of `len` bytes on tmpfs where there is one, removed when dropped.
struct Image(PathBuf);

impl Image {
    fn new(len: u64) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ember-malicious-{}-{n}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        Image(path)
    }

    fn block(&self, rate_limiter: RateLimiter) -> Block {
        let config = block::Config::new("victim").with_rate_limiter(rate_limiter);
        Block::new(self.backend(), config).unwrap()
    }

    fn backend(&self) -> RawFile {
        RawFile::open(&self.0, false).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A driver thread that hands every used chain back at once and notifies without end.
struct Storm {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Storm {
    fn start(mem: &Arc<Mem>, driver: &MockDriver, kick: &EventFd) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (mem, mut driver, kick) = (mem.clone(), driver.clone(), kick.try_clone().unwrap());
        let done = stop.clone();
        let thread = thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                driver.refill(&*mem).unwrap();
                let _ = kick.write(1);
                thread::yield_now();
            }
        });
        Storm {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        thread::yield_now();
    }
}

#[test]
fn chains_longer_than_the_queue_end_in_an_error_at_no_cost() {
    let growth = heap_growth(|| {
        let mem = guest_memory(0x20_0000).unwrap();
        let mut driver = MockDriver::new(256, GuestAddress(0));
        let mut queue = driver.queue();
        queue.validate(&mem).unwrap();
        let buffer = 0x1_0000;
        let table = 0x10_0000;
        for _ in 0..200 {
            // An indirect table of 65535 entries: more than the queue holds.
            driver
                .write_descriptor(&mem, 0, raw(table, 65535 * 16, DESC_F_INDIRECT, 0))
                .unwrap();
            driver.publish(&mem, 0).unwrap();
            let err = queue.pop(&mem).unwrap_err();
            assert!(matches!(
                err,
                queue::Error::InvalidIndirectTableLength { .. }
            ));

            // An indirect table of the queue size whose last entry loops back to the first.
            write_table(&mem, table, linked(buffer, 256, DESC_F_WRITE));
            write_table(
                &mem,
                table + 255 * 16,
                [raw(buffer, 1, DESC_F_WRITE | DESC_F_NEXT, 0)],
            );
            driver
                .write_descriptor(&mem, 0, raw(table, 256 * 16, DESC_F_INDIRECT, 0))
                .unwrap();
            driver.publish(&mem, 0).unwrap();
            let err = queue.pop(&mem).unwrap_err();
            assert!(matches!(err, queue::Error::ChainTooLong { ttl: 256 }));

            // 200 direct descriptors, then an indirect table of 100: 300 buffers.
            for i in 0..200u16 {
                driver
                    .write_descriptor(&mem, i, raw(buffer, 1, DESC_F_WRITE | DESC_F_NEXT, i + 1))
                    .unwrap();
            }
            driver
                .write_descriptor(&mem, 200, raw(table, 100 * 16, DESC_F_INDIRECT, 0))
                .unwrap();
            write_table(&mem, table, linked(buffer, 100, DESC_F_WRITE));
            driver.publish(&mem, 0).unwrap();
            let err = queue.pop(&mem).unwrap_err();
            assert!(matches!(err, queue::Error::ChainTooLong { ttl: 256 }));
        }
        // Without VIRTIO_RING_F_INDIRECT_DESC, no indirect table is read at all.
        let mut plain = Queue::new(256);
        plain.set_desc_table(driver.desc_table());
        plain.set_avail_ring(driver.avail_ring());
        plain.set_used_ring(driver.used_ring());
        plain.set_ready(true);
        plain.set_next_avail(queue.next_avail());
        driver
            .write_descriptor(&mem, 0, raw(table, 16, DESC_F_INDIRECT, 0))
            .unwrap();
        driver.publish(&mem, 0).unwrap();
        let err = plain.pop(&mem).unwrap_err();
        assert!(matches!(err, queue::Error::IndirectNotNegotiated));
    });
    assert_bounded(growth, "chains longer than the queue");
}

#[test]
fn merged_receive_buffers_of_long_indirect_chains_cost_a_bounded_heap() {
    let growth = heap_growth(|| {
        let mem = Arc::new(guest_memory(0x100_0000).unwrap());
        let rx = MockDriver::new(net::QUEUE_SIZE, GuestAddress(0));
        let tx = MockDriver::new(net::QUEUE_SIZE, GuestAddress(0x4000));
        // Every receive chain is an indirect table of 255 one-byte buffers.
        let table = 0x10_0000;
        write_table(&mem, table, linked(0x8_0000, 255, DESC_F_WRITE));
        let mut rx_driver = rx.clone();
        for i in 0..net::QUEUE_SIZE {
            rx_driver
                .write_descriptor(&*mem, i, raw(table, 255 * 16, DESC_F_INDIRECT, 0))
                .unwrap();
            rx_driver.publish(&*mem, i).unwrap();
        }
        let (device, peer) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        let features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        let mut queues = vec![rx.queue(), tx.queue()];
        for queue in &mut queues {
            queue.validate(&*mem).unwrap();
        }
        let params = ActivateParams::new(
            mem.clone(),
            features,
            queues,
            vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            Arc::new(CountingTrigger::default()),
            WorkerGate::new(),
        );
        let mut handler = NetHandler::new(device, NetRateLimiters::default(), params).unwrap();
        // The largest frames, each of which would need 257 of those chains.
        let frame = vec![0u8; net::MAX_BUFFER_LEN];
        for _ in 0..24 {
            peer.send(&frame).unwrap();
            handler.process_rx().unwrap();
        }
        assert_eq!(handler.rx_dropped(), 24);
        assert_eq!(rx.used_idx(&*mem).unwrap(), 0, "no chain was taken");
        assert!(!handler.is_broken());
    });
    assert_bounded(growth, "merged receive buffers of long chains");
}

#[test]
fn a_block_ring_kept_full_lets_updates_pause_and_reset_through() {
    let image = Image::new(1 << 20);
    let growth = heap_growth(|| {
        let mut block = image.block(RateLimiter::default());
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let mut driver = MockDriver::new(block::QUEUE_SIZE, GuestAddress(0));
        let (hdr, id, status, table) = (0x1_0000, 0x2_0000, 0x3_0000, 0x4_0000);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
        mem.write_slice(&header, GuestAddress(hdr)).unwrap();
        let request = [
            MockBuffer::readable(hdr, 16),
            MockBuffer::writable(id, 20),
            MockBuffer::writable(status, 1),
        ];
        for _ in 0..block::QUEUE_SIZE {
            driver
                .add_indirect_chain(&*mem, GuestAddress(table), &request)
                .unwrap();
        }
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let gate = WorkerGate::new();
        let queue = driver.queue();
        queue.validate(&*mem).unwrap();
        let params = ActivateParams::new(
            mem.clone(),
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC),
            vec![queue],
            vec![kick.try_clone().unwrap()],
            Arc::new(CountingTrigger::default()),
            gate.clone(),
        );
        VirtioDevice::<Arc<Mem>>::activate(&mut block, params).unwrap();
        let storm = Storm::start(&mem, &driver, &kick);
        wait_until(|| driver.used_idx(&*mem).unwrap() != 0);

        for _ in 0..10 {
            let bandwidth = BucketConfig {
                size: 1 << 30,
                one_time_burst: 0,
                refill_time: 1000,
            };
            block
                .update_rate_limiter(bandwidth.into(), BucketUpdate::None)
                .unwrap()
                .wait()
                .unwrap();
            block.update_disk(image.backend()).unwrap().wait().unwrap();
            gate.pause().unwrap();
            let paused_at = driver.used_idx(&*mem).unwrap();
            // Paused: the ring stays full and nothing is served.
            thread::sleep(std::time::Duration::from_millis(1));
            assert_eq!(driver.used_idx(&*mem).unwrap(), paused_at);
            gate.resume().unwrap();
        }
        VirtioDevice::<Arc<Mem>>::reset(&mut block);
        drop(storm);
        assert!(!block.is_active());
        let metrics = block.metrics();
        assert_eq!(metrics.get("update_count"), Some(20));
        assert_eq!(metrics.get("queue_fails"), Some(0));
    });
    assert_bounded(growth, "a block ring kept full");
}

#[test]
fn a_net_device_flooded_both_ways_lets_updates_pause_and_reset_through() {
    let growth = heap_growth(|| {
        let mut net = Net::new(EndlessNetwork::new(1514).unwrap(), None);
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let mut rx = MockDriver::new(net::QUEUE_SIZE, GuestAddress(0));
        let mut tx = MockDriver::new(net::QUEUE_SIZE, GuestAddress(0x4000));
        // A receive buffer too small for any frame, which stays; a transmit ring kept full.
        rx.add_chain(&*mem, &[MockBuffer::writable(0x1_0000, 64)])
            .unwrap();
        for _ in 0..net::QUEUE_SIZE {
            tx.add_chain(&*mem, &[MockBuffer::readable(0x2_0000, 1514)])
                .unwrap();
        }
        let (rx_kick, tx_kick) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let gate = WorkerGate::new();
        let params = ActivateParams::new(
            mem.clone(),
            1 << VIRTIO_F_VERSION_1,
            vec![rx.queue(), tx.queue()],
            vec![rx_kick.try_clone().unwrap(), tx_kick.try_clone().unwrap()],
            Arc::new(CountingTrigger::default()),
            gate.clone(),
        );
        VirtioDevice::<Arc<Mem>>::activate(&mut net, params).unwrap();
        let storm = Storm::start(&mem, &tx, &tx_kick);
        let metrics = net.metrics().clone();
        wait_until(|| tx.used_idx(&*mem).unwrap() != 0 && metrics.get("rx_fails").unwrap_or(0) > 0);
        for _ in 0..10 {
            net.update_rate_limiters(
                BucketUpdate::Disabled,
                BucketUpdate::None,
                BucketUpdate::Disabled,
                BucketUpdate::None,
            )
            .unwrap()
            .wait()
            .unwrap();
            gate.pause().unwrap();
            let sent = tx.used_idx(&*mem).unwrap();
            let dropped = metrics.get("rx_fails");
            thread::sleep(std::time::Duration::from_millis(1));
            assert_eq!(tx.used_idx(&*mem).unwrap(), sent);
            assert_eq!(metrics.get("rx_fails"), dropped);
            gate.resume().unwrap();
        }
        VirtioDevice::<Arc<Mem>>::reset(&mut net);
        drop(storm);
        assert!(!net.is_active());
        assert_eq!(rx.used_idx(&*mem).unwrap(), 0);
        assert_eq!(metrics.get("queue_fails"), Some(0));
    });
    assert_bounded(growth, "a net device flooded both ways");
}

#[test]
fn throttled_write_zeroes_of_the_largest_size_wait_for_their_bytes() {
    let image = Image::new(u64::from(block::MAX_WRITE_ZEROES_SECTORS) * block::SECTOR_SIZE);
    let growth = heap_growth(|| {
        // 1 MiB per second.
        let limiter = RateLimiter::new(
            Some(BucketConfig {
                size: 1 << 20,
                one_time_burst: 0,
                refill_time: 1000,
            }),
            None,
        )
        .unwrap();
        let disk = Disk::new(image.backend(), false, "victim").unwrap();
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let mut driver = MockDriver::new(block::QUEUE_SIZE, GuestAddress(0));
        let interrupt = Arc::new(CountingTrigger::default());
        let mut worker = BlockWorker::new(disk, driver.queue(), mem.clone(), interrupt, limiter);
        let (hdr, seg) = (0x1_0000, 0x2_0000);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_WRITE_ZEROES.to_le_bytes());
        mem.write_slice(&header, GuestAddress(hdr)).unwrap();
        let mut segment = [0u8; 16];
        segment[8..12].copy_from_slice(&block::MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        // UNMAP: the sparse image only has its hole punched again, which costs no memory.
        segment[12..].copy_from_slice(&VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
        mem.write_slice(&segment, GuestAddress(seg)).unwrap();
        // A full ring of write zeroes of 1 GiB each.
        for i in 0..u64::from(block::QUEUE_SIZE) {
            driver
                .add_indirect_chain(
                    &*mem,
                    GuestAddress(0x4_0000 + 64 * i),
                    &[
                        MockBuffer::readable(hdr, 16),
                        MockBuffer::readable(seg, 16),
                        MockBuffer::writable(0x3_0000 + i, 1),
                    ],
                )
                .unwrap();
        }
        // The first goes on the full bucket and leaves 1023 MiB of debt; it also spends the
        // byte budget of one call.
        assert_eq!(worker.process_queue().unwrap(), 1);
        assert!(worker.budget_spent());
        // The next waits for the debt to be repaid and the bucket to fill again: 1024 s.
        assert_eq!(worker.process_queue().unwrap(), 0);
        assert!(worker.is_throttled());
        let wait = worker.rate_limiter().retry_after().unwrap();
        assert!(wait.as_secs() >= 1023, "{wait:?}");
        assert_eq!(worker.process_queue().unwrap(), 0);
        let metrics = worker.metrics();
        assert_eq!(metrics.get("invalid_reqs_count"), Some(0));
        assert_eq!(metrics.get("rate_limiter_throttled_events"), Some(2));
    });
    assert_bounded(growth, "throttled write zeroes");
}

#[test]
fn entropy_requests_of_huge_indirect_chains_cost_a_bounded_heap_and_bounded_batches() {
    let growth = heap_growth(|| {
        let mem = Arc::new(guest_memory(0x100_0000).unwrap());
        let driver = MockDriver::new(rng::QUEUE_SIZE, GuestAddress(0));
        // Every chain is an indirect table of 255 writable buffers of 64 KiB: almost 16 MiB
        // asked for per request, the same guest pages over and over.
        let table = 0x10_0000;
        write_table(
            &mem,
            table,
            (1..=255u16).map(|next| {
                let more = if next < 255 { DESC_F_NEXT } else { 0 };
                raw(0x20_0000, 0x1_0000, DESC_F_WRITE | more, next)
            }),
        );
        let mut writer = driver.clone();
        for i in 0..rng::QUEUE_SIZE {
            writer
                .write_descriptor(&*mem, i, raw(table, 255 * 16, DESC_F_INDIRECT, 0))
                .unwrap();
            writer.publish(&*mem, i).unwrap();
        }
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut handler = RngHandler::new(
            HostRng,
            RateLimiter::default(),
            mem.clone(),
            driver.queue(),
            queue_evt.try_clone().unwrap(),
            Arc::new(CountingTrigger::default()),
        );
        let per_call = rng::MAX_BATCH_BYTES / rng::MAX_REQUEST_LEN;
        let mut calls = 0;
        while usize::from(driver.used_idx(&*mem).unwrap()) < usize::from(rng::QUEUE_SIZE) {
            let served = handler.process_queue().unwrap();
            assert!(served <= per_call, "{served} chains in one call");
            calls += 1;
            assert!(
                calls <= usize::from(rng::QUEUE_SIZE),
                "the queue never empties"
            );
        }
        for i in 0..rng::QUEUE_SIZE {
            let (_, len) = driver.used_elem(&*mem, i).unwrap();
            assert_eq!(len as usize, rng::MAX_REQUEST_LEN);
        }
        assert!(!handler.is_broken());
    });
    assert_bounded(growth, "entropy requests of huge indirect chains");
}
