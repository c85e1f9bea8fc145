//! Malicious guests against the real `ember` process: tiny guests (a few bytes of 64-bit code in
//! an ELF, run on the host's `/dev/kvm`) that drive a virtio-mmio block device with plain `mov`
//! instructions and attack the host through it.
//!
//! Each test boots one attack through the API, lets it run, and checks what is deterministic on a
//! busy host: the API answers every request, pause, resume and a drive update complete, `ember`'s
//! peak RSS stays near an idle guest's, the log stays small, and `SIGTERM` stops it cleanly.
//! Timings are not asserted; `attack_report` (ignored, run by hand) measures and prints them.
//!
//! The unit-level attacks on the queue and the devices, with the mock driver, are in
//! `crates/virtio/tests/malicious_guest.rs`; the console flood is in `tests/api.rs`
//! (`a_guest_filling_a_console_nobody_reads_is_paused_measured_and_stopped`) and is only
//! measured here.
//!
//! # The guests
//!
//! Every guest first writes to each page of its RAM above 1 MiB, so that all of it is resident
//! in `ember` whatever the guest does next: the peak RSS of two guests then differs only by what
//! the host allocated for them. The code is entered at [`TINY_LOAD_ADDR`] in 64-bit mode, with
//! the low 4 GiB identity-mapped; the queue's descriptors, rings and requests are data placed
//! after the code in the same ELF segment ([`Image`]), so the guest only has to write the MMIO
//! registers and bump the available index.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ember_boot::test_utils::{TINY_LOAD_ADDR, tiny_elf};
use serde_json::{Value, json};

mod common;
use common::{Scratch, wait_for_api};

/// Guest RAM of every attack, in MiB: room for the code, the rings and a 1 MiB indirect table.
const MEM_MIB: u64 = 16;

/// Where the block device's register page is: the first MMIO slot, since no boot timer is asked
/// for (`attach_drives` in `vmm.rs` puts drives first).
const BLOCK_MMIO: u32 = 0xd000_0000;

// virtio-mmio register offsets (virtio 1.2, 4.2.2).
const DEVICE_FEATURES: u32 = 0x010;
const DEVICE_FEATURES_SEL: u32 = 0x014;
const DRIVER_FEATURES: u32 = 0x020;
const DRIVER_FEATURES_SEL: u32 = 0x024;
const QUEUE_SEL: u32 = 0x030;
const QUEUE_NUM: u32 = 0x038;
const QUEUE_READY: u32 = 0x044;
const QUEUE_NOTIFY: u32 = 0x050;
const STATUS: u32 = 0x070;
const QUEUE_DESC_LOW: u32 = 0x080;
const QUEUE_DESC_HIGH: u32 = 0x084;
const QUEUE_AVAIL_LOW: u32 = 0x090;
const QUEUE_AVAIL_HIGH: u32 = 0x094;
const QUEUE_USED_LOW: u32 = 0x0a0;
const QUEUE_USED_HIGH: u32 = 0x0a4;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const FEATURES_OK: u32 = 8;
const DRIVER_OK: u32 = 4;

// Feature bits the guests accept, where the device offers them.
const F_VERSION_1: u64 = 1 << 32;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_BLK_DISCARD: u64 = 1 << 13;
const F_BLK_WRITE_ZEROES: u64 = 1 << 14;

// Descriptor flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;

// Block request types.
const T_IN: u32 = 0;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// The block device's queue size (`QUEUE_SIZE` in `crates/virtio/src/block`), the size every
/// guest asks for.
const QUEUE_SIZE: u16 = 256;
/// The most entries an indirect table can declare: its length is a `u32` of bytes, but the
/// `next` field that links its entries is a `u16`.
const MAX_INDIRECT: u32 = 65_535;
/// The most sectors one discard or write zeroes may cover, as the device's configuration says.
const MAX_RANGE_SECTORS: u32 = 1 << 21;
const SECTOR: u64 = 512;

// Guest-physical layout of the data after the code.
const CODE_MAX: u64 = 0x1_0000;
const DESC_TABLE: u64 = TINY_LOAD_ADDR + CODE_MAX;
const AVAIL_RING: u64 = DESC_TABLE + 0x1000;
const USED_RING: u64 = AVAIL_RING + 0x1000;
const HEADERS: u64 = USED_RING + 0x2000;
const SEGMENTS: u64 = HEADERS + 0x1000;
const STATUSES: u64 = SEGMENTS + 0x1000;
const INDIRECT_TABLE: u64 = TINY_LOAD_ADDR + 0x2_0000;
/// Where the device writes read data: guest RAM beyond the image.
const DATA: u64 = 0x30_0000;
/// Bytes one read of the storm asks for.
const READ_LEN: u32 = 64 * 1024;

/// A little x86-64 assembler: the few instructions the guests need, each emitted by a method
/// named after it. Addresses are below 4 GiB, so `mov eax, imm32` loads a whole address.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
}

impl Asm {
    /// Appends raw machine code.
    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    /// `mov eax, imm32`.
    fn mov_eax(&mut self, value: u32) -> &mut Self {
        self.emit(&[0xb8]).emit(&value.to_le_bytes())
    }

