//! A block device on a backend that is not ember's, as another VMM would build one: an
//! in-memory disk that implements [`BlockBackend`], with or without discard and write zeroes,
//! driven by the mock driver through the device's request server ([`BlockWorker`]).
//!
//! It depends on ember-virtio alone (with `test-utils`), and on rust-vmm crates.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ember_virtio::block::{
    self, Block, BlockBackend, BlockWorker, Disk, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
    copy_from_bufs, copy_to_bufs,
};
use ember_virtio::iov::GuestIoVecs;
use ember_virtio::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
use ember_virtio::{MmioInterrupt, VirtioDevice};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const SECTORS: u64 = 32;
const SECTOR: usize = 512;

const HDR: u64 = 0x1_0000;
const SEG: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;

/// What the test sees of a [`MemDisk`] the device owns.
#[derive(Clone, Default)]
struct Shared {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// Whether every call fails, as a disk that went away.
    failing: Arc<AtomicBool>,
    /// Calls that reached the backend, of any kind.
    calls: Arc<AtomicUsize>,
    flushes: Arc<AtomicUsize>,
}

impl Shared {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A disk in a `Vec<u8>`: a store that is not a file.
struct MemDisk {
    shared: Shared,
    /// Whether it discards and zeroes ranges.
    trims: bool,
}

impl MemDisk {
    /// A disk of [`SECTORS`] sectors, sector `n` filled with the byte `n + 1`.
    fn new(trims: bool) -> (Self, Shared) {
        let shared = Shared::default();
        *shared.bytes() = (0..SECTORS)
            .flat_map(|n| [u8::try_from(n + 1).unwrap(); SECTOR])
            .collect();
        (
            MemDisk {
                shared: shared.clone(),
                trims,
            },
            shared,
        )
    }

    /// Counts the call, and fails it if the disk is failing.
    fn call(&self) -> io::Result<()> {
        self.shared.calls.fetch_add(1, Ordering::SeqCst);
        if self.shared.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("the disk went away"));
        }
        Ok(())
    }

    /// Runs `f` on the bytes `offset..offset + len`, which must lie on the disk.
    fn with_range<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> io::Result<R> {
        self.call()?;
        let mut bytes = self.shared.bytes();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.checked_add(usize::try_from(len).map_err(io::Error::other)?);
        let range = end
            .and_then(|end| bytes.get_mut(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok(f(range))
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        u64::try_from(self.shared.bytes().len()).unwrap()
    }

    fn read_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        let len = u64::try_from(bufs.len()).unwrap();
        self.with_range(offset, len, |range| copy_to_bufs(bufs, range))
            .map(drop)
    }

    fn write_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        let len = u64::try_from(bufs.len()).unwrap();
        self.with_range(offset, len, |range| copy_from_bufs(bufs, range))
            .map(drop)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.call()?;
        self.shared.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        self.trims
    }

    fn discard_alignment(&self) -> u32 {
        8
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.with_range(offset, len, |range| range.fill(0))
    }

    fn supports_write_zeroes(&self) -> bool {
        self.trims
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.with_range(offset, len, |range| range.fill(0))
    }
}

/// A guest with a block device on a [`MemDisk`], served synchronously.
struct Guest {
    mem: Arc<Mem>,
    driver: MockDriver,
    worker: BlockWorker<Arc<Mem>, MemDisk>,
    irqs: CountingTrigger,
}

impl Guest {
    /// A guest with a writable device on a new [`MemDisk`].
    fn new(trims: bool) -> (Self, Shared) {
        let (backend, shared) = MemDisk::new(trims);
        (
            Guest::with_disk(Disk::new(backend, false, "foreign-disk").unwrap()),
            shared,
        )
    }

    fn with_disk(disk: Disk<MemDisk>) -> Self {
        assert_eq!(disk.capacity(), SECTORS);
        let mem = Arc::new(guest_memory(0x10_0000).unwrap());
        let driver = MockDriver::new(16, GuestAddress(0));
        let irqs = CountingTrigger::default();
        let interrupt = Arc::new(MmioInterrupt::new(irqs.clone()));
        // No rate limit.
        let limiter = Default::default();
        let worker = BlockWorker::new(disk, driver.queue(), mem.clone(), interrupt, limiter);
        Guest {
            mem,
            driver,
            worker,
            irqs,
        }
    }

