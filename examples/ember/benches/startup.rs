//! What a microVM costs before its guest does anything: `ember` with tiny guests on this host's
//! `/dev/kvm`.
//!
//! - **Start to first instruction**: the guest's first instruction writes the boot-timer byte,
//!   so the `Guest-boot-time` that `ember --boot-timer` logs is the time from the process's start
//!   to the guest's first instruction (plus one MMIO exit). Runs `EMBER_BENCH_RUNS` (default 20)
//!   boots and prints the median, minimum and maximum.
//! - **Memory overhead**: a guest that writes the boot timer, touches `TOUCH_PAGES` pages and
//!   halts with interrupts off. Once it has, the resident set of `ember` minus the resident pages
//!   of the guest memory mapping is what the VMM itself costs. Prints the median of 5 runs, and
//!   the guest pages seen resident as a check that the guest's touches are counted on its side.
//!
//! Run with `cargo bench -p ember --bench startup`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_boot::test_utils::tiny_elf;

const EMBER: &str = env!("CARGO_BIN_EXE_ember");
/// Guest memory of every run, in MiB.
const MEMORY_MIB: u64 = 128;
/// Pages the footprint guest touches (4 MiB).
const TOUCH_PAGES: u32 = 1024;

/// `mov rax, 0xd0000000; mov byte [rax], 123`: the boot-timer write.
const BOOT_TIMER_WRITE: [u8; 13] = [
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x00, 0x7b,
];
/// `mov al, 0xfe; out 0x64, al; hlt`: reset through the i8042.
const I8042_RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];
/// `cli; hlt; jmp .-1`: stop for good, without exits to the VMM.
const HALT_FOREVER: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// Code that writes one byte to each of `pages` pages from 16 MiB up.
fn touch_pages(pages: u32) -> Vec<u8> {
    let mut code = vec![0x48, 0xb8]; // mov rax, 16 MiB
    code.extend_from_slice(&(16u64 << 20).to_le_bytes());
    code.push(0xb9); // mov ecx, pages
    code.extend_from_slice(&pages.to_le_bytes());
    // loop: mov byte [rax], 1; add rax, 4096; dec ecx; jnz loop
    code.extend_from_slice(&[0xc6, 0x00, 0x01]);
    code.extend_from_slice(&[0x48, 0x05, 0x00, 0x10, 0x00, 0x00]);
    code.extend_from_slice(&[0xff, 0xc9]);
    code.extend_from_slice(&[0x75, 0xf3]);
    code
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("cannot create a scratch directory");
    dir
}

fn ember(kernel: &Path) -> Command {
    let mut cmd = Command::new(EMBER);
    cmd.arg("--kernel")
        .arg(kernel)
        .args(["--memory", &MEMORY_MIB.to_string(), "--boot-timer"])
        .args(["--serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// The microseconds of a `Guest-boot-time = N us ...` log line.
fn boot_time_us(line: &str) -> Option<u64> {
    let rest = line.split("Guest-boot-time = ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn start_to_first_instruction(dir: &Path, runs: usize) {
    let kernel = dir.join("timer.elf");
    let code = [BOOT_TIMER_WRITE.to_vec(), I8042_RESET.to_vec()].concat();
    fs::write(&kernel, tiny_elf(&code)).expect("cannot write the guest");
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let output = ember(&kernel).output().expect("cannot run ember");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "ember failed: {stderr}");
        let us = stderr
            .lines()
            .find_map(boot_time_us)
            .unwrap_or_else(|| panic!("no Guest-boot-time line in: {stderr}"));
        times.push(us);
    }
    let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    println!(
        "start to first guest instruction ({runs} runs, {MEMORY_MIB} MiB): median {} us, min {min} us, max {max} us",
        median(&mut times)
    );
}

/// Resident KiB of the whole process and of its guest memory mapping, from smaps.
fn resident_kib(pid: u32) -> (u64, u64) {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("cannot read smaps");
    let guest_kib = MEMORY_MIB * 1024;
    let (mut total, mut guest) = (0, 0);
    let mut mapping_kib = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some("Size:"), Some(kib)) => mapping_kib = kib.parse().unwrap_or(0),
            (Some("Rss:"), Some(kib)) => {
                let kib: u64 = kib.parse().unwrap_or(0);
                total += kib;
                if mapping_kib == guest_kib {
                    guest += kib;
                }
            }
            _ => {}
        }
    }
    (total, guest)
}

fn wait_for_boot(child: &mut Child) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let booted = lines.any(|line| line.map(|l| boot_time_us(&l).is_some()).unwrap_or(false));
    assert!(booted, "the guest never wrote the boot timer");
    // Drain the rest so that ember never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
}

fn memory_overhead(dir: &Path) {
    let kernel = dir.join("idle.elf");
    let code = [
        BOOT_TIMER_WRITE.to_vec(),
        touch_pages(TOUCH_PAGES),
        HALT_FOREVER.to_vec(),
    ]
    .concat();
    fs::write(&kernel, tiny_elf(&code)).expect("cannot write the guest");
    let mut overheads = Vec::new();
    let mut guest_pages = Vec::new();
    for _ in 0..5 {
        let mut child = ember(&kernel)
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run ember");
        wait_for_boot(&mut child);
        // The touches follow the boot-timer write; give them a moment to land.
        std::thread::sleep(Duration::from_millis(200));
        let (total, guest) = resident_kib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        overheads.push(total - guest);
        guest_pages.push(guest / 4);
    }
    println!(
        "memory overhead (RSS minus resident guest memory, 5 runs): median {} KiB; \
         guest pages resident: median {} (the guest touched {TOUCH_PAGES} pages plus its own code)",
        median(&mut overheads),
        median(&mut guest_pages)
    );
}

fn main() {
    // `cargo bench -- FILTER` passes arguments; `cargo test --benches` passes `--bench`-less
    // ones too. Only run when asked to bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs = std::env::var("EMBER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = scratch();
    start_to_first_instruction(&dir, runs);
    memory_overhead(&dir);
    let _ = fs::remove_dir_all(&dir);
}
