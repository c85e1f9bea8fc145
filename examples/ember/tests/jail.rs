//! `ember` inside a jail as Firecracker's jailer makes one, and disks handed over as open
//! descriptors.
//!
//! The jail is built here, not by the jailer: a chroot holding the static `ember` binary, the
//! device nodes `/dev/kvm`, `/dev/net/tun` and `/dev/urandom`, a `/run` only the jail's user may
//! enter and the operator's files, and nothing else (no `/proc`, no `/sys`); `ember` is started
//! in it as an unprivileged uid and gid with an empty environment, the jailer's flags and no
//! `--api-sock`. That needs root; as another user the test says why it skips.
//!
//! The descriptor tests need no root: `ember` inherits an open image (close-on-exec cleared
//! in the child) and takes `/proc/self/fd/N` as that descriptor.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_boot::test_utils::tiny_elf;
use ember_vmm::jailer::monotonic_us;
use serde_json::{Value, json};

mod common;
use common::{Response, Scratch, request, wait_for_api};

/// The jail's user and group: numbers no account on the host is likely to have.
const JAIL_UID: u32 = 64_123;
const JAIL_GID: u32 = 64_124;

/// `mov dx, 0x3f8`.
const SET_DX_COM1: [u8; 4] = [0x66, 0xba, 0xf8, 0x03];
/// `mov al, 0xfe; out 0x64, al; hlt; jmp .-1`: reset through the i8042.
const I8042_RESET: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// `hlt; jmp .-1`: wait for ever.
const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd];
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

/// Code that prints, as a digit, the low byte of the capacity (in sectors) of the virtio block
/// device whose MMIO page starts at `page`.
fn print_capacity(page: u32) -> Vec<u8> {
    let addr = page + 0x100;
    let mut code = vec![0x48, 0xb8]; // mov rax, addr
    code.extend_from_slice(&u64::from(addr).to_le_bytes());
    code.extend_from_slice(&[0x8b, 0x00, 0x04, b'0']); // mov eax, [rax]; add al, '0'
    code.extend_from_slice(&SET_DX_COM1);
    code.push(0xee); // out dx, al
    code
}

/// An image of `sectors` 512-byte sectors at `path`, opened read-write (close-on-exec, as
/// Rust opens everything).
fn image(path: &Path, sectors: usize) -> File {
    fs::write(path, vec![0u8; sectors * 512]).unwrap();
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).unwrap()
}

/// Lets the child inherit `fds`: clears their close-on-exec flag between fork and exec.
fn inherit(command: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: the closure only calls fcntl, which is async-signal-safe, on descriptor numbers.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn proc_fd(file: &File) -> String {
    format!("/proc/self/fd/{}", file.as_raw_fd())
}

/// A running `ember`, killed when dropped.
struct Ember {
    child: Child,
    socket: PathBuf,
}

impl Ember {
    /// Starts `command` and waits for the API socket at `socket` to accept.
    fn spawn(command: &mut Command, socket: PathBuf) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ember starts");
        wait_for_api(&mut child, &socket);
        Ember { child, socket }
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        request(&self.socket, method, path, body.as_ref())
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    fn put(&self, path: &str, body: Value) -> Response {
        self.request("PUT", path, Some(body))
    }

    fn patch(&self, path: &str, body: Value) -> Response {
        self.request("PATCH", path, Some(body))
    }

    /// Waits at most 10 s for the process to end: its exit status, stdout and stderr.
    fn wait(mut self) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut stdout) = self.child.stdout.take() {
                    stdout.read_to_string(&mut out).unwrap();
                }
                if let Some(mut stderr) = self.child.stderr.take() {
                    stderr.read_to_string(&mut err).unwrap();
                }
                return (status.code(), out, err);
            }
            assert!(Instant::now() < deadline, "ember did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the Prometheus sample whose name ends with `suffix`.
fn prometheus_value(text: &str, suffix: &str) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            name.ends_with(suffix).then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {suffix} in {text}"))
}

fn chown(path: &Path) {
    std::os::unix::fs::chown(path, Some(JAIL_UID), Some(JAIL_GID)).unwrap();
}

