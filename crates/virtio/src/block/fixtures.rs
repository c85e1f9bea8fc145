//! Fixtures the tests of the block device and of its handler share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Block, Config, Disk, RawFile, Result, SECTOR_SIZE};
use crate::mock::MockBuffer;

pub(super) type Mem = GuestMemoryMmap<()>;
/// Guest memory as the transport holds it.
pub(super) type Space = Arc<Mem>;

pub(super) const SECTORS: u64 = 64;
pub(super) const HDR: u64 = 0x10000;
pub(super) const DATA: u64 = 0x20000;
pub(super) const STATUS: u64 = 0x40000;
pub(super) const SEG: u64 = 0x41000;
pub(super) const TABLE: u64 = 0x50000;

/// A disk image that is removed when dropped. Sector `n` holds the byte `n + 1`.
pub(super) struct Image {
    pub(super) path: PathBuf,
}

impl Image {
    pub(super) fn new(dir: &Path, len: u64) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("ember-blk-test-{}-{n}", std::process::id()));
        let bytes: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i / SECTOR_SIZE % 250 + 1).unwrap())
            .collect();
        std::fs::write(&path, bytes).unwrap();
        Image { path }
    }

    /// An image on tmpfs, which punches holes but does not zero ranges.
    pub(super) fn on_tmpfs() -> Self {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        Image::new(&dir, SECTORS * SECTOR_SIZE)
    }

    pub(super) fn backend(&self, read_only: bool) -> Result<RawFile> {
        RawFile::open(&self.path, read_only)
    }

    pub(super) fn config(&self, read_only: bool) -> Config {
        Config::new("disk0").with_read_only(read_only)
    }

    pub(super) fn disk(&self, read_only: bool) -> Disk {
        Disk::new(self.backend(read_only).unwrap(), read_only, "disk0").unwrap()
    }

    /// A device on the image, as a VMM makes one.
    pub(super) fn block(&self, read_only: bool) -> Result<Block> {
        Block::new(self.backend(read_only)?, self.config(read_only))
    }

    pub(super) fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(super) fn write_header(mem: &Mem, addr: u64, type_: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&type_.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

pub(super) fn hdr() -> MockBuffer {
    MockBuffer::readable(HDR, 16)
}

pub(super) fn status() -> MockBuffer {
    MockBuffer::writable(STATUS, 1)
}

/// What the image holds in sectors `first..first + count`, as `Image::new` wrote it.
pub(super) fn pattern(first: u64, count: u64) -> Vec<u8> {
    (first..first + count)
        .flat_map(|s| [u8::try_from(s % 250 + 1).unwrap(); 512])
        .collect()
}
