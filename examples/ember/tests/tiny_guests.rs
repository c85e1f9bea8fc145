//! `ember` end to end with tiny guests: a few bytes of 64-bit code in an ELF, run on the host's
//! `/dev/kvm`, and command lines a user gets wrong.
//!
//! These run on any host with `/dev/kvm`, including ones whose KVM cannot boot a Linux kernel; the
//! Linux guests are tested by `scripts/e2e.sh`.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};

use ember_boot::test_utils::{TINY_LOAD_ADDR, tiny_bzimage, tiny_elf};

mod common;
use common::Scratch;

/// `mov dx, 0x3f8`.
const SET_DX_COM1: [u8; 4] = [0x66, 0xba, 0xf8, 0x03];
/// `mov al, 0xfe; out 0x64, al; hlt; jmp .-1`: reset through the i8042, as Linux `reboot=k` does.
const I8042_RESET: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// `mov dx, 0x604; mov ax, 0x1400; out dx, ax; mov ax, 0x3400; out dx, ax; hlt; jmp .-1`: the
/// soft-off sleep type into the ACPI PM1a control register, then again with "sleep enable", as
/// Linux `poweroff` does.
const ACPI_POWER_OFF: [u8; 17] = [
    0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x14, 0x66, 0xef, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef,
    0xf4,
];
/// `mov rax, 0xd0000000; mov byte [rax], 123`: tell the boot timer the guest is up.
const BOOT_TIMER_WRITE: [u8; 13] = [
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x00, 0x7b,
];

/// Code that prints `text` on COM1.
fn print(text: &str) -> Vec<u8> {
    let mut code = SET_DX_COM1.to_vec();
    for byte in text.bytes() {
        // mov al, byte; out dx, al
        code.extend_from_slice(&[0xb0, byte, 0xee]);
    }
    code
}

fn ember(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ember runs")
}

fn ember_with_kernel(kernel: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--kernel", kernel.to_str().unwrap()];
    all.extend_from_slice(args);
    ember(&all)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts `ember` failed with exactly one error line that contains `expected`, and no panic.
fn assert_fails_with(output: &Output, expected: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "ember panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ember: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected in: {err}");
    assert!(
        errors[0].contains(expected),
        "`{}` does not mention `{expected}`",
        errors[0]
    );
}

fn host_has_hardware_virtualization() -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