/// Creates, at `path`, a character device node like the host's `host` (same device number),
/// owned by the jail's user with `mode`, as the jailer does.
fn mknod_like(path: &Path, host: &str, mode: u32) {
    let rdev = fs::metadata(host).unwrap().rdev();
    let c = c_path(path);
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, rdev) };
    assert_eq!(
        ret,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    chown(path);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Builds the chroot at `root`: what Firecracker's jailer puts there, and the operator's files
/// (a kernel, a root file system and a named pipe for the log) owned by the jail's user.
fn build_jail(root: &Path, kernel: &[u8]) {
    fs::create_dir_all(root.join("dev/net")).unwrap();
    for dir in [root, &root.join("dev"), &root.join("dev/net")] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let exec = root.join("ember");
    fs::copy(env!("CARGO_BIN_EXE_ember"), &exec).unwrap();
    fs::set_permissions(&exec, fs::Permissions::from_mode(0o755)).unwrap();
    mknod_like(&root.join("dev/kvm"), "/dev/kvm", 0o660);
    mknod_like(&root.join("dev/net/tun"), "/dev/net/tun", 0o660);
    mknod_like(&root.join("dev/urandom"), "/dev/urandom", 0o666);
    let run = root.join("run");
    fs::create_dir(&run).unwrap();
    chown(&run);
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(root.join("vmlinux"), kernel).unwrap();
    let rootfs = root.join("rootfs.ext4");
    fs::write(&rootfs, vec![0u8; 3 * 512]).unwrap();
    chown(&rootfs);
    fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o600)).unwrap();
    for name in ["logs.fifo", "metrics.fifo"] {
        let fifo = root.join(name);
        let c = c_path(&fifo);
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        chown(&fifo);
    }
}

/// A persistent TAP interface owned by the jail's user, as the operator makes one for a jail;
/// deleted when dropped.
struct Tap(String);

impl Tap {
    /// The TAP, or `None` (and why) when `ip` cannot make one here.
    fn create() -> Option<Tap> {
        let name = format!("emjail{}", std::process::id() % 100_000);
        let output = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap", "user"])
            .arg(JAIL_UID.to_string())
            .arg("group")
            .arg(JAIL_GID.to_string())
            .output();
        match output {
            Ok(output) if output.status.success() => Some(Tap(name)),
            Ok(output) => {
                let err = String::from_utf8_lossy(&output.stderr);
                eprintln!("no network interface in the jail: ip tuntap add failed: {err}");
                None
            }
            Err(err) => {
                eprintln!("no network interface in the jail: cannot run ip: {err}");
                None
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
            .output();
    }
}

/// Runs `command` chrooted at `root`, in `/`, as the jail's user and group with no
/// supplementary groups, as the jailer leaves ember.
fn jail(command: &mut Command, root: &Path) {
    let root = c_path(root);
    // SAFETY: the closure makes only async-signal-safe calls (chroot, chdir, setgroups, setgid,
    // setuid) on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let check = |ret: libc::c_int| {
                if ret < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::chroot(root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(JAIL_GID))?;
            check(libc::setuid(JAIL_UID))
        });
    }
}