    /// Sends a request of `type_` at `sector` with `data` between header and status, and
    /// returns the used length and the status byte.
    fn request(&mut self, type_: u32, sector: u64, data: &[MockBuffer]) -> (u32, u8) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&type_.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![MockBuffer::readable(HDR, 16)];
        chain.extend_from_slice(data);
        chain.push(MockBuffer::writable(STATUS, 1));
        let head = self.driver.add_chain(&*self.mem, &chain).unwrap();
        // The device serves it and goes on: no error ends it.
        assert_eq!(self.worker.process_queue().unwrap(), 1);
        let used_idx = self.driver.used_idx(&*self.mem).unwrap();
        let (id, len) = self
            .driver
            .used_elem(&*self.mem, used_idx.wrapping_sub(1))
            .unwrap();
        assert_eq!(id, u32::from(head));
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    /// A discard or write zeroes of `num_sectors` from `sector`.
    fn trim(&mut self, type_: u32, sector: u64, num_sectors: u32) -> (u32, u8) {
        let mut segment = [0u8; 16];
        segment[..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        self.mem.write_slice(&segment, GuestAddress(SEG)).unwrap();
        self.request(type_, 0, &[MockBuffer::readable(SEG, 16)])
    }

    fn read_data(&self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        buf
    }
}

fn sector_of(n: u8) -> Vec<u8> {
    vec![n; SECTOR]
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

#[test]
fn a_device_offers_discard_and_write_zeroes_only_on_a_backend_that_has_them() {
    let block = |trims, read_only| {
        let config = block::Config::new("foreign").with_read_only(read_only);
        Block::new(MemDisk::new(trims).0, config).unwrap()
    };
    let features = |block: &Block<MemDisk>| VirtioDevice::<Arc<Mem>>::features(block);
    let config = |block: &Block<MemDisk>| {
        let mut config = [0u8; block::CONFIG_LEN];
        VirtioDevice::<Arc<Mem>>::read_config(block, 0, &mut config);
        config
    };

    let trims = block(true, false);
    let plain = block(false, false);
    for block in [&trims, &plain] {
        assert!(has(features(block), VIRTIO_BLK_F_FLUSH));
        assert!(!has(features(block), VIRTIO_BLK_F_RO));
        assert_eq!(block.capacity(), SECTORS);
        assert_eq!(config(block)[..8], SECTORS.to_le_bytes());
    }
    assert!(has(features(&trims), VIRTIO_BLK_F_DISCARD));
    assert!(has(features(&trims), VIRTIO_BLK_F_WRITE_ZEROES));
    assert!(!has(features(&plain), VIRTIO_BLK_F_DISCARD));
    assert!(!has(features(&plain), VIRTIO_BLK_F_WRITE_ZEROES));
    // The discard alignment the backend gives, and write zeroes may unmap: the limits of the
    // configuration space are there only for what is offered.
    assert_eq!(config(&trims)[44..48], 8u32.to_le_bytes());
    assert_eq!(config(&trims)[56], 1);
    assert!(config(&plain)[36..60].iter().all(|&b| b == 0));

    // A read-only device offers neither, whatever its backend can do.
    let read_only = block(true, true);
    assert!(has(features(&read_only), VIRTIO_BLK_F_RO));
    assert!(!has(features(&read_only), VIRTIO_BLK_F_DISCARD));
    assert!(!has(features(&read_only), VIRTIO_BLK_F_WRITE_ZEROES));
}

#[test]
fn reads_writes_flushes_discards_write_zeroes_and_get_id_reach_a_foreign_backend() {
    let (mut g, shared) = Guest::new(true);

    // A read of sectors 2 and 3, into two buffers.
    let data = [
        MockBuffer::writable(DATA, 512),
        MockBuffer::writable(DATA + 512, 512),
    ];
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 2, &data), (1025, STATUS_OK));
    assert_eq!(g.read_data(1024), [sector_of(3), sector_of(4)].concat());

    // A write of sector 5.
    g.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let data = [MockBuffer::readable(DATA, 512)];
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 5, &data), (1, STATUS_OK));
    assert_eq!(shared.bytes()[5 * SECTOR..6 * SECTOR], [0xab; 512]);

    assert_eq!(g.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, STATUS_OK));
    assert_eq!(shared.flushes.load(Ordering::SeqCst), 1);

    assert_eq!(g.trim(VIRTIO_BLK_T_DISCARD, 8, 2), (1, STATUS_OK));
    assert_eq!(g.trim(VIRTIO_BLK_T_WRITE_ZEROES, 12, 1), (1, STATUS_OK));
    {
        let bytes = shared.bytes();
        assert!(bytes[8 * SECTOR..10 * SECTOR].iter().all(|&b| b == 0));
        assert_eq!(bytes[10 * SECTOR..11 * SECTOR], sector_of(11));
        assert!(bytes[12 * SECTOR..13 * SECTOR].iter().all(|&b| b == 0));
    }

    // GET_ID is the device's: the ID of its configuration, NUL-padded, never the backend's.
    let calls = shared.calls();
    let data = [MockBuffer::writable(DATA, 20)];
    assert_eq!(g.request(VIRTIO_BLK_T_GET_ID, 0, &data), (21, STATUS_OK));
    let mut expected = b"foreign-disk".to_vec();
    expected.resize(20, 0);
    assert_eq!(g.read_data(20), expected);
    assert_eq!(shared.calls(), calls);

    assert_eq!(g.worker.metrics().get("read_count"), Some(1));
    assert_eq!(g.worker.metrics().get("write_bytes"), Some(512));
    assert_eq!(g.worker.metrics().get("flush_count"), Some(1));
    assert!(g.irqs.count() > 0);
}