    /// `mov eax, addr; mov dword [rax], value`: one 32-bit MMIO (or memory) write.
    fn mmio_write32(&mut self, addr: u32, value: u32) -> &mut Self {
        self.mov_eax(addr)
            .emit(&[0xc7, 0x00])
            .emit(&value.to_le_bytes())
    }

    /// Writes `value` to the block device's register at `offset`.
    fn reg(&mut self, offset: u32, value: u32) -> &mut Self {
        self.mmio_write32(BLOCK_MMIO + offset, value)
    }

    /// `mov eax, addr; mov ecx, dword [rax]`: one 32-bit MMIO read into `ecx`.
    fn mmio_read32_ecx(&mut self, addr: u32) -> &mut Self {
        self.mov_eax(addr).emit(&[0x8b, 0x08])
    }

    /// The current position, to jump back to.
    fn label(&self) -> usize {
        self.code.len()
    }

    /// A jump with a 32-bit displacement to `target`: `opcode` is `e9` (`jmp`) or `0f 82`
    /// (`jb`).
    fn jump(&mut self, opcode: &[u8], target: usize) -> &mut Self {
        let end = self.code.len() + opcode.len() + 4;
        let rel = i32::try_from(target as i64 - end as i64).expect("guest code is small");
        self.emit(opcode).emit(&rel.to_le_bytes())
    }

    /// `jmp target`.
    fn jmp(&mut self, target: usize) -> &mut Self {
        self.jump(&[0xe9], target)
    }

    /// `hlt; jmp .-1`: stop for good (interrupts are off).
    fn halt(&mut self) -> &mut Self {
        let here = self.label();
        self.emit(&[0xf4]).jmp(here)
    }

    /// Writes to every page from 1 MiB to the end of RAM without changing it (`or byte [rax],
    /// 0`), so that all of the guest's RAM is resident in the host.
    fn touch_all_ram(&mut self) -> &mut Self {
        let end = u32::try_from(MEM_MIB << 20).unwrap();
        self.mov_eax(u32::try_from(TINY_LOAD_ADDR).unwrap());
        let top = self.label();
        self.emit(&[0x80, 0x08, 0x00]) // or byte [rax], 0
            .emit(&[0x05])
            .emit(&0x1000u32.to_le_bytes()) // add eax, 4096
            .emit(&[0x3d])
            .emit(&end.to_le_bytes()) // cmp eax, end
            .jump(&[0x0f, 0x82], top) // jb top
    }

    /// The driver's side of device initialization (virtio 1.2, 3.1.1): reset, ACKNOWLEDGE,
    /// DRIVER, accept the `wanted` features the device offers, FEATURES_OK, set up queue 0 on
    /// the rings at [`DESC_TABLE`], [`AVAIL_RING`] and [`USED_RING`], DRIVER_OK.
    fn init_block(&mut self, wanted: u64) -> &mut Self {
        self.init_block_with(wanted, true)
    }