#[test]
fn a_jailed_ember_serves_the_api_and_runs_a_guest_as_an_unprivileged_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: building a jail (chroot, mknod, setuid) needs root");
        return;
    }
    let scratch = Scratch::new("jailed");
    let root = scratch.path("root");
    // The guest signals the boot timer (the first MMIO page), prints the capacities of the
    // root drive (3 sectors) and of the drive handed over as a descriptor (5), and resets.
    let code = [
        BOOT_TIMER_WRITE.to_vec(),
        print("jailed "),
        print_capacity(0xd000_1000),
        print_capacity(0xd000_2000),
        I8042_RESET.to_vec(),
    ]
    .concat();
    build_jail(&root, &tiny_elf(&code));
    // The descriptor's file lies outside the jail, in a directory its user cannot enter.
    fs::create_dir(scratch.path("outside")).unwrap();
    let outside = image(&scratch.path("outside/data.img"), 5);

    // The jailer started 2 s ago, and its parent used 1 s of CPU before forking it.
    let jailer_start = monotonic_us() - 2_000_000;
    let mut command = Command::new("/ember");
    command
        .args(["--id", "jailtest", "--boot-timer", "--serial"])
        // Created by ember, as the jail's user, in the one directory it may write.
        .arg("file:/run/console.log")
        .arg("--start-time-us")
        .arg(jailer_start.to_string())
        .args([
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "1000000",
        ])
        .env_clear();
    inherit(&mut command, vec![outside.as_raw_fd()]);
    jail(&mut command, &root);
    // No --api-sock: Firecracker's default, in the jail's /run.
    let socket = root.join("run/firecracker.socket");
    let ember = Ember::spawn(&mut command, socket.clone());

    // From the host: the process is chrooted and runs as the jail's user.
    let pid = ember.child.id();
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root.canonicalize().unwrap()
    );
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for (field, id) in [("Uid:", JAIL_UID), ("Gid:", JAIL_GID)] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        assert!(
            line.split_whitespace().skip(1).all(|n| n == id.to_string()),
            "{line}"
        );
    }
    assert_eq!(fs::metadata(&socket).unwrap().uid(), JAIL_UID);

    let info = ember.get("/");
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.json()["id"], "jailtest");
    assert_eq!(info.json()["state"], "Not started");
    assert_eq!(ember.get("/machine-config").status, 200);
    // Start-up counts from the jailer's start, CPU time with its parent's.
    let metrics = ember.get("/metrics").body;
    assert!(prometheus_value(&metrics, "process_startup_time_us") >= 2_000_000);
    assert!(prometheus_value(&metrics, "process_startup_time_cpu_us") >= 1_000_000);

    let put = |path: &str, body: Value| {
        let response = ember.put(path, body);
        assert_eq!(response.status, 204, "PUT {path}: {}", response.body);
    };
    put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    put("/boot-source", json!({"kernel_image_path": "/vmlinux"}));
    put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true}),
    );
    put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": proc_fd(&outside), "is_root_device": false}),
    );
    // A path out of the jail resolves inside it, where there is no /etc/shadow.
    assert!(Path::new("/etc/shadow").exists());
    let response = ember.put(
        "/drives/shadow",
        json!({"drive_id": "shadow", "path_on_host": "../../../../etc/shadow",
               "is_root_device": false, "is_read_only": true}),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(
        response.fault(),
        "Cannot find the drive file ../../../../etc/shadow: No such file or directory (os error 2)."
    );
    // The TAP is opened through the jail's /dev/net/tun by its owner.
    let tap = Tap::create();
    if let Some(Tap(name)) = &tap {
        put(
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": name}),
        );
    }
    // The log and the metrics go to named pipes in the jail, their readers attached from the
    // host.
    let reader = |name: &str| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(root.join(name))
            .unwrap()
    };
    let mut log = reader("logs.fifo");
    let mut metrics = reader("metrics.fifo");
    put(
        "/logger",
        json!({"log_path": "logs.fifo", "level": "Info", "show_level": true}),
    );
    put("/metrics", json!({"metrics_path": "/metrics.fifo"}));
    put("/actions", json!({"action_type": "InstanceStart"}));

    let (code, stdout, stderr) = ember.wait();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "");
    // Nothing it needed was missing from the jail.
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "{stderr}"
    );
    let console = root.join("run/console.log");
    assert_eq!(
        fs::read_to_string(&console).unwrap(),
        "jailed 35",
        "{stderr}"
    );
    assert_eq!(fs::metadata(&console).unwrap().uid(), JAIL_UID);
    assert!(
        socket.exists(),
        "the API socket is left on exit, as Firecracker leaves it"
    );
    let mut lines = String::new();
    metrics.read_to_string(&mut lines).unwrap();
    let last: Value = serde_json::from_str(lines.lines().last().expect("a metrics line")).unwrap();
    assert!(last.is_object(), "{lines}");
    drop(tap);
    let mut text = String::new();
    log.read_to_string(&mut text).unwrap();
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
    let boot_us: u64 = text
        .lines()
        .find_map(|l| l.split_once("Guest-boot-time = "))
        .and_then(|(_, rest)| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no boot time in the log: {text}"))
        .parse()
        .unwrap();
    assert!(
        boot_us >= 2_000_000,
        "the boot time counts from the jailer's start: {text}"
    );
    // The descriptor's file was written through nothing but the descriptor: still there, whole.
    assert_eq!(outside.metadata().unwrap().len(), 5 * 512);
}