#[test]
fn elf_guest_prints_on_the_serial_console_and_reboots_with_exit_0() {
    let dir = Scratch::new("hello");
    let code = [print("hello from the guest\n"), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("hello.elf", &tiny_elf(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "32"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "hello from the guest\n");
    assert!(stderr(&output).contains("i8042"), "{}", stderr(&output));
}

#[test]
fn acpi_power_off_exits_0() {
    let dir = Scratch::new("poweroff");
    let code = [print("bye\n"), ACPI_POWER_OFF.to_vec()].concat();
    let kernel = dir.file("poweroff.elf", &tiny_elf(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "32"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "bye\n");
    assert!(
        stderr(&output).contains("powered off through ACPI"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_triple_fault_resets_the_guest_and_exits_0() {
    let dir = Scratch::new("triple-fault");
    // ud2 with no IDT: #UD, then #DF, then a triple fault, as Linux's `reboot=t` does.
    let printing = print("faulting\n");
    let ud2 = TINY_LOAD_ADDR + printing.len() as u64;
    let code = [printing, vec![0x0f, 0x0b]].concat();
    let kernel = dir.file("fault.elf", &tiny_elf(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "32"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "faulting\n");
    let log = stderr(&output);
    assert!(log.contains("The guest reset its CPUs"), "{log}");
    // Where the guest stood is logged: the faulting instruction, or on AMD, where KVM puts the
    // vCPU through INIT at a shutdown, the reset vector.
    assert!(
        log.contains(&format!("vCPU 0 triple-faulted: rip={ud2:#x} "))
            || log.contains("vCPU 0 triple-faulted: rip=0xfff0 "),
        "{log}"
    );
}

#[test]
fn bzimage_guest_boots_through_the_64_bit_entry() {
    let dir = Scratch::new("bzimage");
    let code = [print("bz\n"), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("bzImage", &tiny_bzimage(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "64"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "bz\n");
}

#[test]
fn boot_timer_logs_the_time_to_the_guest_write() {
    let dir = Scratch::new("timer");
    let code = [BOOT_TIMER_WRITE.to_vec(), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("timer.elf", &tiny_elf(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "32", "--boot-timer"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert!(
        stderr(&output).contains("Guest-boot-time"),
        "{}",
        stderr(&output)
    );
    // Without the device the write goes nowhere and nothing is logged.
    let output = ember_with_kernel(&kernel, &["--memory", "32"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert!(!stderr(&output).contains("Guest-boot-time"));
}

#[test]
fn serial_output_goes_to_a_file_when_asked() {
    let dir = Scratch::new("serial-file");
    let code = [print("to a file\n"), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("hello.elf", &tiny_elf(&code));
    let console = dir.path("console.log");
    let serial = format!("file:{}", console.display());
    let output = ember_with_kernel(&kernel, &["--memory", "32", "--serial", &serial]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "");
    assert_eq!(fs::read_to_string(&console).unwrap(), "to a file\n");
}

/// Code that prints `count` times the byte `x` on COM1, in a loop.
fn print_many(count: u32) -> Vec<u8> {
    let mut code = SET_DX_COM1.to_vec();
    // mov ecx, count
    code.push(0xb9);
    code.extend_from_slice(&count.to_le_bytes());
    // loop: mov al, 'x'; out dx, al; dec ecx; jnz loop
    code.extend_from_slice(&[0xb0, b'x', 0xee, 0xff, 0xc9, 0x75, 0xf9]);
    code
}

/// Waits for `child` to exit, at most `limit`; kills it and fails past that.
fn wait_at_most(child: &mut std::process::Child, limit: std::time::Duration) -> ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ember did not exit within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_guest_printing_to_a_stdout_nobody_reads_still_reboots() {
    let dir = Scratch::new("stalled-stdout");
    // Twice what the console buffers (64 KiB) and a pipe holds (64 KiB by default) together.
    let total: u32 = 256 * 1024;
    let code = [print_many(total), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("chatty.elf", &tiny_elf(&code));
    let log = dir.path("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32"])
        .stdin(Stdio::null())
        // A pipe whose reader never reads.
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_at_most(&mut child, std::time::Duration::from_secs(120));
    let err = fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("i8042"), "{err}");
    // What the pipe did not take was dropped, and said so.
    assert!(err.contains("bytes of the guest's output"), "{err}");
    let mut printed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut printed)
        .unwrap();
    assert!(!printed.is_empty() && printed.len() < total as usize);
    assert!(printed.iter().all(|&b| b == b'x'));
}

/// Code that echoes what COM1 receives until it receives `q`, then resets through the i8042.
fn echo_until_q() -> Vec<u8> {
    let code = [
        0x66, 0xba, 0xfd, 0x03, // start: mov dx, 0x3fd (line status)
        0xec, // poll: in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz poll
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0x3c, b'q', // cmp al, 'q'
        0x75, 0xed, // jne start
    ];
    [code.to_vec(), I8042_RESET.to_vec()].concat()
}

#[test]
fn stdin_reaches_the_guest_through_the_serial_console_with_flow_control() {
    echo_stdin(false);
}

/// As a terminal's: input that came at once, more than the receive FIFO holds, reaches the guest
/// while stdin stays open, with nothing more coming to wake ember.
#[test]
fn stdin_held_open_reaches_the_guest_whole() {
    echo_stdin(true);
}

/// Feeds the echo guest many times what the receive FIFO holds, then `q`, on a pipe that is
/// closed after, or with `hold_open`, kept open until ember exits.
fn echo_stdin(hold_open: bool) {
    let dir = Scratch::new("echo");
    let kernel = dir.file("echo.elf", &tiny_elf(&echo_until_q()));
    // Many times what the receive FIFO holds, so that stdin leaves the loop and comes back.
    let letters = b"abcdefghijklmnoprstuvwxyz";
    let mut input: Vec<u8> = letters.iter().copied().cycle().take(4000).collect();
    input.push(b'q');
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    {
        use std::io::Write;
        stdin.write_all(&input).unwrap();
    }
    let held = hold_open.then_some(stdin);
    let status = wait_at_most(&mut child, std::time::Duration::from_secs(120));
    drop(held);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    assert_eq!(echoed.len(), input.len());
    assert!(
        echoed == input,
        "the guest echoed other bytes than stdin gave"
    );
}

#[test]
fn serial_output_file_stops_growing_at_its_cap() {
    let dir = Scratch::new("serial-cap");
    let code = [print_many(10_000), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("chatty.elf", &tiny_elf(&code));
    let console = dir.file("console.log", b"earlier run\n");
    let serial = format!("file:{}", console.display());
    let output = ember_with_kernel(
        &kernel,
        &[
            "--memory",
            "32",
            "--serial",
            &serial,
            "--serial-max-bytes",
            "1000",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    // The cap counts what the file held before.
    let written = fs::read(&console).unwrap();
    assert_eq!(written.len(), 1000);
    assert!(written.starts_with(b"earlier run\nxxxx"));
    assert!(
        stderr(&output).contains("dropped 9012 bytes"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn two_vcpus_start_and_the_guest_still_reboots() {
    let dir = Scratch::new("smp");
    let code = [print("smp\n"), I8042_RESET.to_vec()].concat();
    let kernel = dir.file("smp.elf", &tiny_elf(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "32", "--vcpus", "2"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "smp\n");
}

/// On a host whose KVM emulates guest kernel code and lacks `cmpxchg16b` (a paravirtual nested
/// KVM), the guest cannot run: ember must say so, with the RIP, and exit. On a host with VMX/SVM
/// the instruction runs and the guest reboots.
#[test]
fn guest_the_host_cannot_run_is_a_clear_error_with_the_rip() {
    let dir = Scratch::new("emulation");
    // mov eax, 0x200000; lock cmpxchg16b [rax]  (at 1 MiB + 5)
    let code = [
        vec![0xb8, 0x00, 0x00, 0x20, 0x00, 0xf0, 0x48, 0x0f, 0xc7, 0x08],
        I8042_RESET.to_vec(),
    ]
    .concat();
    let kernel = dir.file("cx16.elf", &tiny_elf(&code));
    let output = ember_with_kernel(&kernel, &["--memory", "32"]);
    if host_has_hardware_virtualization() {
        assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    } else {
        assert_fails_with(&output, "0x100005");
    }
}

#[test]
fn missing_kernel_is_an_error() {
    let output = ember(&["--kernel", "/nonexistent/vmlinux"]);
    assert_fails_with(&output, "Cannot open the kernel image /nonexistent/vmlinux");
}

#[test]
fn unreadable_kernel_is_an_error() {
    let dir = Scratch::new("unreadable");
    // A directory opens but cannot be read.
    let output = ember_with_kernel(dir.dir(), &[]);
    assert_fails_with(&output, "Cannot load the kernel image");
}

#[test]
fn file_that_is_not_a_kernel_is_an_error() {
    let dir = Scratch::new("not-a-kernel");
    let kernel = dir.file("notes.txt", &b"just some text, not a kernel\n".repeat(100));
    assert_fails_with(
        &ember_with_kernel(&kernel, &[]),
        "Cannot load the kernel image",
    );
    let empty = dir.file("empty", b"");
    assert_fails_with(
        &ember_with_kernel(&empty, &[]),
        "Cannot load the kernel image",
    );
}

#[test]
fn truncated_elf_is_an_error() {
    let dir = Scratch::new("truncated");
    let image = tiny_elf(&[0xf4; 64]);
    for len in [16, 63, 100, image.len() - 1] {
        let kernel = dir.file("truncated.elf", &image[..len]);
        assert_fails_with(
            &ember_with_kernel(&kernel, &[]),
            "Cannot load the kernel image",
        );
    }
}

#[test]
fn memory_of_zero_or_more_than_the_host_can_map_is_an_error() {
    let dir = Scratch::new("memory");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--memory", "0"]),
        "Cannot set up 0 MiB of guest memory",
    );
    // 1 PiB: more address space than a process gets.
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--memory", "1073741824"]),
        "Cannot set up 1073741824 MiB of guest memory",
    );
    // Overflows when converted to bytes.
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--memory", "18446744073709551615"]),
        "guest memory",
    );
}

#[test]
fn command_line_too_long_is_an_error() {
    let dir = Scratch::new("cmdline");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    let long = "x".repeat(4096);
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--cmdline", &long]),
        "Invalid kernel command line",
    );
}

#[test]
fn initrd_that_does_not_fit_is_an_error() {
    let dir = Scratch::new("initrd");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    let initrd = dir.path("big.img");
    let file = fs::File::create(&initrd).unwrap();
    file.set_len(64 << 20).unwrap();
    assert_fails_with(
        &ember_with_kernel(
            &kernel,
            &["--memory", "32", "--initrd", initrd.to_str().unwrap()],
        ),
        "Cannot load the initrd",
    );
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--initrd", "/nonexistent/initrd"]),
        "Cannot open the initrd /nonexistent/initrd",
    );
}

#[test]
fn vcpu_count_of_zero_or_above_the_limit_is_an_error() {
    let dir = Scratch::new("vcpus");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--vcpus", "0"]),
        "The number of vCPUs must be between 1 and",
    );
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--vcpus", "255"]),
        "The number of vCPUs must be between 1 and",
    );
}

#[test]
fn malformed_flags_are_rejected_by_the_parser() {
    let output = ember(&["--kernel", "k", "--vcpus", "many"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--vcpus"));
    assert!(!stderr(&output).contains("panicked"));
}

/// Code that reads the 32-bit register at `addr` and prints its four bytes, lowest first.
fn print_register_bytes(addr: u32) -> Vec<u8> {
    let mut code = vec![0x48, 0xb8]; // mov rax, addr
    code.extend_from_slice(&u64::from(addr).to_le_bytes());
    code.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [rax]
    code.extend_from_slice(&SET_DX_COM1);
    for _ in 0..4 {
        // mov al, bl; out dx, al; shr ebx, 8
        code.extend_from_slice(&[0x88, 0xd8, 0xee, 0xc1, 0xeb, 0x08]);
    }
    code
}

/// Code that reads the 32-bit register at `addr` and prints its low byte as a digit.
fn print_register_digit(addr: u32) -> Vec<u8> {
    let mut code = vec![0x48, 0xb8]; // mov rax, addr
    code.extend_from_slice(&u64::from(addr).to_le_bytes());
    code.extend_from_slice(&[0x8b, 0x00, 0x04, b'0']); // mov eax, [rax]; add al, '0'
    code.extend_from_slice(&SET_DX_COM1);
    code.push(0xee); // out dx, al
    code
}

#[test]
fn disks_appear_as_virtio_mmio_block_devices_in_allocation_order() {
    let dir = Scratch::new("virtio-disk");
    // Magic and device ID of the first two register pages.
    let code = [
        print_register_bytes(0xd000_0000),
        print_register_digit(0xd000_0008),
        print_register_digit(0xd000_1008),
        print_register_digit(0xd000_2008),
        I8042_RESET.to_vec(),
    ]
    .concat();
    let kernel = dir.file("virtio.elf", &tiny_elf(&code));
    let a = dir.file("a.img", &[0u8; 4096]);
    let b = dir.file("b.img", &[0u8; 512]);
    let output = ember_with_kernel(
        &kernel,
        &[
            "--memory",
            "32",
            "--disk",
            a.to_str().unwrap(),
            "--disk",
            &format!("{},ro", b.display()),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    // Two block devices (ID 2), then nothing: a read of no device returns zeros.
    assert_eq!(stdout(&output), "virt220");
}

#[test]
fn missing_disk_image_is_an_error() {
    let dir = Scratch::new("disk-missing");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--disk", "/nonexistent/rootfs.ext4"]),
        "Cannot set up disk disk0",
    );
}

#[test]
fn disk_image_of_part_of_a_sector_is_an_error() {
    let dir = Scratch::new("disk-size");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    let image = dir.file("odd.img", &[0u8; 1000]);
    let output = ember_with_kernel(&kernel, &["--disk", image.to_str().unwrap()]);
    assert_fails_with(&output, "1000 bytes long, not a multiple of 512 bytes");
}

#[test]
fn duplicate_disk_ids_and_a_late_root_are_errors() {
    let dir = Scratch::new("disk-ids");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    let image = dir.file("a.img", &[0u8; 512]);
    let a = format!("{},id=data", image.display());
    assert_fails_with(
        &ember_with_kernel(&kernel, &["--disk", &a, "--disk", &a]),
        "Two disks have the ID data",
    );
    let root = format!("{},root", image.display());
    assert_fails_with(
        &ember_with_kernel(
            &kernel,
            &["--disk", image.to_str().unwrap(), "--disk", &root],
        ),
        "Only the first disk can be the root device",
    );
}

#[test]
fn tap_that_cannot_be_opened_is_an_error() {
    let dir = Scratch::new("tap");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    // Longer than an interface name can be: refused before the kernel is asked.
    let output = ember_with_kernel(&kernel, &["--net", "tap=a-name-far-too-long-for-linux"]);
    assert_fails_with(
        &output,
        "Cannot open the TAP interface a-name-far-too-long-for-linux",
    );
}

#[test]
fn malformed_mac_is_rejected_by_the_parser() {
    let output = ember(&["--kernel", "k", "--net", "tap=tap0,mac=06:00:00:00:00"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("--net") && err.contains("06:00:00:00:00"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn more_virtio_devices_than_interrupt_lines_is_an_error() {
    let dir = Scratch::new("many-disks");
    let kernel = dir.file("k.elf", &tiny_elf(&I8042_RESET));
    let image = dir.file("a.img", &[0u8; 512]);
    let specs: Vec<String> = (0..12)
        .map(|i| format!("{},id=d{i}", image.display()))
        .collect();
    let mut args = vec!["--memory", "32"];
    for spec in &specs[..11] {
        args.extend(["--disk", spec.as_str()]);
    }
    let output = ember_with_kernel(&kernel, &args);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    args.extend(["--disk", specs[11].as_str()]);
    assert_fails_with(
        &ember_with_kernel(&kernel, &args),
        "Cannot allocate an interrupt line for disk d11 (a guest has at most 11 virtio devices)",
    );
}
