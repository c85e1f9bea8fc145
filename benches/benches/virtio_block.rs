//! The virtio block device's request path: a 4 KiB read and a 4 KiB write, each a chain of
//! header, data and status that the mock driver publishes, served by
//! [`BlockWorker::process_queue`] from a disk image on tmpfs (`/dev/shm`, or the directory
//! `EMBER_BENCH_BLK_DIR` names): pop, parse, one
//! `preadv`/`pwritev` straight between the file and guest memory, the status byte, the used
//! element, notification suppression and the interrupt decision.
//!
//! Beside them, in the same group, a plain `pread`/`pwrite` of 4 KiB on the same file: the
//! physical limit, which the request path is measured against. Each request of the device is
//! timed on its own, between two clock reads, since the driver publishes the next one untimed;
//! so is each `pread`/`pwrite`, so that both sides pay the same clock reads (about 25-50 ns
//! here, which criterion's batched timing would otherwise spare the syscall alone). `_null`
//! is the device's own work: the same requests on a backend that moves no bytes;
//! `ember_read_null_syscall` the same with one cheap system call (`getppid`) per request in the
//! backend's place, beside `raw_syscall`, that call alone: what a system call costs the
//! device's own work after it (caches, TLB and branch predictors the kernel used). Then the
//! same reads and writes through the asynchronous engine ([`IoEngine::Async`], io_uring): one
//! request per notification, and 32 in flight per notification (`_qd32`, one iteration being
//! the 32 requests, counted as 32 elements), from publishing to the one used-ring update of
//! their completions.
//!
//! Each request is served on its own (a batch of one), so every request pays the whole
//! per-batch cost, and the driver asks for an interrupt for each (EVENT_IDX, as Linux negotiates
//! it). The driver publishes each chain outside the timed part. The interrupt is a counter:
//! delivering it (an irqfd write in a VMM) is the transport's cost, not the device's.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ember_virtio::MmioInterrupt;
use ember_virtio::block::{AsyncIo, BlockBackend, BlockWorker, Disk, IoEngine, RawFile, STATUS_OK};
use ember_virtio::iov::GuestIoVecs;
use ember_virtio::mmio::INT_USED_RING;
use ember_virtio::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const IMAGE_LEN: usize = 1 << 20;
const BLOCK: u32 = 4096;
/// The sector both paths read and write, 4 KiB aligned.
const SECTOR: u64 = 8;
const OFFSET: u64 = SECTOR * 512;

/// Request `i` has its header at `HEADER + 16 * i`, its data at `DATA + 4096 * i` and its
/// status at `STATUS + i`.
const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x12000;
/// The requests in flight per notification of the `_qd32` cases.
const DEPTH: u64 = 32;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

/// A disk image on tmpfs, removed when dropped.
struct Image(PathBuf);

