//! `ember` end to end with tiny guests: a few bytes of 64-bit code in an ELF, run on the host's
//! `/dev/kvm`, and command lines a user gets wrong.
//!
//! These run on any host with `/dev/kvm`, including ones whose KVM cannot boot a Linux kernel; the
//! Linux guests are tested by `scripts/e2e.sh`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ember_boot::test_utils::{tiny_bzimage, tiny_elf};

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

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ember-test-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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
    let console = dir.0.join("console.log");
    let serial = format!("file:{}", console.display());
    let output = ember_with_kernel(&kernel, &["--memory", "32", "--serial", &serial]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "");
    assert_eq!(fs::read_to_string(&console).unwrap(), "to a file\n");
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
    let output = ember_with_kernel(&dir.0, &[]);
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
    let initrd = dir.0.join("big.img");
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
