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
//!   the guest pages seen resident as a check that the guest's touches are counted on its side,
//!   and where the last run's pages were, by kind of mapping: most are the binary's file pages,
//!   which every `ember` on a host shares.
//!
//! Both run side by side with seccomp on (the default) and off (`--no-seccomp`), alternating run
//! by run so that the machine's load falls on both alike; `EMBER_BENCH_BASELINE=PATH` adds
//! another `ember` binary (an earlier build) to the rotation.
//!
//! - **Creation rate**: microVMs of [`SMALL_MIB`] MiB and 1 vCPU whose guest writes the boot
//!   timer and resets at once, started back to back, two per core in flight, for
//!   `EMBER_BENCH_SECONDS` (default 10): how many reach their first instruction (and exit 0)
//!   per second per core.
//! - **Density**: idle microVMs of [`SMALL_MIB`] MiB (the guest writes the boot timer, touches
//!   [`DENSITY_TOUCH_PAGES`] pages and halts with interrupts off) started one after the other
//!   until one fails to start, the host's available memory falls under [`DENSITY_MEM_FLOOR_MIB`]
//!   or [`DENSITY_CAP`] run at once; once without and once with KSM (`--ksm`, with `ksmd`
//!   running meanwhile at [`KSM_PAGES_TO_SCAN`] pages every [`KSM_SLEEP_MS`] ms, and given two
//!   full passes after the last start). Prints how many ran, the host memory they used (the fall
//!   in `MemAvailable`, in which pages KSM merged count once), their summed RSS (in which they
//!   count in every process) and, with KSM, the pages `ksmd` shared. Identical idle guests are
//!   KSM's best case: every guest's touched pages hold the same bytes.
//!
//! - **Restore**: a microVM of [`MEMORY_MIB`] MiB and 1 vCPU with a drive, an entropy device, a
//!   balloon and a vsock device, its guest halted, is snapshotted; `EMBER_BENCH_RUNS` new
//!   processes each restore it with `resume_vm` (`PUT /snapshot/load`). Prints the medians of
//!   ember's `restore_us` (VMM time from the request to the vCPUs resumed) and its steps, and of
//!   the request as the client sees it, beside the start to first instruction of the same
//!   microVM booted.
//!
//! Run with `cargo bench -p ember --bench startup` (`EMBER_BENCH_QUICK=1` for the first three
//! only; `-- NAME` for those whose name holds NAME: `first-instruction`, `memory`, `restore`,
//! `creation`, `density`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_boot::test_utils::tiny_elf;

const EMBER: &str = env!("CARGO_BIN_EXE_ember");
/// Guest memory of every run, in MiB.
const MEMORY_MIB: u64 = 128;
/// Pages the footprint guest touches (4 MiB).
const TOUCH_PAGES: u32 = 1024;
/// Guest memory of the creation-rate and density microVMs, in MiB.
const SMALL_MIB: u64 = 32;
/// Pages each idle microVM of the density run touches (1 MiB).
const DENSITY_TOUCH_PAGES: u32 = 256;
/// The most microVMs the density run starts: more than a build machine holds, so that the
/// host's memory floor, or a start that fails (the host's limit on threads, say), stops it.
const DENSITY_CAP: usize = 100_000;
/// The density run stops once the host has less memory available than this.
const DENSITY_MEM_FLOOR_MIB: u64 = 4096;

/// `mov rax, 0xd0000000; mov byte [rax], 123`: the boot-timer write.
const BOOT_TIMER_WRITE: [u8; 13] = [
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x00, 0x7b,
];
/// `mov al, 0xfe; out 0x64, al; hlt`: reset through the i8042.
const I8042_RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];
/// `cli; hlt; jmp .-1`: stop for good, without exits to the VMM.
const HALT_FOREVER: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// A configuration measured side by side with the others: a name, the binary and its flags.
struct Variant {
    name: String,
    binary: PathBuf,
    flags: &'static [&'static str],
}