impl Image {
    fn new() -> Self {
        let dir = std::env::var_os("EMBER_BENCH_BLK_DIR").unwrap_or_else(|| "/dev/shm".into());
        let path = PathBuf::from(dir).join(format!("ember-bench-blk-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; IMAGE_LEN]).expect("cannot write the disk image");
        Image(path)
    }

    fn open(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.0)
            .expect("cannot open the image")
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A backend that moves no bytes: what the device costs on its own. With `syscall`, it makes
/// one cheap system call per request instead (`getppid`): what the device's own work costs
/// after a system call, against that call alone.
struct Null {
    syscall: bool,
}

impl BlockBackend for Null {
    fn capacity(&self) -> u64 {
        IMAGE_LEN as u64
    }

    fn read_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        _offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        black_box(bufs.iovecs());
        if self.syscall {
            black_box(std::os::unix::process::parent_id());
        }
        Ok(())
    }

    fn write_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        _offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        black_box(bufs.iovecs());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A guest with a block device on `B`.
struct Guest<B: BlockBackend = RawFile> {
    mem: Arc<GuestMemoryMmap<()>>,
    driver: MockDriver,
    worker: BlockWorker<Arc<GuestMemoryMmap<()>>, B>,
    irqs: CountingTrigger,
    interrupt: Arc<MmioInterrupt>,
    /// Waits on the asynchronous engine's completion eventfd.
    completions: Option<Epoll>,
}

impl Guest {
    /// A guest with a block device on the image, on `engine`.
    fn new(image: &Image, engine: IoEngine) -> Self {
        let backend = RawFile::open(&image.0, false).expect("cannot open the disk");
        Self::on(backend, engine)
    }
}

impl<B: BlockBackend> Guest<B> {
    fn on(backend: B, engine: IoEngine) -> Self {
        let disk = Disk::new(backend, false, "bench").expect("cannot open the disk");
        let mem = Arc::new(guest_memory(0x100000).expect("cannot map guest memory"));
        let driver = MockDriver::new(256, GuestAddress(0));
        let irqs = CountingTrigger::default();
        let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
        // EVENT_IDX, as a Linux guest negotiates it.
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        // No limit: what is measured is the request path, the limiter's check included.
        let mut worker = BlockWorker::new(
            disk,
            queue,
            mem.clone(),
            interrupt.clone(),
            Default::default(),
        );
        let mut completions = None;
        if engine == IoEngine::Async {
            worker = worker.with_async_io(AsyncIo::new(256).expect("the host has no io_uring"));
            let epoll = Epoll::new().expect("cannot create an epoll set");
            let fd = worker.completion_fd().expect("the engine has an eventfd");
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
                .expect("cannot wait on the completion eventfd");
            completions = Some(epoll);
        }
        Guest {
            mem,
            driver,
            worker,
            irqs,
            interrupt,
            completions,
        }
    }

    /// Times `iters` batches of `depth` requests of `type_`, each batch published untimed and
    /// served on its own: handed back by `process_queue`, or, on the asynchronous engine,
    /// once the completion eventfd says the rest are done.
    fn time(&mut self, type_: u32, depth: u64, iters: u64) -> Duration {
        let chains: Vec<_> = (0..depth)
            .map(|i| {
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&type_.to_le_bytes());
                header[8..].copy_from_slice(&(SECTOR + 8 * i).to_le_bytes());
                self.mem
                    .write_slice(&header, GuestAddress(HEADER + 16 * i))
                    .expect("the header is in guest memory");
                [
                    MockBuffer::readable(HEADER + 16 * i, 16),
                    MockBuffer {
                        addr: GuestAddress(DATA + u64::from(BLOCK) * i),
                        len: BLOCK,
                        writable: type_ == VIRTIO_BLK_T_IN,
                    },
                    MockBuffer::writable(STATUS + i, 1),
                ]
            })
            .collect();
        let mut elapsed = Duration::ZERO;
        for _ in 0..iters {
            // The driver wants an interrupt for this batch, as a Linux guest does.
            let used = self
                .driver
                .used_idx(&*self.mem)
                .expect("the ring is readable");
            self.driver
                .set_used_event(&*self.mem, used)
                .expect("the ring is in guest memory");
            for chain in &chains {
                self.driver
                    .add_chain(&*self.mem, chain)
                    .expect("the ring is in guest memory");
            }
            let start = Instant::now();
            let served = self.worker.process_queue().expect("the queue is valid");
            let completed = self.complete();
            elapsed += start.elapsed();
            black_box((served, completed));
            // The driver takes the interrupt before its next batch, so that nothing shows the
            // worker more requests in flight than the batch: it holds its interrupt only to
            // probe, once in `PROBE_INTERVAL` at most (about 1% of the time).
            self.interrupt.ack(INT_USED_RING);
        }
        elapsed
    }

    /// Waits for the asynchronous engine to complete the requests still in flight (those the
    /// kernel completed while it took them were handed back by `process_queue`), and hands
    /// them back; nothing on the synchronous engine.
    fn complete(&mut self) -> usize {
        let Some(epoll) = &self.completions else {
            return 0;
        };
        let mut events = [EpollEvent::default()];
        let mut done = 0;
        while self.worker.in_flight() > 0 {
            match epoll.wait(-1, &mut events) {
                Ok(_) => {}
                // The ring's task work interrupts the wait, as it does any event loop's.
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => panic!("cannot wait for completions: {err}"),
            }
            done += self
                .worker
                .process_completions()
                .expect("the queue is valid");
        }
        done
    }

    fn status(&self) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS))
            .expect("the status is in guest memory")
    }
}

/// Times `iters` calls of `f`, each between its own two clock reads, as [`Guest::time`] times
/// each request.
fn time_each(iters: u64, mut f: impl FnMut()) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        f();
        elapsed += start.elapsed();
    }
    elapsed
}