    /// [`init_block`](Self::init_block), with the queue made ready or, if not `ready`, left
    /// not ready: then DRIVER_OK is an activation the device must refuse.
    fn init_block_with(&mut self, wanted: u64, ready: bool) -> &mut Self {
        self.reg(STATUS, 0)
            .reg(STATUS, ACKNOWLEDGE)
            .reg(STATUS, ACKNOWLEDGE | DRIVER);
        for (sel, mask) in [(1u32, (wanted >> 32) as u32), (0, wanted as u32)] {
            self.reg(DEVICE_FEATURES_SEL, sel)
                .mmio_read32_ecx(BLOCK_MMIO + DEVICE_FEATURES)
                .emit(&[0x81, 0xe1])
                .emit(&mask.to_le_bytes()) // and ecx, mask
                .reg(DRIVER_FEATURES_SEL, sel)
                .mov_eax(BLOCK_MMIO + DRIVER_FEATURES)
                .emit(&[0x89, 0x08]); // mov dword [rax], ecx
        }
        let low = |addr: u64| u32::try_from(addr).unwrap();
        self.reg(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
            .reg(QUEUE_SEL, 0)
            .reg(QUEUE_NUM, u32::from(QUEUE_SIZE))
            .reg(QUEUE_DESC_LOW, low(DESC_TABLE))
            .reg(QUEUE_DESC_HIGH, 0)
            .reg(QUEUE_AVAIL_LOW, low(AVAIL_RING))
            .reg(QUEUE_AVAIL_HIGH, 0)
            .reg(QUEUE_USED_LOW, low(USED_RING))
            .reg(QUEUE_USED_HIGH, 0)
            .reg(QUEUE_READY, u32::from(ready))
            .reg(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    }

    /// Forever: make the available index the used index plus the queue size, and notify. The
    /// ring never empties and never holds more than the queue (so the device cannot call it
    /// broken): every request the device completes is published again at once.
    fn storm(&mut self) -> &mut Self {
        let top = self.label();
        self.mov_eax(u32::try_from(USED_RING + 2).unwrap())
            .emit(&[0x0f, 0xb7, 0x08]) // movzx ecx, word [rax]
            .emit(&[0x81, 0xc1])
            .emit(&u32::from(QUEUE_SIZE).to_le_bytes()) // add ecx, QUEUE_SIZE
            .mov_eax(u32::try_from(AVAIL_RING + 2).unwrap())
            .emit(&[0x66, 0x89, 0x08]) // mov word [rax], cx
            .reg(QUEUE_NOTIFY, 0)
            .jmp(top)
    }
}

/// The bytes of one split-queue descriptor.
fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// The bytes of a block request header: type, reserved, sector.
fn request_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A discard / write zeroes segment: sector, number of sectors, flags (none: no UNMAP).
fn segment(sector: u64, sectors: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s
}

/// A guest's ELF segment: code at [`TINY_LOAD_ADDR`], data placed at guest addresses after it.
struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// An image of `code` followed by zeroed rings.
    fn new(code: &Asm) -> Self {
        assert!(code.code.len() as u64 <= CODE_MAX, "guest code too large");
        let mut image = Image {
            bytes: code.code.clone(),
        };
        // The rings exist (zeroed) in every image.
        image.put(STATUSES + 0x1000, &[]);
        image
    }

    /// Places `data` at guest address `addr`.
    fn put(&mut self, addr: u64, data: &[u8]) -> &mut Self {
        let at = usize::try_from(addr - TINY_LOAD_ADDR).unwrap();
        if self.bytes.len() < at + data.len() {
            self.bytes.resize(at + data.len(), 0);
        }
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self
    }

    /// Descriptor `index` of the queue.
    fn desc(&mut self, index: u16, d: [u8; 16]) -> &mut Self {
        self.put(DESC_TABLE + 16 * u64::from(index), &d)
    }

    /// Every entry of the available ring names `heads[i % heads.len()]`; the index is `idx`.
    fn avail(&mut self, heads: &[u16], idx: u16) -> &mut Self {
        let mut ring = vec![0u8; 4 + 2 * usize::from(QUEUE_SIZE)];
        ring[2..4].copy_from_slice(&idx.to_le_bytes());
        for i in 0..usize::from(QUEUE_SIZE) {
            ring[4 + 2 * i..6 + 2 * i].copy_from_slice(&heads[i % heads.len()].to_le_bytes());
        }
        self.put(AVAIL_RING, &ring)
    }

    /// A read of [`READ_LEN`] bytes from sector 0 into [`DATA`], as descriptors 0 to 2, and
    /// every ring entry naming it.
    fn read_request(&mut self) -> &mut Self {
        self.put(HEADERS, &request_header(T_IN, 0))
            .desc(0, descriptor(HEADERS, 16, DESC_NEXT, 1))
            .desc(1, descriptor(DATA, READ_LEN, DESC_WRITE | DESC_NEXT, 2))
            .desc(2, descriptor(STATUSES, 1, DESC_WRITE, 0))
            .avail(&[0], 0)
    }

    /// The ELF that loads this image and enters its code.
    fn elf(&self) -> Vec<u8> {
        tiny_elf(&self.bytes)
    }
}

/// The guest the others are measured against: it sets the device up as the storm does, with a
/// read request in the ring, and halts without ever notifying.
fn idle_guest() -> Image {
    let mut code = Asm::default();
    code.touch_all_ram().init_block(F_VERSION_1).halt();
    let mut image = Image::new(&code);
    image.read_request();
    image
}

/// Attack 1: the same valid reads published again forever, with a notification each time.
fn storm_guest() -> Image {
    let mut code = Asm::default();
    code.touch_all_ram().init_block(F_VERSION_1).storm();
    let mut image = Image::new(&code);
    image.read_request();
    image
}

/// Attack 2: every ring entry is one read through an indirect table of `entries` entries:
/// header, data buffers of 512 bytes (all the same one), status. With `looping`, the last entry
/// links back to the first data buffer instead of ending the chain.
fn indirect_guest(entries: u32, looping: bool) -> Image {
    let mut code = Asm::default();
    code.touch_all_ram()
        .init_block(F_VERSION_1 | F_INDIRECT_DESC)
        .storm();
    let mut image = Image::new(&code);
    let last = u16::try_from(entries - 1).unwrap();
    let mut table = Vec::with_capacity(entries as usize * 16);
    table.extend_from_slice(&descriptor(HEADERS, 16, DESC_NEXT, 1));
    for i in 1..last {
        table.extend_from_slice(&descriptor(DATA, 512, DESC_WRITE | DESC_NEXT, i + 1));
    }
    table.extend_from_slice(&if looping {
        descriptor(DATA, 512, DESC_WRITE | DESC_NEXT, 1)
    } else {
        descriptor(STATUSES, 1, DESC_WRITE, 0)
    });
    image
        .put(HEADERS, &request_header(T_IN, 0))
        .put(INDIRECT_TABLE, &table)
        .desc(
            0,
            descriptor(INDIRECT_TABLE, entries * 16, DESC_INDIRECT, 0),
        )
        .avail(&[0], 0);
    image
}

/// Attack 3: forever, reset the device and initialize it again, with one read notified; then
/// reset it and start it with its queue not ready, an activation that fails (and that a device
/// may want to log).
fn reset_loop_guest() -> Image {
    let mut code = Asm::default();
    code.touch_all_ram();
    let top = code.label();
    code.init_block(F_VERSION_1)
        .reg(QUEUE_NOTIFY, 0)
        .init_block_with(F_VERSION_1, false)
        .jmp(top);
    let mut image = Image::new(&code);
    image.read_request().avail(&[0], 1);
    image
}

/// The ranges of [`discard_guest`]: three write zeroes of the largest size on the first three
/// GiB, one discard of the largest size on the fourth.
const DISCARD_DISK_LEN: u64 = 4 << 30;

/// Attack 4: the ring full of the largest write zeroes (without UNMAP, so that the host
/// allocates) and discards, published again forever.
fn discard_guest() -> Image {
    let mut code = Asm::default();
    code.touch_all_ram()
        .init_block(F_VERSION_1 | F_BLK_DISCARD | F_BLK_WRITE_ZEROES)
        .storm();
    let mut image = Image::new(&code);
    let mut heads = Vec::new();
    for i in 0..4u16 {
        let sector = u64::from(i) * u64::from(MAX_RANGE_SECTORS);
        let kind = if i < 3 { T_WRITE_ZEROES } else { T_DISCARD };
        let (header, seg, status) = (
            HEADERS + 16 * u64::from(i),
            SEGMENTS + 16 * u64::from(i),
            STATUSES + u64::from(i),
        );
        image
            .put(header, &request_header(kind, 0))
            .put(seg, &segment(sector, MAX_RANGE_SECTORS))
            .desc(3 * i, descriptor(header, 16, DESC_NEXT, 3 * i + 1))
            .desc(3 * i + 1, descriptor(seg, 16, DESC_NEXT, 3 * i + 2))
            .desc(3 * i + 2, descriptor(status, 1, DESC_WRITE, 0));
        heads.push(3 * i);
    }
    image.avail(&heads, 0);
    image
}

/// `mov dx, 0x3f8; loop: mov al, 'x'; out dx, al; jmp loop`: the console flood of `tests/api.rs`,
/// without its way out (this guest is stopped by `SIGTERM`).
fn console_flood_guest() -> Image {
    let mut code = Asm::default();
    code.touch_all_ram().emit(&[0x66, 0xba, 0xf8, 0x03]);
    let top = code.label();
    code.emit(&[0xb0, b'x', 0xee]).jmp(top);
    Image::new(&code)
}

/// One attack: its guest and the drive it attacks.
struct Attack {
    name: &'static str,
    image: Image,
    /// The drive's length (a sparse file).
    disk_len: u64,
    /// The drive's `rate_limiter`, if any.
    rate_limiter: Option<Value>,
    /// Whether the console goes to a stdout pipe nobody reads (instead of nowhere).
    console_to_stalled_stdout: bool,
}

impl Attack {
    fn new(name: &'static str, image: Image) -> Self {
        Attack {
            name,
            image,
            disk_len: 1 << 20,
            rate_limiter: None,
            console_to_stalled_stdout: false,
        }
    }
}

fn idle() -> Attack {
    Attack::new("idle guest (baseline)", idle_guest())
}

fn storm() -> Attack {
    Attack::new("1 notification storm", storm_guest())
}

fn largest_indirect() -> Attack {
    Attack {
        disk_len: 64 << 20,
        ..Attack::new(
            "2a indirect table of 65535",
            indirect_guest(MAX_INDIRECT, false),
        )
    }
}

fn looping_indirect() -> Attack {
    Attack {
        disk_len: 64 << 20,
        ..Attack::new(
            "2b indirect table of 256 that loops",
            indirect_guest(u32::from(QUEUE_SIZE), true),
        )
    }
}

/// The longest chain the device serves: an indirect table as long as the queue, valid.
fn longest_valid_indirect() -> Attack {
    Attack {
        disk_len: 64 << 20,
        ..Attack::new(
            "2c indirect table of 256, valid",
            indirect_guest(u32::from(QUEUE_SIZE), false),
        )
    }
}

fn reset_loop() -> Attack {
    Attack::new("3 reset/re-activate loop", reset_loop_guest())
}

/// The drive's bandwidth limit in attack 4: 1 MiB a second.
const DISCARD_BANDWIDTH: u64 = 1 << 20;

fn discards() -> Attack {
    Attack {
        disk_len: DISCARD_DISK_LEN,
        rate_limiter: Some(json!({"bandwidth": {"size": DISCARD_BANDWIDTH, "refill_time": 1000}})),
        ..Attack::new("4 largest discard/write zeroes", discard_guest())
    }
}

fn console_flood() -> Attack {
    Attack {
        console_to_stalled_stdout: true,
        ..Attack::new("5 console flood, stdout unread", console_flood_guest())
    }
}

/// How long any one API request may take before it counts as unanswered: generous, since two
/// cores run the tests, the attacking vCPU and `ember`'s threads.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes one request on `stream` and reads its status and body.
fn exchange(
    stream: &mut BufReader<UnixStream>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> io::Result<(u16, String)> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    match body {
        Some(body) => {
            let body = body.to_string();
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        }
        None => request.push_str("\r\n"),
    }
    stream.get_mut().write_all(request.as_bytes())?;
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0;
    loop {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().map_err(io::Error::other)?;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A connection whose reads give up after [`REQUEST_TIMEOUT`].
fn connect(socket: &Path) -> io::Result<BufReader<UnixStream>> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(BufReader::new(stream))
}

/// One request on a new connection: its status and body, or why there was none.
fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> io::Result<(u16, String)> {
    exchange(&mut connect(socket)?, method, path, body.as_ref())
}

/// A request expected to succeed, during setup.
fn setup(socket: &Path, method: &str, path: &str, body: Value) {
    let answer = request(socket, method, path, Some(body));
    assert!(
        matches!(answer, Ok((204, _))),
        "{method} {path}: {answer:?}"
    );
}

/// A timed request during the attack: its status, or the error, and how long it took.
struct Timed {
    what: &'static str,
    answer: Result<u16, String>,
    took: Duration,
}

fn timed(
    what: &'static str,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Timed {
    let started = Instant::now();
    let answer = request(socket, method, path, body)
        .map(|(status, _)| status)
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no answer in {REQUEST_TIMEOUT:?}")
            }
            _ => e.to_string(),
        });
    Timed {
        what,
        answer,
        took: started.elapsed(),
    }
}