/// This build with seccomp on (the default) and off, and with `EMBER_BENCH_BASELINE=PATH`
/// another `ember` binary (an earlier build, say) with its defaults.
fn variants() -> Vec<Variant> {
    let mut variants = vec![
        Variant {
            name: "seccomp on".into(),
            binary: EMBER.into(),
            flags: &[],
        },
        Variant {
            name: "seccomp off".into(),
            binary: EMBER.into(),
            flags: &["--no-seccomp"],
        },
    ];
    if let Some(baseline) = std::env::var_os("EMBER_BENCH_BASELINE") {
        let binary = PathBuf::from(baseline);
        variants.push(Variant {
            name: format!("baseline {}", binary.display()),
            binary,
            flags: &[],
        });
    }
    variants
}

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

/// `variant` on `kernel`, with the guest memory of the side-by-side runs.
fn ember(variant: &Variant, kernel: &Path) -> Command {
    let mut cmd = ember_binary(&variant.binary, kernel, MEMORY_MIB);
    cmd.args(variant.flags);
    cmd
}

fn ember_with_memory(kernel: &Path, mib: u64) -> Command {
    ember_binary(Path::new(EMBER), kernel, mib)
}

fn ember_binary(binary: &Path, kernel: &Path, mib: u64) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("--kernel")
        .arg(kernel)
        .args(["--memory", &mib.to_string(), "--boot-timer"])
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
    let variants = variants();
    let mut times = vec![Vec::with_capacity(runs); variants.len()];
    for _ in 0..runs {
        for (variant, times) in variants.iter().zip(&mut times) {
            let output = ember(variant, &kernel).output().expect("cannot run ember");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "ember failed: {stderr}");
            let us = stderr
                .lines()
                .find_map(boot_time_us)
                .unwrap_or_else(|| panic!("no Guest-boot-time line in: {stderr}"));
            times.push(us);
        }
    }
    for (Variant { name, .. }, mut times) in variants.iter().zip(times) {
        let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
        println!(
            "start to first guest instruction, {name} ({runs} runs, {MEMORY_MIB} MiB): median {} us, min {min} us, max {max} us",
            median(&mut times)
        );
    }
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