#[test]
fn discards_and_write_zeroes_on_a_backend_without_them_are_unsupported() {
    let (mut g, shared) = Guest::new(false);
    assert_eq!(g.trim(VIRTIO_BLK_T_DISCARD, 8, 2), (1, STATUS_UNSUPP));
    assert_eq!(g.trim(VIRTIO_BLK_T_WRITE_ZEROES, 8, 2), (1, STATUS_UNSUPP));
    assert_eq!(shared.calls(), 0, "the backend never saw them");
    assert_eq!(shared.bytes()[8 * SECTOR..9 * SECTOR], sector_of(9));
}

#[test]
fn a_request_out_of_range_is_an_io_error_the_backend_never_sees() {
    let (mut g, shared) = Guest::new(true);
    let data = [MockBuffer::writable(DATA, 1024)];
    // The last sector and the one past it; and a sector whose byte offset overflows.
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, SECTORS - 1, &data),
        (1, STATUS_IOERR)
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, u64::MAX, &data),
        (1, STATUS_IOERR)
    );
    let data = [MockBuffer::readable(DATA, 512)];
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, SECTORS, &data),
        (1, STATUS_IOERR)
    );
    assert_eq!(
        g.trim(VIRTIO_BLK_T_DISCARD, SECTORS - 1, 2),
        (1, STATUS_IOERR)
    );
    assert_eq!(
        g.trim(VIRTIO_BLK_T_WRITE_ZEROES, u64::MAX, 1),
        (1, STATUS_IOERR)
    );
    assert_eq!(shared.calls(), 0);
    // The last sector itself is on the disk.
    let data = [MockBuffer::writable(DATA, 512)];
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, SECTORS - 1, &data),
        (513, STATUS_OK)
    );
    assert_eq!(g.read_data(512), sector_of(32));
    assert_eq!(g.worker.metrics().get("invalid_reqs_count"), Some(5));
}

#[test]
fn a_backend_whose_io_fails_is_answered_io_error_and_the_device_goes_on() {
    let (mut g, shared) = Guest::new(true);
    shared.failing.store(true, Ordering::SeqCst);
    let read = [MockBuffer::writable(DATA, 512)];
    let write = [MockBuffer::readable(DATA, 512)];
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 1, &read), (1, STATUS_IOERR));
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 1, &write), (1, STATUS_IOERR));
    assert_eq!(g.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, STATUS_IOERR));
    assert_eq!(g.trim(VIRTIO_BLK_T_DISCARD, 1, 1), (1, STATUS_IOERR));
    assert_eq!(g.trim(VIRTIO_BLK_T_WRITE_ZEROES, 1, 1), (1, STATUS_IOERR));
    assert_eq!(shared.calls(), 5);
    assert_eq!(g.worker.metrics().get("execute_fails"), Some(5));

    // The disk comes back: the same device serves the next request.
    shared.failing.store(false, Ordering::SeqCst);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 1, &read), (513, STATUS_OK));
    assert_eq!(g.read_data(512), sector_of(2));
}

#[test]
fn a_read_only_device_refuses_writes_before_its_backend_sees_them() {
    let (backend, shared) = MemDisk::new(true);
    let mut g = Guest::with_disk(Disk::new(backend, true, "ro").unwrap());
    let write = [MockBuffer::readable(DATA, 512)];
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 1, &write), (1, STATUS_IOERR));
    assert_eq!(g.trim(VIRTIO_BLK_T_DISCARD, 1, 1), (1, STATUS_IOERR));
    assert_eq!(g.trim(VIRTIO_BLK_T_WRITE_ZEROES, 1, 1), (1, STATUS_IOERR));
    assert_eq!(shared.calls(), 0);
}

/// A backend that can only read.
struct ReadOnly(MemDisk);

impl BlockBackend for ReadOnly {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        self.0.read_vectored(offset, bufs)
    }

    fn write_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        _offset: u64,
        _bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A backend of part of a sector.
struct Odd;

impl BlockBackend for Odd {
    fn capacity(&self) -> u64 {
        1000
    }

    fn read_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        _offset: u64,
        _bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn write_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        _offset: u64,
        _bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_backend_that_cannot_back_the_device_is_refused() {
    let writable = block::Config::new("x");
    let err = Block::new(ReadOnly(MemDisk::new(false).0), writable).unwrap_err();
    assert!(matches!(err, block::Error::ReadOnlyBackend), "{err}");
    let read_only = block::Config::new("x").with_read_only(true);
    assert!(Block::new(ReadOnly(MemDisk::new(false).0), read_only).is_ok());

    let err = Block::new(Odd, block::Config::new("x")).unwrap_err();
    assert!(
        matches!(
            err,
            block::Error::CapacityNotSectorMultiple { capacity: 1000 }
        ),
        "{err}"
    );
}

#[test]
fn a_new_backend_of_another_size_replaces_the_old_one() {
    let (backend, _) = MemDisk::new(true);
    let mut block = Block::new(backend, block::Config::new("swap")).unwrap();
    let (bigger, shared) = MemDisk::new(true);
    shared.bytes().resize(2 * SECTORS as usize * SECTOR, 0);
    block.update_disk(bigger).unwrap().wait().unwrap();
    assert_eq!(block.capacity(), 2 * SECTORS);
    assert_eq!(block.metrics().get("update_count"), Some(1));
}