/// Starts `ember --api-sock` in `scratch` with the guest `code`, its console in a file, the
/// descriptors `fds` inherited.
fn ember_with_fds(scratch: &Scratch, code: &[u8], fds: Vec<RawFd>) -> Ember {
    let kernel = scratch.file("guest.elf", &tiny_elf(code));
    let socket = scratch.path("api.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command
        .arg("--api-sock")
        .arg(&socket)
        .arg("--serial")
        .arg(format!("file:{}", scratch.path("console").display()));
    inherit(&mut command, fds);
    let ember = Ember::spawn(&mut command, socket);
    let response = ember.put(
        "/boot-source",
        json!({"kernel_image_path": kernel.to_str().unwrap()}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let response = ember.put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    ember
}

#[test]
fn a_drive_can_be_an_inherited_descriptor_of_a_file_elsewhere() {
    let scratch = Scratch::new("fd-api");
    fs::create_dir(scratch.path("elsewhere")).unwrap();
    let data = image(&scratch.path("elsewhere/data.img"), 5);
    let bigger = image(&scratch.path("elsewhere/bigger.img"), 9);
    let read_only = File::open(scratch.path("elsewhere/bigger.img")).unwrap();
    // No path reaches the files any more: only the descriptors do.
    fs::remove_dir_all(scratch.path("elsewhere")).unwrap();
    let code = [print_capacity(0xd000_0000), HALT.to_vec()].concat();
    let ember = ember_with_fds(
        &scratch,
        &code,
        vec![data.as_raw_fd(), bigger.as_raw_fd(), read_only.as_raw_fd()],
    );

    let drive = |path: &str, read_only: bool| {
        json!({"drive_id": "data", "path_on_host": path, "is_root_device": false,
               "is_read_only": read_only})
    };
    // Descriptors that cannot back the drive are refused with a reason.
    let refused = [
        (
            drive(&proc_fd(&read_only), false),
            format!(
                "The inherited descriptor {} is not open for reading and writing (the drive is not read-only)",
                read_only.as_raw_fd()
            ),
        ),
        (
            drive("/proc/self/fd/1000", true),
            "Cannot use the inherited descriptor 1000 as a disk image: Bad file descriptor (os error 9)"
                .to_string(),
        ),
        (
            drive("/proc/self/fd/0", true),
            "The disk image /proc/self/fd/0 is neither a regular file nor a block device"
                .to_string(),
        ),
        (
            drive("/proc/self/fd/3/../../../etc/passwd", true),
            "The disk path /proc/self/fd/3/../../../etc/passwd names no descriptor: /proc/self/fd/ must be followed by a descriptor number alone"
                .to_string(),
        ),
    ];
    for (body, fault) in refused {
        let response = ember.put("/drives/data", body);
        assert_eq!(response.status, 400, "{}", response.body);
        assert_eq!(response.fault(), fault);
    }
    // A read-only descriptor backs a read-only drive; the read-write one replaces it.
    let response = ember.put("/drives/data", drive(&proc_fd(&read_only), true));
    assert_eq!(response.status, 204, "{}", response.body);
    let response = ember.put("/drives/data", drive(&proc_fd(&data), false));
    assert_eq!(response.status, 204, "{}", response.body);
    let response = ember.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(response.status, 204, "{}", response.body);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(scratch.path("console")).unwrap_or_default() != "5" {
        assert!(Instant::now() < deadline, "the guest never saw its disk");
        std::thread::sleep(Duration::from_millis(10));
    }

    // PATCH swaps in another descriptor, checked the same way, on the VMM thread's filter.
    let response = ember.patch(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": proc_fd(&read_only)}),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(
        response
            .fault()
            .contains("not open for reading and writing"),
        "{}",
        response.body
    );
    let response = ember.patch(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": proc_fd(&bigger)}),
    );
    assert_eq!(response.status, 204, "{}", response.body);
    let config = ember.get("/vm/config").json();
    assert_eq!(config["drives"][0]["path_on_host"], json!(proc_fd(&bigger)));
    // SAFETY: kill has no memory preconditions; the child is ours and still running.
    unsafe { libc::kill(i32::try_from(ember.child.id()).unwrap(), libc::SIGTERM) };
    let (code, _, stderr) = ember.wait();
    assert_eq!(code, Some(143), "stderr: {stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn a_disk_flag_can_name_an_inherited_descriptor() {
    let scratch = Scratch::new("fd-flag");
    let data = image(&scratch.path("data.img"), 5);
    let code = [print_capacity(0xd000_0000), I8042_RESET.to_vec()].concat();
    let kernel = scratch.file("guest.elf", &tiny_elf(&code));
    let run = |disk: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
        command
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "32", "--disk", disk])
            .stdin(Stdio::null());
        inherit(&mut command, vec![data.as_raw_fd()]);
        command.output().unwrap()
    };
    let output = run(&proc_fd(&data));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "5");
    let output = run("/proc/self/fd/1000");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("Cannot use the inherited descriptor 1000 as a disk image"),
        "{stderr}"
    );
}