/// What one run of an attack measured.
struct Outcome {
    /// Peak RSS (VmHWM) of `ember` at the end of the window, KiB.
    hwm_kib: u64,
    /// CPU seconds (user and system) `ember` used over the window.
    cpu_s: f64,
    /// The part of [`cpu_s`](Self::cpu_s) its vCPU threads used.
    vcpu_s: f64,
    /// Latencies of the `GET /machine-config` answered over the window.
    latencies: Vec<Duration>,
    /// `GET /machine-config` requests that got no 200 (timed out, refused, other status).
    unanswered: usize,
    /// Pause, state, resume and drive update after the window.
    controls: Vec<Timed>,
    /// Bytes `ember` logged on stderr, the whole run.
    log_bytes: u64,
    /// Bytes allocated to the drive's file at the end of the window.
    disk_allocated: u64,
    /// The block device's counters over the window (from two metrics flushes), or null if the
    /// second flush failed.
    block: Value,
    /// The block device's counters from the start to the window.
    block_at_start: Value,
    /// How `ember` ended after `SIGTERM`.
    exit: String,
    /// Its exit code, if it exited.
    exit_code: Option<i32>,
    /// Whether the log shows a panic.
    panicked: bool,
    /// The log's first warnings and errors, three at most.
    warnings: Vec<String>,
}