fn bench_4k(c: &mut Criterion) {
    let image = Image::new();
    let file = image.open();
    let mut guest = Guest::new(&image, IoEngine::Sync);
    let mut uring = Guest::new(&image, IoEngine::Async);

    // What is measured below: requests that succeed and move the data.
    guest
        .mem
        .write_slice(&[0xa5; BLOCK as usize], GuestAddress(DATA))
        .expect("the data buffer is in guest memory");
    guest.time(VIRTIO_BLK_T_OUT, 1, 1);
    assert_eq!(guest.status(), STATUS_OK);
    let mut back = [0u8; BLOCK as usize];
    file.read_exact_at(&mut back, OFFSET)
        .expect("the image is readable");
    assert_eq!(back, [0xa5; BLOCK as usize]);
    file.write_all_at(&[0x3c; BLOCK as usize], OFFSET)
        .expect("the image is writable");
    guest.time(VIRTIO_BLK_T_IN, 1, 1);
    assert_eq!(guest.status(), STATUS_OK);
    let mut data = [0u8; BLOCK as usize];
    guest
        .mem
        .read_slice(&mut data, GuestAddress(DATA))
        .expect("the data buffer is in guest memory");
    assert_eq!(data, [0x3c; BLOCK as usize]);
    assert_eq!(guest.irqs.count(), 2, "each request interrupts");
    // The asynchronous engine reads the same bytes, and a batch interrupts once.
    uring.time(VIRTIO_BLK_T_IN, DEPTH, 1);
    assert_eq!(uring.status(), STATUS_OK);
    assert_eq!(uring.irqs.count(), 1, "a batch interrupts once");
    uring
        .mem
        .read_slice(&mut data, GuestAddress(DATA))
        .expect("the data buffer is in guest memory");
    assert_eq!(data, [0x3c; BLOCK as usize]);

    let mut group = c.benchmark_group("virtio_block/4k");
    group.throughput(Throughput::Elements(1));
    let mut buf = vec![0u8; BLOCK as usize];
    group.bench_function("raw_pread", |b| {
        b.iter_custom(|iters| {
            time_each(iters, || {
                file.read_exact_at(black_box(&mut buf), black_box(OFFSET))
                    .expect("the image is readable")
            })
        })
    });
    group.bench_function("ember_read", |b| {
        b.iter_custom(|iters| guest.time(VIRTIO_BLK_T_IN, 1, iters))
    });
    group.bench_function("raw_pwrite", |b| {
        b.iter_custom(|iters| {
            time_each(iters, || {
                file.write_all_at(black_box(&buf), black_box(OFFSET))
                    .expect("the image is writable")
            })
        })
    });
    group.bench_function("ember_write", |b| {
        b.iter_custom(|iters| guest.time(VIRTIO_BLK_T_OUT, 1, iters))
    });
    // The device alone: the same requests on a backend that moves no bytes.
    let mut null = Guest::on(Null { syscall: false }, IoEngine::Sync);
    group.bench_function("ember_read_null", |b| {
        b.iter_custom(|iters| null.time(VIRTIO_BLK_T_IN, 1, iters))
    });
    group.bench_function("ember_write_null", |b| {
        b.iter_custom(|iters| null.time(VIRTIO_BLK_T_OUT, 1, iters))
    });
    // The device alone with a system call in the backend's place, beside the call alone: how
    // much more the device's own work costs once a system call ran before it.
    group.bench_function("raw_syscall", |b| {
        b.iter_custom(|iters| {
            time_each(iters, || {
                black_box(std::os::unix::process::parent_id());
            })
        })
    });
    let mut null_syscall = Guest::on(Null { syscall: true }, IoEngine::Sync);
    group.bench_function("ember_read_null_syscall", |b| {
        b.iter_custom(|iters| null_syscall.time(VIRTIO_BLK_T_IN, 1, iters))
    });
    group.bench_function("ember_async_read", |b| {
        b.iter_custom(|iters| uring.time(VIRTIO_BLK_T_IN, 1, iters))
    });
    group.bench_function("ember_async_write", |b| {
        b.iter_custom(|iters| uring.time(VIRTIO_BLK_T_OUT, 1, iters))
    });
    group.throughput(Throughput::Elements(DEPTH));
    group.bench_function("ember_read_qd32", |b| {
        b.iter_custom(|iters| guest.time(VIRTIO_BLK_T_IN, DEPTH, iters))
    });
    group.bench_function("ember_async_read_qd32", |b| {
        b.iter_custom(|iters| uring.time(VIRTIO_BLK_T_IN, DEPTH, iters))
    });
    group.bench_function("ember_write_qd32", |b| {
        b.iter_custom(|iters| guest.time(VIRTIO_BLK_T_OUT, DEPTH, iters))
    });
    group.bench_function("ember_async_write_qd32", |b| {
        b.iter_custom(|iters| uring.time(VIRTIO_BLK_T_OUT, DEPTH, iters))
    });
    group.finish();
}

criterion_group!(benches, bench_4k);
criterion_main!(benches);