/// Where a process's resident pages are, by kind of mapping: resident KiB of each, and of them
/// the dirty private KiB (`Private_Dirty`): pages this process wrote, which no other process
/// shares. The rest are file pages, which every `ember` on the host shares; the binary's own
/// would count as dirty too while the file is not yet written back after a build, which is why
/// the measurement writes it back first.
#[derive(Default)]
struct Footprint(std::collections::BTreeMap<&'static str, (u64, u64)>);

impl Footprint {
    /// Reads `/proc/PID/smaps`, leaving the guest memory mapping out.
    fn of(pid: u32) -> Self {
        let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("cannot read smaps");
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let exe = exe.to_string_lossy();
        let mut footprint = Footprint::default();
        let mut kind = "";
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let (Some(first), Some(second)) = (fields.next(), fields.next()) else {
                continue;
            };
            if first.contains('-') && !first.ends_with(':') {
                // A mapping's header: range, permissions, offset, device, inode, path.
                let path = fields.nth(3).unwrap_or("");
                kind = match (path, second) {
                    (p, "r-xp") if p == exe => "binary text",
                    (p, "r--p") if p == exe => "binary read-only data and relocations",
                    (p, _) if p == exe => "binary data and bss",
                    ("[heap]", _) => "heap (brk)",
                    ("[stack]", _) => "main thread stack",
                    ("[vdso]" | "[vvar]" | "[vvar_vclock]", _) => "vdso",
                    (p, _) if p.starts_with("anon_inode:kvm") => "KVM (vCPU run pages)",
                    ("", "---p") => "guard pages",
                    ("", _) => "anonymous (thread stacks, malloc arenas)",
                    _ => "other files",
                };
                continue;
            }
            let kib: u64 = second.parse().unwrap_or(0);
            match first {
                "Size:" if kib == MEMORY_MIB * 1024 => kind = "guest memory",
                "Rss:" => footprint.0.entry(kind).or_default().0 += kib,
                "Private_Dirty:" => footprint.0.entry(kind).or_default().1 += kib,
                _ => {}
            }
        }
        footprint.0.remove("guest memory");
        footprint
    }

    fn print(&self, name: &str) {
        println!("where the pages go, {name} (resident KiB, of which private and dirty):");
        for (kind, (rss, dirty)) in &self.0 {
            println!("  {kind}: {rss} KiB, {dirty} dirty");
        }
    }
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
    let variants = variants();
    // A binary just built is dirty in the page cache until it is written back, and its pages
    // would count as dirty in the breakdown: write it back first.
    for variant in &variants {
        if let Err(err) = fs::File::open(&variant.binary).and_then(|f| f.sync_all()) {
            eprintln!("cannot write {} back: {err}", variant.binary.display());
        }
    }
    // Each variant started from flags, and the first and any baseline also through the API
    // socket, as orchestrators start it.
    let socket = dir.join("memory.sock");
    let mut starts: Vec<(String, Box<dyn Fn() -> Child>)> = Vec::new();
    for variant in &variants {
        starts.push((
            variant.name.clone(),
            Box::new(|| {
                let mut child = ember(variant, &kernel)
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("cannot run ember");
                wait_for_boot(&mut child);
                child
            }),
        ));
    }
    for variant in variants.iter().filter(|v| v.flags.is_empty()) {
        starts.push((
            format!("{}, started through the API", variant.name),
            Box::new(|| ember_through_api(&variant.binary, &kernel, &socket)),
        ));
    }
    let mut overheads = vec![Vec::new(); starts.len()];
    let mut guest_pages = vec![Vec::new(); starts.len()];
    let mut footprints: Vec<Footprint> = starts.iter().map(|_| Footprint::default()).collect();
    for _ in 0..5 {
        for (i, (_, start)) in starts.iter().enumerate() {
            let mut child = start();
            // The touches follow the boot-timer write; give them a moment to land.
            std::thread::sleep(Duration::from_millis(200));
            let (total, guest) = resident_kib(child.id());
            footprints[i] = Footprint::of(child.id());
            let _ = child.kill();
            let _ = child.wait();
            overheads[i].push(total - guest);
            guest_pages[i].push(guest / 4);
        }
    }
    for (i, (name, _)) in starts.iter().enumerate() {
        println!(
            "memory overhead, {name} (RSS minus resident guest memory, 5 runs): median {} KiB; \
             guest pages resident: median {} (the guest touched {TOUCH_PAGES} pages plus its own code)",
            median(&mut overheads[i]),
            median(&mut guest_pages[i])
        );
        footprints[i].print(name);
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn creation_rate(dir: &Path, seconds: u64) {
    let kernel = dir.join("create.elf");
    let code = [BOOT_TIMER_WRITE.to_vec(), I8042_RESET.to_vec()].concat();
    fs::write(&kernel, tiny_elf(&code)).expect("cannot write the guest");
    let cores = online_cpus();
    let spawn = || {
        ember_with_memory(&kernel, SMALL_MIB)
            .args(["--log-level", "error"])
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run ember")
    };
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut running: Vec<Child> = (0..2 * cores).map(|_| spawn()).collect();
    let (mut started, mut failed) = (0u64, 0u64);
    while !running.is_empty() {
        let mut index = 0;
        while index < running.len() {
            match running[index].try_wait().expect("cannot wait for ember") {
                Some(status) => {
                    if status.success() {
                        started += 1;
                    } else {
                        failed += 1;
                    }
                    if std::time::Instant::now() < deadline {
                        running[index] = spawn();
                        index += 1;
                    } else {
                        // Already reaped by `try_wait`: this returns its status at once.
                        let _ = running.swap_remove(index).wait();
                    }
                }
                None => index += 1,
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "creation rate ({SMALL_MIB} MiB, 1 vCPU, {} in flight, {elapsed:.1} s): {started} microVMs \
         reached their first instruction, {:.0} per second, {:.0} per second per core \
         ({cores} cores); {failed} failed",
        2 * cores,
        started as f64 / elapsed,
        started as f64 / elapsed / cores as f64
    );
}

/// `MemAvailable` of the host, in MiB.
fn mem_available_mib() -> u64 {
    let info = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

fn ksm_value(name: &str) -> u64 {
    fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// ksmd's pace during the KSM density run: `KSM_PAGES_TO_SCAN` pages every `KSM_SLEEP_MS` ms,
/// up to 500,000 pages a second. Its default of 100 pages every 20 ms (5,000 a second) would
/// fall ever further behind microVMs started about 200 a second with 257 pages each, and the
/// run would measure ksmd's backlog rather than what KSM saves.
const KSM_PAGES_TO_SCAN: &str = "5000";
const KSM_SLEEP_MS: &str = "10";
/// How long the KSM density run waits, after the last start, for ksmd to finish two passes
/// over every mergeable page (a page merges on the pass after the one that first saw it).
const KSM_SETTLE: Duration = Duration::from_secs(300);

/// ksmd running at the density run's pace for the duration; its settings back to what they
/// were when dropped.
struct KsmRunning(Vec<(&'static str, String)>);

impl KsmRunning {
    fn start() -> Self {
        let mut before = Vec::new();
        for (name, value) in [
            ("pages_to_scan", KSM_PAGES_TO_SCAN),
            ("sleep_millisecs", KSM_SLEEP_MS),
            ("run", "1"),
        ] {
            let path = format!("/sys/kernel/mm/ksm/{name}");
            let Ok(old) = fs::read_to_string(&path) else {
                println!("(cannot read {path}: the host's KSM is left as it is)");
                break;
            };
            if fs::write(&path, value).is_err() {
                println!("(cannot set {path}: the host's KSM is left as it is)");
                break;
            }
            before.push((name, old.trim().to_owned()));
        }
        KsmRunning(before)
    }

    /// Waits until ksmd has made two full passes from now, or `KSM_SETTLE` has passed; at
    /// once when it could not be started, since its passes would never come.
    fn settle(&self) {
        if !self.0.iter().any(|(name, _)| *name == "run") {
            return;
        }
        let start = Instant::now();
        let target = ksm_value("full_scans") + 2;
        while ksm_value("full_scans") < target && start.elapsed() < KSM_SETTLE {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for KsmRunning {
    fn drop(&mut self) {
        // `run` first: ksmd stops before its pace goes back.
        for (name, old) in self.0.iter().rev() {
            let _ = fs::write(format!("/sys/kernel/mm/ksm/{name}"), old);
        }
    }
}

fn density(dir: &Path, ksm: bool) {
    let kernel = dir.join("density.elf");
    let code = [
        BOOT_TIMER_WRITE.to_vec(),
        touch_pages(DENSITY_TOUCH_PAGES),
        HALT_FOREVER.to_vec(),
    ]
    .concat();
    fs::write(&kernel, tiny_elf(&code)).expect("cannot write the guest");
    let ksmd = ksm.then(KsmRunning::start);
    let available_before = mem_available_mib();
    let mut running: Vec<Child> = Vec::new();
    // The read ends of their standard errors, kept open without a thread each: an idle
    // microVM writes nothing more, and threads would count against the host's limit.
    let mut stderrs = Vec::new();
    let stop = loop {
        if running.len() >= DENSITY_CAP {
            break format!("the cap of {DENSITY_CAP}");
        }
        if mem_available_mib() < DENSITY_MEM_FLOOR_MIB {
            break format!("the host's available memory under {DENSITY_MEM_FLOOR_MIB} MiB");
        }
        let mut cmd = ember_with_memory(&kernel, SMALL_MIB);
        if ksm {
            cmd.arg("--ksm");
        }
        let mut child = match cmd.stderr(Stdio::piped()).spawn() {
            Ok(child) => child,
            Err(err) => break format!("a start that failed: {err}"),
        };
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut reader = BufReader::new(stderr);
        let mut last = String::new();
        let booted = reader.by_ref().lines().any(|line| {
            let line = line.unwrap_or_default();
            let booted = boot_time_us(&line).is_some();
            last = line;
            booted
        });
        if !booted {
            let _ = child.kill();
            let _ = child.wait();
            break format!("a microVM that did not boot: {last}");
        }
        // The pipe alone: the reader's buffer is the bench's memory, not the microVM's.
        stderrs.push(reader.into_inner());
        running.push(child);
    };
    // Let the guests' touches land and, with KSM, ksmd merge what it can.
    let last_start = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    if let Some(ksmd) = &ksmd {
        ksmd.settle();
    }
    let settled = last_start.elapsed();
    let total_kib: u64 = running.iter().map(|c| rss_kib(c.id())).sum();
    let host_used = available_before.saturating_sub(mem_available_mib());
    let count = running.len().max(1) as u64;
    let shared = if ksm {
        format!(
            ", ksmd ({KSM_PAGES_TO_SCAN} pages every {KSM_SLEEP_MS} ms) sharing {} pages for {} \
             mappings, {:.0} s after the last start",
            ksm_value("pages_shared"),
            ksm_value("pages_sharing"),
            settled.as_secs_f64()
        )
    } else {
        String::new()
    };
    println!(
        "density ({SMALL_MIB} MiB idle microVMs, KSM {}): {} running at once, stopped by {stop}; \
         host memory used {host_used} MiB ({} KiB per microVM), summed RSS {} MiB{shared}",
        if ksm { "on" } else { "off" },
        running.len(),
        host_used * 1024 / count,
        total_kib / 1024,
    );
    for mut child in running {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `binary` configured and started with `kernel` through its API socket, as orchestrators
/// start it; returns once the guest wrote the boot timer.
fn ember_through_api(binary: &Path, kernel: &Path, socket: &Path) -> Child {
    let _ = fs::remove_file(socket);
    let mut child = Command::new(binary)
        .arg("--api-sock")
        .arg(socket)
        .args(["--boot-timer", "--serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run ember");
    wait_for_socket(socket);
    let kernel = kernel.to_str().expect("a UTF-8 scratch path");
    put(
        socket,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"{kernel}"}}"#),
    );
    put(
        socket,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count":1,"mem_size_mib":{MEMORY_MIB}}}"#),
    );
    put(
        socket,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    wait_for_boot(&mut child);
    child
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the API socket never accepted");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `ember --api-sock SOCKET`, its console off; waits for the socket.
fn ember_api(socket: &Path) -> Child {
    let _ = fs::remove_file(socket);
    let child = Command::new(EMBER)
        .arg("--api-sock")
        .arg(socket)
        .args(["--serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run ember");
    wait_for_socket(socket);
    child
}

/// One request on a connection of its own; the status and the body.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).expect("cannot connect to the API");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("request sent");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("response read");
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok());
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status.unwrap_or(0), body.to_string())
}

fn put(socket: &Path, method: &str, path: &str, body: &str) {
    let (status, answer) = http(socket, method, path, body);
    assert_eq!(status, 204, "{method} {path}: {answer}");
}

/// The restore steps of ember's metrics, as `restore_us` and its parts name them.
const RESTORE_STEPS: [&str; 6] = [
    "restore_us",
    "restore_load_us",
    "restore_memory_us",
    "restore_vcpus_us",
    "restore_devices_us",
    "restore_resume_us",
];

fn restore(dir: &Path, runs: usize) {
    let kernel = dir.join("halt.elf");
    let code = [BOOT_TIMER_WRITE.to_vec(), HALT_FOREVER.to_vec()].concat();
    fs::write(&kernel, tiny_elf(&code)).expect("cannot write the guest");
    let disk = dir.join("disk");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("cannot create the disk");
    let (socket, state, mem) = (dir.join("source.sock"), dir.join("state"), dir.join("mem"));
    let mut source = ember_api(&socket);
    for (path, body) in [
        (
            "/boot-source",
            format!("{{\"kernel_image_path\": {kernel:?}}}"),
        ),
        (
            "/machine-config",
            format!("{{\"vcpu_count\": 1, \"mem_size_mib\": {MEMORY_MIB}}}"),
        ),
        (
            "/drives/data",
            format!(
                "{{\"drive_id\": \"data\", \"path_on_host\": {disk:?}, \
                 \"is_root_device\": false, \"is_read_only\": false}}"
            ),
        ),
        ("/entropy", "{}".to_string()),
        (
            "/balloon",
            "{\"amount_mib\": 0, \"deflate_on_oom\": false}".to_string(),
        ),
        (
            "/vsock",
            format!(
                "{{\"guest_cid\": 3, \"uds_path\": {:?}}}",
                dir.join("source.vsock")
            ),
        ),
        (
            "/actions",
            "{\"action_type\": \"InstanceStart\"}".to_string(),
        ),
    ] {
        put(&socket, "PUT", path, &body);
    }
    std::thread::sleep(Duration::from_millis(100));
    put(&socket, "PATCH", "/vm", "{\"state\": \"Paused\"}");
    put(
        &socket,
        "PUT",
        "/snapshot/create",
        &format!("{{\"snapshot_path\": {state:?}, \"mem_file_path\": {mem:?}}}"),
    );
    let _ = source.kill();
    let _ = source.wait();

    let mut steps = vec![Vec::with_capacity(runs); RESTORE_STEPS.len()];
    let mut client = Vec::with_capacity(runs);
    for run in 0..runs {
        let socket = dir.join("restore.sock");
        let vsock = dir.join(format!("restore{run}.vsock"));
        let mut child = ember_api(&socket);
        let body = format!(
            "{{\"snapshot_path\": {state:?}, \
             \"mem_backend\": {{\"backend_type\": \"File\", \"backend_path\": {mem:?}}}, \
             \"vsock_override\": {{\"uds_path\": {vsock:?}}}, \"resume_vm\": true}}"
        );
        let began = Instant::now();
        put(&socket, "PUT", "/snapshot/load", &body);
        client.push(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
        let (_, metrics) = http(&socket, "GET", "/metrics", "");
        for (step, values) in RESTORE_STEPS.iter().zip(&mut steps) {
            let value = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("ember_snapshot_{step} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no ember_snapshot_{step} in the metrics"));
            values.push(value);
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_file(vsock);
    }
    let parts: Vec<String> = RESTORE_STEPS[1..]
        .iter()
        .zip(&mut steps[1..])
        .map(|(step, values)| format!("{} {} us", &step[8..step.len() - 3], median(values)))
        .collect();
    println!(
        "restore with resume_vm ({runs} runs, {MEMORY_MIB} MiB, 4 virtio devices): VMM time \
         (restore_us) median {} us ({}); as the client sees it, median {} us",
        median(&mut steps[0]),
        parts.join(", "),
        median(&mut client)
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
    let seconds = std::env::var("EMBER_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // `cargo bench -p ember --bench startup -- NAME`: only the measurements whose name holds
    // NAME (`first-instruction`, `memory`, `restore`, `creation`, `density`).
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    // `EMBER_BENCH_QUICK=1`: only the first three, which take seconds.
    let quick = std::env::var_os("EMBER_BENCH_QUICK").is_some();
    let dir = scratch();
    if wanted("first-instruction") {
        start_to_first_instruction(&dir, runs);
    }
    if wanted("memory") {
        memory_overhead(&dir);
    }
    if wanted("restore") {
        restore(&dir, runs);
    }
    if !quick && wanted("creation") {
        creation_rate(&dir, seconds);
    }
    if !quick && wanted("density") {
        density(&dir, false);
        density(&dir, true);
    }
    let _ = fs::remove_dir_all(&dir);
}