/// The block device's counters in the last line of the metrics file `path`.
fn last_block_metrics(path: &Path) -> Value {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(text.lines().last()?).ok())
        .map_or(Value::Null, |line| line["block_disk"].clone())
}

impl Outcome {
    /// The block device's counter `name` over the window.
    fn in_window(&self, name: &str) -> u64 {
        self.block[name].as_u64().unwrap_or(0)
    }

    /// The block device's counter `name` from the start to the end of the window.
    fn in_all(&self, name: &str) -> u64 {
        self.in_window(name) + self.block_at_start[name].as_u64().unwrap_or(0)
    }
}

/// `ember`'s peak RSS in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU seconds (user and system) in a `/proc/.../stat` text.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: a plain query of a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / per_second as f64)
}

/// CPU seconds (user and system) the process `pid` has used, all its threads, ended ones too.
fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds the vCPU threads of `pid` (`ember_vcpu*`) have used: the guest's own running
/// and the exits they handle, MMIO writes included.
fn vcpu_cpu_seconds(pid: u32) -> Option<f64> {
    let mut total = 0.0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("ember_vcpu") {
            total += stat_cpu_seconds(&fs::read_to_string(task.path().join("stat")).ok()?)?;
        }
    }
    Some(total)
}

/// Waits at most `limit` for `child` to end.
fn wait_at_most(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `ember`, killed if still running when dropped.
struct Running {
    child: Child,
    /// The unread stdout of a console flood, kept open so that the pipe stays full.
    _stdout: Option<ChildStdout>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots `attack` in `bin` through the API, lets it run `warmup`, then for `window` asks `GET
/// /machine-config` every ~10 ms on a kept-alive connection; then pauses, resumes and updates
/// the drive, and stops `ember` with `SIGTERM`. Every wait is bounded: a `bin` that hangs or
/// dies under the attack is reported, not waited for.
fn run(bin: &Path, attack: &Attack, warmup: Duration, window: Duration) -> Outcome {
    let scratch = Scratch::new(&attack.name.replace([' ', '/', ','], "-"));
    let socket = scratch.path("api.sock");
    let kernel = scratch.path("kernel");
    fs::write(&kernel, attack.image.elf()).unwrap();
    let disk = scratch.path("disk.img");
    File::create(&disk)
        .unwrap()
        .set_len(attack.disk_len)
        .unwrap();
    let log = scratch.path("ember.log");

    let mut command = Command::new(bin);
    command
        .arg("--api-sock")
        .arg(&socket)
        .args(["--log-level", "debug", "--serial"])
        .arg(if attack.console_to_stalled_stdout {
            "stdio"
        } else {
            "none"
        })
        .stdin(Stdio::null())
        .stdout(if attack.console_to_stalled_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(File::create(&log).unwrap());
    let mut child = command.spawn().expect("ember starts");
    let stdout = child.stdout.take();
    let mut ember = Running {
        child,
        _stdout: stdout,
    };
    let pid = ember.child.id();
    wait_for_api(&mut ember.child, &socket);

    setup(
        &socket,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
    );
    setup(
        &socket,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    );
    let mut drive = json!({"drive_id": "disk", "path_on_host": disk, "is_root_device": false});
    if let Some(limiter) = &attack.rate_limiter {
        drive["rate_limiter"] = limiter.clone();
    }
    setup(&socket, "PUT", "/drives/disk", drive);
    let metrics = scratch.path("metrics.json");
    setup(&socket, "PUT", "/metrics", json!({"metrics_path": metrics}));
    setup(
        &socket,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    std::thread::sleep(warmup);
    let flush = || {
        request(
            &socket,
            "PUT",
            "/actions",
            Some(json!({"action_type": "FlushMetrics"})),
        )
    };
    let block_at_start = match flush() {
        Ok((204, _)) => last_block_metrics(&metrics),
        _ => Value::Null,
    };

    // The window: one GET every ~10 ms, on a kept-alive connection, renewed after a failure.
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let vcpu_before = vcpu_cpu_seconds(pid).unwrap_or(0.0);
    let (mut latencies, mut unanswered) = (Vec::new(), 0);
    let mut client = connect(&socket).ok();
    let start = Instant::now();
    while start.elapsed() < window {
        let asked = Instant::now();
        let answer = match client.as_mut() {
            Some(stream) => exchange(stream, "GET", "/machine-config", None),
            None => Err(io::ErrorKind::NotConnected.into()),
        };
        match answer {
            Ok((200, _)) => latencies.push(asked.elapsed()),
            Ok(_) => unanswered += 1,
            Err(_) => {
                unanswered += 1;
                client = connect(&socket).ok();
            }
        }
        std::thread::sleep(Duration::from_millis(10).saturating_sub(asked.elapsed()));
    }
    let cpu_s = cpu_seconds(pid).unwrap_or(f64::NAN) - cpu_before;
    let vcpu_s = vcpu_cpu_seconds(pid).unwrap_or(f64::NAN) - vcpu_before;
    let disk_allocated = fs::metadata(&disk).map_or(0, |m| m.blocks() * 512);
    drop(client);
    let block = match flush() {
        Ok((204, _)) => last_block_metrics(&metrics),
        _ => Value::Null,
    };

    // Control of the VM while the attack goes on.
    let limiter = attack
        .rate_limiter
        .clone()
        .unwrap_or_else(|| json!({"ops": {"size": 100_000, "refill_time": 1000}}));
    let controls = vec![
        timed(
            "PATCH /vm Paused",
            &socket,
            "PATCH",
            "/vm",
            Some(json!({"state": "Paused"})),
        ),
        timed("GET / (paused)", &socket, "GET", "/", None),
        timed(
            "PATCH /vm Resumed",
            &socket,
            "PATCH",
            "/vm",
            Some(json!({"state": "Resumed"})),
        ),
        timed(
            "PATCH /drives",
            &socket,
            "PATCH",
            "/drives/disk",
            Some(json!({"drive_id": "disk", "path_on_host": disk, "rate_limiter": limiter})),
        ),
    ];
    let hwm_kib = vm_hwm_kib(pid).unwrap_or(0);

    // SAFETY: a plain system call; `pid` is our child, which is not yet waited for.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGTERM) };
    let (exit, exit_code) = match wait_at_most(&mut ember.child, Duration::from_secs(10)) {
        Some(status) => (
            match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                _ => format!("{status}"),
            },
            status.code(),
        ),
        None => ("hung after SIGTERM (10 s), SIGKILLed".to_string(), None),
    };
    drop(ember);
    let text = fs::read(&log).unwrap_or_default();
    Outcome {
        hwm_kib,
        cpu_s,
        vcpu_s,
        latencies,
        unanswered,
        controls,
        log_bytes: text.len() as u64,
        disk_allocated,
        block,
        block_at_start,
        exit,
        exit_code,
        panicked: String::from_utf8_lossy(&text).contains("panicked"),
        warnings: String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| {
                ["WARN", "ERROR", "warn", "error"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .take(3)
            .map(str::to_string)
            .collect(),
    }
}

/// The `ember` attacked: this build's, or `EMBER_BIN` (an absolute path) where set, to see
/// another build withstand or fail the same attacks.
fn ember_bin() -> PathBuf {
    std::env::var_os("EMBER_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ember")), PathBuf::from)
}

/// How long the tests let an attack run before measuring (the guest touches its RAM and sets
/// the device up), and how long they measure.
const WARMUP: Duration = Duration::from_millis(1500);
const WINDOW: Duration = Duration::from_secs(3);

/// The idle guest's peak RSS in KiB and bytes of log, measured once per test process.
fn idle_baseline() -> (u64, u64) {
    static IDLE: OnceLock<(u64, u64)> = OnceLock::new();
    *IDLE.get_or_init(|| {
        let outcome = run(&ember_bin(), &idle(), WARMUP, WINDOW);
        assert!(outcome.hwm_kib > 0, "no peak RSS read for the idle guest");
        (outcome.hwm_kib, outcome.log_bytes)
    })
}

/// How far above the idle guest's the peak RSS of an attacked `ember` may go, in KiB: the
/// target of 1 MiB of host memory per device under attack (one block device here).
///
/// The guests' RAM is all resident in both (each touches every page first), and the idle guest
/// activates the same device (so its worker thread, stack and allocator arena exist in both):
/// the difference is what the host allocated for the attack. Between two runs of the same guest
/// it varies by a few dozen KiB. The bounded buffers of the log and the console (64 KiB each)
/// fit inside it; a copy of one maximal indirect table (65,535 descriptors, 1 MiB) does not.
const HWM_SLACK_KIB: u64 = 1024;

/// The most bytes `ember` may log in one run under attack beyond what it logs for the idle
/// guest.
///
/// The logger lets each call site `BURST` (10) lines at once and one a second after; a guest
/// reaches a few call sites (an activation, its failure, a refused request) of at most a few
/// hundred bytes a line, over a run of under ten seconds: 10 sites × (10 + 10) lines × 200
/// bytes = 40 KB. A log written once per guest action is that much in well under a second.
const LOG_MAX_GROWTH: u64 = 64 * 1024;

/// Checks what every attacked `ember` must show, whatever the timings, then `checks` (what
/// this attack must show), then that `SIGTERM` stopped it cleanly.
fn assert_withstood(attack: &Attack, outcome: &Outcome, checks: impl FnOnce(&Outcome)) {
    let name = attack.name;
    assert!(
        !outcome.latencies.is_empty() && outcome.unanswered == 0,
        "{name}: {} GET /machine-config unanswered, {} answered",
        outcome.unanswered,
        outcome.latencies.len()
    );
    for control in &outcome.controls {
        let expected = if control.what.starts_with("GET") {
            200
        } else {
            204
        };
        assert_eq!(
            control.answer,
            Ok(expected),
            "{name}: {} (after {:?})",
            control.what,
            control.took
        );
    }
    let (idle_kib, idle_log) = idle_baseline();
    assert!(
        outcome.hwm_kib <= idle_kib + HWM_SLACK_KIB,
        "{name}: peak RSS {} KiB, idle guest {idle_kib} KiB",
        outcome.hwm_kib
    );
    assert!(
        outcome.log_bytes <= idle_log + LOG_MAX_GROWTH,
        "{name}: {} bytes of log, idle guest {idle_log}",
        outcome.log_bytes
    );
    checks(outcome);
    assert!(!outcome.panicked, "{name}: ember panicked");
    assert_eq!(outcome.exit_code, Some(143), "{name}: {}", outcome.exit);
}

/// Runs `attack` for the tests' window, prints what it measured (seen with `--nocapture`) and
/// checks [`assert_withstood`].
fn withstands(attack: Attack, checks: impl FnOnce(&Outcome)) {
    let mut outcome = run(&ember_bin(), &attack, WARMUP, WINDOW);
    outcome.latencies.sort();
    println!(
        "{}: peak RSS {} KiB (idle {} KiB), {:.2} CPU s ({:.2} vCPU), GET /machine-config median {:?} max {:?} \
         ({} answered), controls {:?}, {} bytes of log, {} bytes allocated to the drive; {}",
        attack.name,
        outcome.hwm_kib,
        idle_baseline().0,
        outcome.cpu_s,
        outcome.vcpu_s,
        outcome.latencies.get(outcome.latencies.len() / 2),
        outcome.latencies.last(),
        outcome.latencies.len(),
        outcome
            .controls
            .iter()
            .map(|c| format!("{} {:?} in {:?}", c.what, c.answer, c.took))
            .collect::<Vec<_>>(),
        outcome.log_bytes,
        outcome.disk_allocated,
        outcome.exit,
    );
    assert_withstood(&attack, &outcome, checks);
}

#[test]
fn a_notification_storm_on_a_ring_that_never_empties_starves_nothing() {
    withstands(storm(), |outcome| {
        // The device kept serving the storm all along.
        assert!(outcome.in_window("read_count") > 0);
    });
}

#[test]
fn a_chain_through_the_largest_indirect_table_is_refused_and_costs_nothing_lasting() {
    withstands(largest_indirect(), |outcome| {
        // The chain is longer than the queue: the device stops serving until reset, at once.
        assert_eq!(outcome.in_all("read_count"), 0);
        assert!(outcome.in_all("queue_fails") > 0);
    });
}

#[test]
fn an_indirect_table_whose_entries_loop_is_refused_and_costs_nothing_lasting() {
    withstands(looping_indirect(), |outcome| {
        assert_eq!(outcome.in_all("read_count"), 0);
        assert!(outcome.in_all("queue_fails") > 0);
    });
}

#[test]
fn a_device_reset_and_reactivated_in_a_loop_keeps_the_log_bounded() {
    withstands(reset_loop(), |outcome| {
        // Each activation served its one read: the device went round the loop many times.
        assert!(outcome.in_window("read_count") > 1);
    });
}

#[test]
fn the_largest_discards_and_write_zeroes_are_held_to_the_drive_bandwidth() {
    withstands(discards(), |outcome| {
        assert!(outcome.in_all("queue_event_count") > 0);
        // The bucket lets one request larger than itself through when full, then pays the
        // debt: one range of the largest size, plus what the bandwidth refills over the run
        // (the warmup, the window and the controls, well under a minute).
        let bound = u64::from(MAX_RANGE_SECTORS) * SECTOR + 60 * DISCARD_BANDWIDTH;
        assert!(
            outcome.disk_allocated <= bound,
            "{} bytes allocated to the drive, more than {bound}",
            outcome.disk_allocated
        );
    });
}

/// The block counters that show what the device did: the non-zero ones of interest.
fn block_summary(block: &Value) -> String {
    let fields = [
        "queue_event_count",
        "read_count",
        "write_count",
        "invalid_reqs_count",
        "execute_fails",
        "queue_fails",
        "activate_fails",
        "rate_limiter_throttled_events",
    ];
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|f| match block[f].as_u64() {
            Some(0) | None => None,
            Some(n) => Some(format!("{f}={n}")),
        })
        .collect();
    if block.is_null() {
        "(no metrics)".into()
    } else {
        parts.join(" ")
    }
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Every attack for a fixed window, and a table of what it cost: peak RSS above the idle
/// guest's, `ember`'s CPU seconds over the window (all threads, and in brackets its vCPU's,
/// which run the guest's own loop), `GET /machine-config` latency (median and max of one
/// request every ~10 ms on a kept-alive connection), requests unanswered within 10 s, how long
/// pause and a drive update took after the window, bytes logged, bytes allocated to the drive,
/// how `ember` ended on `SIGTERM`, and the block device's counters over the window. Not a test:
/// a measurement, printed.
///
/// `cargo test -p ember --test malicious_guests -- --ignored --nocapture attack_report`;
/// `EMBER_BIN=path` measures another build of `ember`, `ATTACK_WINDOW_S` sets the window (5 s),
/// `ATTACK_ONLY=text` runs only the attacks whose name contains `text` (and the idle guest).
#[test]
#[ignore]
fn attack_report() {
    let bin = ember_bin();
    let window = Duration::from_secs(
        std::env::var("ATTACK_WINDOW_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let only = std::env::var("ATTACK_ONLY").ok();
    let mut notes = Vec::new();
    println!(
        "ember: {}; window {window:?} after {WARMUP:?} of warmup",
        bin.display()
    );
    let mut idle_kib = None;
    println!(
        "| attack | peak RSS − idle (KiB) | CPU s (vCPU) | GET median (ms) | GET max (ms) | GETs ok / unanswered | pause (ms) | PATCH /drives (ms) | log bytes | disk allocated (MiB) | on SIGTERM | block device over the window |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for attack in [
        idle(),
        storm(),
        largest_indirect(),
        looping_indirect(),
        longest_valid_indirect(),
        reset_loop(),
        discards(),
        console_flood(),
    ]
    .into_iter()
    .filter(|a| {
        a.name.starts_with("idle") || only.as_ref().is_none_or(|o| a.name.contains(o.as_str()))
    }) {
        let mut o = run(&bin, &attack, WARMUP, window);
        let idle = *idle_kib.get_or_insert(o.hwm_kib);
        o.latencies.sort();
        let (median, max) = match (o.latencies.get(o.latencies.len() / 2), o.latencies.last()) {
            (Some(median), Some(max)) => (millis(*median), millis(*max)),
            _ => ("-".into(), "-".into()),
        };
        let control = |what: &str| {
            o.controls
                .iter()
                .find(|c| c.what == what)
                .map_or("-".into(), |c| match &c.answer {
                    Ok(status) => format!("{} ({status})", millis(c.took)),
                    Err(err) => format!("{} ({err})", millis(c.took)),
                })
        };
        println!(
            "| {} | {} | {:.2} ({:.2}) | {median} | {max} | {} / {} | {} | {} | {} | {:.1} | {}{} | {} |",
            attack.name,
            if attack.name.starts_with("idle") {
                format!("({} absolute)", o.hwm_kib)
            } else {
                (o.hwm_kib as i64 - idle as i64).to_string()
            },
            o.cpu_s,
            o.vcpu_s,
            o.latencies.len(),
            o.unanswered,
            control("PATCH /vm Paused"),
            control("PATCH /drives"),
            o.log_bytes,
            o.disk_allocated as f64 / f64::from(1u32 << 20),
            o.exit,
            if o.panicked { ", panicked" } else { "" },
            block_summary(&o.block),
        );
        notes.extend(o.warnings.iter().map(|w| format!("{}: {w}", attack.name)));
    }
    println!("\nFirst warnings and errors logged:");
    for note in notes {
        println!("  {note}");
    }
}
