//! ember's seccomp filters, installed through the library in a child process: a thread of each
//! kind that makes a forbidden call ends the process with the status 148 and a line naming the
//! thread and the call; the calls each kind needs still work under its filter; and a vCPU can
//! still start a device worker that installs its own filter.
//!
//! Each case runs in a fresh process, this test binary run again with `EMBER_SECCOMP_CHILD` set
//! to `kind:action`, so that a filter never lands on the test harness. The last cases run the
//! `ember` binary itself on a tiny guest: with its filters, without, with a filter file that
//! refuses a vCPU everything, and with bad filter files.

use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::Arc;

use ember_virtio::{EventHandler, EventOps, Worker, WorkerGate};
use ember_vmm::seccomp::{
    self, EXIT_CODE_BAD_SYSCALL, Filters, ThreadKind, install_sigsys_handler, set_no_new_privs,
};
use vmm_sys_util::epoll::EventSet;

mod common;
use common::Scratch;

const CHILD_ENV: &str = "EMBER_SECCOMP_CHILD";

/// The name a thread of `kind` has in ember.
fn thread_name(kind: ThreadKind) -> &'static str {
    match kind {
        ThreadKind::Vmm => "ember-vmm",
        ThreadKind::Api => "ember_api",
        ThreadKind::Vcpu => "ember_vcpu0",
        ThreadKind::Block => "ember-blk-rootfs",
        ThreadKind::Net => "ember-net",
        ThreadKind::Rng => "ember-rng",
        ThreadKind::Console => "ember-console",
        ThreadKind::Balloon => "ember-balloon",
        ThreadKind::Vsock => "ember-vsock",
    }
}

/// Runs `kind:action` in a child process.
fn child(kind: ThreadKind, action: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{}:{action}", kind.name()))
        .output()
        .unwrap()
}

fn assert_killed_for(output: &Output, kind: ThreadKind, syscall: i64) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CODE_BAD_SYSCALL),
        "{kind}: {stderr}"
    );
    let line = format!(
        "ember: seccomp: thread {} ({kind} filter) made the forbidden system call {syscall}; exiting with status 148",
        thread_name(kind)
    );
    assert!(
        stderr.contains(&line),
        "{kind}: expected `{line}` in {stderr}"
    );
}

fn assert_succeeded(output: &Output, kind: ThreadKind) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{kind}: {stderr}");
    assert!(stderr.contains("child done"), "{kind}: {stderr}");
}

#[test]
fn a_forbidden_socket_call_kills_every_kind_of_thread_with_a_clear_line() {
    for kind in ThreadKind::ALL {
        assert_killed_for(&child(kind, "socket"), kind, libc::SYS_socket);
    }
}

#[test]
fn execve_is_forbidden_to_every_kind_of_thread() {
    for kind in ThreadKind::ALL {
        assert_killed_for(&child(kind, "execve"), kind, libc::SYS_execve);
    }
}

#[test]
fn executable_memory_is_forbidden_to_every_kind_of_thread() {
    for kind in ThreadKind::ALL {
        assert_killed_for(&child(kind, "mmap_exec"), kind, libc::SYS_mmap);
    }
}

#[test]
fn kvm_ioctls_are_limited_to_what_each_thread_needs() {
    // A vCPU runs its vCPU, but cannot create a VM; the other threads cannot even run a vCPU.
    assert_killed_for(
        &child(ThreadKind::Vcpu, "kvm_create_vm"),
        ThreadKind::Vcpu,
        libc::SYS_ioctl,
    );
    for kind in ThreadKind::ALL
        .into_iter()
        .filter(|&kind| kind != ThreadKind::Vcpu)
    {
        assert_killed_for(&child(kind, "kvm_run"), kind, libc::SYS_ioctl);
    }
}

#[test]
fn the_calls_each_kind_needs_still_work_under_its_filter() {
    for kind in ThreadKind::ALL {
        assert_succeeded(&child(kind, "common"), kind);
    }
    for (kind, action) in [
        (ThreadKind::Vcpu, "kvm_run"),
        (ThreadKind::Api, "accept"),
        (ThreadKind::Block, "disk_io"),
        (ThreadKind::Net, "tap_io"),
        (ThreadKind::Rng, "entropy"),
        (ThreadKind::Vmm, "vmm_io"),
        (ThreadKind::Console, "tap_io"),
        (ThreadKind::Balloon, "tap_io"),
    ] {
        assert_succeeded(&child(kind, action), kind);
    }
}

#[test]
fn a_thread_whose_heap_grows_and_shrinks_stays_within_its_filter() {
    // glibc reads a /proc file the first time a thread's heap shrinks; ember has it do so
    // before any filter (`prepare_runtime`), or a worker freeing its buffers under a flood
    // would be stopped.
    for kind in ThreadKind::ALL {
        assert_succeeded(&child(kind, "heap_churn"), kind);
    }
}

#[test]
fn a_vcpu_starts_a_device_worker_that_installs_its_own_filter() {
    assert_succeeded(&child(ThreadKind::Vcpu, "start_worker"), ThreadKind::Vcpu);
}

#[test]
fn a_vcpu_activates_a_balloon_whose_worker_gives_a_page_back_and_polls_statistics() {
    assert_succeeded(
        &child(ThreadKind::Vcpu, "activate_balloon"),
        ThreadKind::Vcpu,
    );
}

#[test]
fn a_vcpu_activates_a_block_device_whose_worker_serves_a_read_and_resets() {
    assert_succeeded(&child(ThreadKind::Vcpu, "activate_block"), ThreadKind::Vcpu);
}

#[test]
fn a_vcpu_activates_an_async_block_device_whose_worker_reads_through_io_uring_and_resets() {
    assert_succeeded(
        &child(ThreadKind::Vcpu, "activate_async_block"),
        ThreadKind::Vcpu,
    );
}

#[test]
fn a_vcpu_activates_a_network_device_whose_worker_sends_a_frame_and_resets() {
    assert_succeeded(&child(ThreadKind::Vcpu, "activate_net"), ThreadKind::Vcpu);
}

#[test]
fn a_vcpu_activates_a_vsock_device_whose_worker_serves_both_sides_and_resets() {
    assert_succeeded(&child(ThreadKind::Vcpu, "activate_vsock"), ThreadKind::Vcpu);
}

#[test]
fn a_worker_under_its_own_filter_cannot_do_what_its_vcpu_may() {
    // A block worker started by a vCPU runs under both filters: KVM_RUN, which the vCPU's
    // allows, is refused by the block filter.
    let output = child(ThreadKind::Vcpu, "worker_kvm_run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CODE_BAD_SYSCALL),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "thread ember-blk-rootfs (block filter) made the forbidden system call {}",
            libc::SYS_ioctl
        )),
        "{stderr}"
    );
}

/// `mov al, 0xfe; out 0x64, al; hlt; jmp .-1`: reset through the i8042.
const I8042_RESET: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// A scratch directory with a tiny guest that resets at once, `reset.elf`.
fn scratch(name: &str) -> Scratch {
    let scratch = Scratch::new(name);
    scratch.file("reset.elf", &ember_boot::test_utils::tiny_elf(&I8042_RESET));
    scratch
}

/// Runs the `ember` binary on the scratch guest with `args`.
fn ember(scratch: &Scratch, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--kernel", &scratch.arg("reset.elf"), "--memory", "32"])
        .args(["--serial", "none"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A filter file with ember's filters, but for `kind`, which gets the filter of `from`.
fn filters_swapping(kind: ThreadKind, from: ThreadKind) -> Vec<u8> {
    let builtin = Filters::builtin();
    let mut bytes = (ThreadKind::ALL.len() as u64).to_le_bytes().to_vec();
    for other in ThreadKind::ALL {
        let name = other.name().as_bytes();
        bytes.extend_from_slice(&(name.len() as u64).to_le_bytes());
        bytes.extend_from_slice(name);
        let program = builtin.program(if other == kind { from } else { other });
        bytes.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.extend_from_slice(&[insn.jt, insn.jf]);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    bytes
}

#[test]
fn the_ember_binary_runs_a_guest_with_its_filters_and_without() {
    let scratch = scratch("on-off");
    for args in [&[][..], &["--no-seccomp"]] {
        let output = ember(&scratch, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(
            stderr.contains("seccomp filters are off"),
            !args.is_empty(),
            "{stderr}"
        );
    }
    let builtin = scratch.arg("builtin.bpf");
    std::fs::write(&builtin, Filters::builtin().to_bytes()).unwrap();
    let output = ember(&scratch, &["--seccomp-filter", &builtin]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_vcpu_whose_filter_refuses_kvm_run_ends_the_ember_binary_with_148_and_a_line() {
    let scratch = scratch("refused");
    // The vCPUs get the API thread's filter, which has no KVM_RUN.
    let file = scratch.arg("no-kvm-run.bpf");
    std::fs::write(&file, filters_swapping(ThreadKind::Vcpu, ThreadKind::Api)).unwrap();
    let output = ember(&scratch, &["--seccomp-filter", &file]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CODE_BAD_SYSCALL),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "ember: seccomp: thread ember_vcpu0 (vcpu filter) made the forbidden system call"
        ),
        "{stderr}"
    );
}

#[test]
fn a_bad_filter_file_is_a_clear_error_before_anything_starts() {
    let scratch = scratch("bad-file");
    let missing = scratch.arg("missing.bpf");
    let output = ember(&scratch, &["--seccomp-filter", &missing]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Cannot read the seccomp filter file"),
        "{stderr}"
    );

    // Firecracker's three kinds only.
    let three = scratch.arg("three.bpf");
    let parsed = Filters::builtin();
    let mut bytes = 3u64.to_le_bytes().to_vec();
    for kind in [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu] {
        let program = parsed.program(kind);
        bytes.extend_from_slice(&(kind.name().len() as u64).to_le_bytes());
        bytes.extend_from_slice(kind.name().as_bytes());
        bytes.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.extend_from_slice(&[insn.jt, insn.jf]);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    std::fs::write(&three, bytes).unwrap();
    let output = ember(&scratch, &["--seccomp-filter", &three]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("The seccomp filter file has no filter for the `block` threads"),
        "{stderr}"
    );
}

/// The entry of the child processes; does nothing in a normal run.
#[test]
fn seccomp_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (kind, action) = spec.split_once(':').unwrap();
    let kind = ThreadKind::from_name(kind).unwrap();
    let action = action.to_string();
    set_no_new_privs().unwrap();
    install_sigsys_handler().unwrap();
    // As ember does before its threads start.
    seccomp::prepare_runtime().unwrap();
    let filters = Arc::new(Filters::builtin());
    // Set up before the filter, as ember does: files the thread is handed.
    let scratch = std::env::temp_dir().join(format!("ember-seccomp-{}", std::process::id()));
    std::fs::write(&scratch, vec![7u8; 4096]).unwrap();
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&scratch)
            .unwrap(),
    );
    std::fs::remove_file(&scratch).unwrap();
    let (reader, writer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    // Devices are built by the VMM thread before the vCPUs start.
    // An Async drive's io_uring is set up then too.
    let block = match action.as_str() {
        "activate_block" => Some(block_rig(&file, ember_virtio::block::IoEngine::Sync)),
        "activate_async_block" => Some(block_rig(&file, ember_virtio::block::IoEngine::Async)),
        _ => None,
    };
    let net = (action == "activate_net").then(|| net_rig(writer.try_clone().unwrap()));
    let balloon = (action == "activate_balloon").then(|| {
        let config = ember_virtio::balloon::BalloonConfig::new(0, true, 1);
        rig(ember_virtio::balloon::Balloon::new(config).unwrap(), 3)
    });
    // The vsock device binds its socket, and this side's peers (the host's processes) run
    // on a thread without a filter.
    let vsock_dir =
        std::env::temp_dir().join(format!("ember-seccomp-vsock-{}", std::process::id()));
    let vsock = (action == "activate_vsock").then(|| {
        std::fs::create_dir_all(&vsock_dir).unwrap();
        let uds = vsock_dir.join("v.sock");
        let device = ember_virtio::vsock::Vsock::new(3, &uds).unwrap();
        let listener =
            std::os::unix::net::UnixListener::bind(vsock_dir.join("v.sock_1234")).unwrap();
        let host = std::thread::spawn(move || vsock_host_peers(&uds, &listener));
        (rig(device, 3), host)
    });

    let thread = std::thread::Builder::new()
        .name(thread_name(kind).to_string())
        .spawn(move || {
            filters.install(kind).unwrap();
            run(&action, &filters, &file, &reader, &writer);
            if let Some(rig) = block {
                activate_block(rig);
            }
            if let Some(rig) = net {
                activate_net(rig, &reader);
            }
            if let Some(rig) = balloon {
                activate_balloon(rig);
            }
            // The device goes back to the VMM thread, which removes its socket.
            vsock.map(|(rig, host)| (activate_vsock(rig), host))
        })
        .unwrap();
    if let Some((rig, host)) = thread.join().unwrap() {
        host.join().unwrap();
        drop(rig);
        assert!(!vsock_dir.join("v.sock").exists());
        std::fs::remove_dir_all(&vsock_dir).unwrap();
    }
    eprintln!("child done");
    std::io::stderr().flush().unwrap();
    // Nothing else of the harness runs in this process.
    // SAFETY: ends the process; nothing is left to clean up.
    unsafe { libc::_exit(0) };
}

/// Does `action` on a thread under a filter; returns only when the filter allowed it.
fn run(
    action: &str,
    filters: &Arc<Filters>,
    file: &Arc<std::fs::File>,
    reader: &std::os::unix::net::UnixDatagram,
    writer: &std::os::unix::net::UnixDatagram,
) {
    use std::os::unix::fs::FileExt;
    // The calls below take valid or deliberately invalid descriptors and buffers this function
    // owns; a refused one ends the process.
    match action {
        // SAFETY: see above.
        "socket" => unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        },
        // SAFETY: see above; the strings are NUL-terminated and the arrays end with a null.
        "execve" => unsafe {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        },
        // SAFETY: see above; a new anonymous mapping touches no existing memory.
        "mmap_exec" => unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
        },
        // SAFETY: see above.
        "kvm_create_vm" => unsafe {
            libc::ioctl(-1, 0xae01, 0);
        },
        "kvm_run" => {
            // SAFETY: see above.
            let ret = unsafe { libc::ioctl(-1, 0xae80, 0) };
            assert_eq!(ret, -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EBADF)
            );
        }
        "common" => {
            // Allocation small and large, a lock, a channel, a log line, the time.
            let big = vec![1u8; 8 << 20];
            let lock = std::sync::Mutex::new(big.len());
            let (tx, rx) = std::sync::mpsc::channel();
            tx.send(*lock.lock().unwrap()).unwrap();
            assert_eq!(rx.recv().unwrap(), 8 << 20);
            drop(big);
            let _ = std::time::Instant::now();
            eprintln!("allowed calls work");
        }
        "accept" => {
            // SAFETY: see above.
            let ret = unsafe {
                libc::accept4(
                    -1,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            assert_eq!(ret, -1);
        }
        "disk_io" => {
            let mut buf = [0u8; 512];
            file.read_exact_at(&mut buf, 512).unwrap();
            assert_eq!(buf, [7u8; 512]);
            file.write_all_at(&[9u8; 512], 0).unwrap();
            file.sync_data().unwrap();
        }
        "tap_io" => {
            writer.send(b"frame").unwrap();
            let mut buf = [0u8; 16];
            // SAFETY: see above.
            let ret = unsafe { libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), 16) };
            assert_eq!(ret, 5);
        }
        "heap_churn" => {
            // Blocks from the thread's own heap, over the trim threshold in all, freed.
            let mut blocks: Vec<Vec<u8>> = (0..8).map(|_| vec![1u8; 96 << 10]).collect();
            std::hint::black_box(&mut blocks);
            while let Some(block) = blocks.pop() {
                drop(std::hint::black_box(block));
            }
        }
        "entropy" => {
            // The entropy device's worker: random bytes without blocking.
            let mut buf = [0u8; 4096];
            let got =
                ember_virtio::rng::EntropySource::fill(&mut ember_virtio::rng::HostRng, &mut buf)
                    .unwrap();
            assert_eq!(got, buf.len());
        }
        "vmm_io" => {
            // PATCH /drives opens a new backing file and reads its size.
            let again = std::fs::File::open("/proc/self/status").unwrap();
            let _ = again.metadata().unwrap();
            // PUT and PATCH /drives with /proc/self/fd/N duplicate the inherited descriptor
            // N after checking its access mode and type, through no path.
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            let disk =
                ember_virtio::block::RawFile::open(std::path::Path::new(&path), false).unwrap();
            assert_eq!(ember_virtio::block::BlockBackend::capacity(&disk), 4096);
            drop(disk);
        }
        "start_worker" | "worker_kvm_run" => {
            let gate = WorkerGate::new();
            gate.set_thread_hook(Some(filters.worker_hook()));
            let worker = Worker::spawn("ember-blk-rootfs".into(), Idle, &gate).unwrap();
            let disk = Arc::clone(file);
            let kvm_run = action == "worker_kvm_run";
            let read = worker
                .call(move |_, _| {
                    if kvm_run {
                        // SAFETY: see above.
                        unsafe { libc::ioctl(-1, 0xae80, 0) };
                    }
                    let mut buf = [0u8; 512];
                    disk.read_exact_at(&mut buf, 1024).map(|()| buf[0])
                })
                .unwrap()
                .unwrap();
            assert_eq!(read, 7);
            worker.stop().unwrap();
        }
        "activate_block"
        | "activate_async_block"
        | "activate_net"
        | "activate_balloon"
        | "activate_vsock" => {}
        other => panic!("unknown action {other}"),
    }
    let _ = seccomp::num_faults();
}

/// virtio-mmio registers and status bits, as a guest driver uses them.
mod regs {
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
}

type Mem = vm_memory::GuestMemoryMmap<()>;

/// Drives a virtio-mmio transport as a guest driver does through a vCPU's MMIO exits: VERSION_1
/// only, every queue configured, then DRIVER_OK, which starts the device's worker.
fn activate<D: ember_virtio::VirtioDevice<Arc<Mem>>>(
    transport: &mut ember_virtio::mmio::MmioTransport<Arc<Mem>, D>,
    drivers: &[ember_virtio::mock::MockDriver],
) {
    use regs::*;
    let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
    write(STATUS, ACKNOWLEDGE);
    write(STATUS, ACKNOWLEDGE | DRIVER);
    write(DRIVER_FEATURES_SEL, 1);
    write(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1, bit 32
    write(DRIVER_FEATURES_SEL, 0);
    write(DRIVER_FEATURES, 0);
    write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for (index, driver) in (0u32..).zip(drivers) {
        write(QUEUE_SEL, index);
        write(QUEUE_NUM, u32::from(driver.size()));
        for (low, addr) in [
            (QUEUE_DESC_LOW, driver.desc_table()),
            (QUEUE_AVAIL_LOW, driver.avail_ring()),
            (QUEUE_USED_LOW, driver.used_ring()),
        ] {
            write(low, addr.0 as u32);
            write(low + 4, (addr.0 >> 32) as u32);
        }
        write(QUEUE_READY, 1);
    }
    write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

/// Waits until the device has used `count` chains of `driver`'s queue; yields rather than
/// sleeps, as a vCPU thread has no business sleeping (its filter refuses it).
fn wait_used(mem: &Mem, driver: &ember_virtio::mock::MockDriver, count: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while driver.used_idx(mem).unwrap() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never answered"
        );
        std::thread::yield_now();
    }
}

/// A virtio device behind its transport, in its guest memory, with the guest's drivers of
/// its queues: built by the VMM thread before the vCPUs start.
struct Rig<D: ember_virtio::VirtioDevice<Arc<Mem>>> {
    mem: Arc<Mem>,
    transport: ember_virtio::mmio::MmioTransport<Arc<Mem>, D>,
    drivers: Vec<ember_virtio::mock::MockDriver>,
}

fn rig<D: ember_virtio::VirtioDevice<Arc<Mem>>>(device: D, queues: u64) -> Rig<D> {
    use ember_virtio::mock::{MockDriver, guest_memory};
    let mem = Arc::new(guest_memory(0x10_0000).unwrap());
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let gate = WorkerGate::new();
    let filters = Arc::new(Filters::builtin());
    gate.set_thread_hook(Some(filters.worker_hook()));
    let transport =
        ember_virtio::mmio::MmioTransport::new(mem.clone(), Box::new(device), irq, gate).unwrap();
    let drivers = (0..queues)
        .map(|i| MockDriver::new(16, vm_memory::GuestAddress(0x1_0000 * (i + 1))))
        .collect();
    Rig {
        mem,
        transport,
        drivers,
    }
}

fn block_rig(
    file: &std::fs::File,
    io_engine: ember_virtio::block::IoEngine,
) -> Rig<ember_virtio::block::Block> {
    use ember_virtio::block::{self, Block};
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let backend = block::RawFile::open(std::path::Path::new(&path), false).unwrap();
    let config = block::Config::new("rootfs").with_io_engine(io_engine);
    let block = Block::new(backend, config).unwrap();
    rig(block, 1)
}

fn net_rig(
    device: std::os::unix::net::UnixDatagram,
) -> Rig<ember_virtio::net::Net<std::os::unix::net::UnixDatagram>> {
    device.set_nonblocking(true).unwrap();
    rig(ember_virtio::net::Net::new(device, None), 2)
}

/// Activates the block device, reads the disk's second sector through the worker, and resets
/// the device, which stops the worker.
fn activate_block(mut rig: Rig<ember_virtio::block::Block>) {
    use ember_virtio::mock::MockBuffer;
    use vm_memory::{Bytes, GuestAddress};
    activate(&mut rig.transport, &rig.drivers);
    let mem = &*rig.mem;
    // VIRTIO_BLK_T_IN of sector 1: header, 512 bytes of data, status.
    let header = GuestAddress(0x8_0000);
    mem.write_obj(0u32, header).unwrap();
    mem.write_obj(0u32, GuestAddress(0x8_0004)).unwrap();
    mem.write_obj(1u64, GuestAddress(0x8_0008)).unwrap();
    let driver = &mut rig.drivers[0];
    driver
        .add_chain(
            mem,
            &[
                MockBuffer::readable(0x8_0000, 16),
                MockBuffer::writable(0x8_1000, 512),
                MockBuffer::writable(0x8_2000, 1),
            ],
        )
        .unwrap();
    // What KVM's ioeventfd does on the guest's notification.
    rig.transport.queue_evts()[0].write(1).unwrap();
    wait_used(mem, &rig.drivers[0], 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_2000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_1000)).unwrap(), 7);
    // The driver resets the device: the worker stops and the disk comes back.
    rig.transport.write(regs::STATUS, &0u32.to_le_bytes());
    assert!(!rig.transport.is_activated());
}

/// Activates the network device, sends a frame through the worker to the peer socket, and
/// resets the device.
fn activate_net(
    mut rig: Rig<ember_virtio::net::Net<std::os::unix::net::UnixDatagram>>,
    peer: &std::os::unix::net::UnixDatagram,
) {
    use ember_virtio::mock::MockBuffer;
    use vm_memory::{Bytes, GuestAddress};
    activate(&mut rig.transport, &rig.drivers);
    let mem = &*rig.mem;
    // A frame behind the 12-byte virtio-net header, on the transmit queue (1).
    mem.write_slice(&[0u8; 12], GuestAddress(0x8_0000)).unwrap();
    mem.write_slice(b"frame!", GuestAddress(0x8_000c)).unwrap();
    rig.drivers[1]
        .add_chain(mem, &[MockBuffer::readable(0x8_0000, 18)])
        .unwrap();
    rig.transport.queue_evts()[1].write(1).unwrap();
    wait_used(mem, &rig.drivers[1], 1);
    let mut frame = [0u8; 64];
    let len = peer.recv(&mut frame).unwrap();
    // A socket backend passes the virtio-net header along with the frame.
    assert_eq!(&frame[..len], b"\0\0\0\0\0\0\0\0\0\0\0\0frame!");
    rig.transport.write(regs::STATUS, &0u32.to_le_bytes());
    assert!(!rig.transport.is_activated());
}

/// Activates the balloon, inflates a page the guest wrote (it reads as zero after), hands the
/// worker a statistics buffer that its timer gives back, and resets the device.
fn activate_balloon(mut rig: Rig<ember_virtio::balloon::Balloon>) {
    use ember_virtio::mock::MockBuffer;
    use vm_memory::{Bytes, GuestAddress};
    activate(&mut rig.transport, &rig.drivers);
    let mem = &*rig.mem;
    mem.write_slice(&[0x5a; 4096], GuestAddress(0x9_0000))
        .unwrap();
    mem.write_obj(0x90u32, GuestAddress(0x8_0000)).unwrap();
    rig.drivers[0]
        .add_chain(mem, &[MockBuffer::readable(0x8_0000, 4)])
        .unwrap();
    rig.transport.queue_evts()[0].write(1).unwrap();
    wait_used(mem, &rig.drivers[0], 1);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9_0000)).unwrap(), 0);
    // One statistic (free memory), kept by the worker until its timer fires.
    mem.write_obj(4u16, GuestAddress(0x8_1000)).unwrap();
    mem.write_obj(1u64 << 20, GuestAddress(0x8_1002)).unwrap();
    rig.drivers[2]
        .add_chain(mem, &[MockBuffer::readable(0x8_1000, 10)])
        .unwrap();
    rig.transport.queue_evts()[2].write(1).unwrap();
    wait_used(mem, &rig.drivers[2], 1);
    rig.transport.write(regs::STATUS, &0u32.to_le_bytes());
    assert!(!rig.transport.is_activated());
}

/// The host's processes of [`activate_vsock`]: one connects through the device's socket to the
/// guest's port 52, says hello and gets an answer, then sees the guest reset the connection;
/// one listens on host port 1234, where the guest connects and writes.
fn vsock_host_peers(uds: &std::path::Path, listener: &std::os::unix::net::UnixListener) {
    use std::io::{BufRead, Read};
    let timeout = Some(std::time::Duration::from_secs(20));
    let mut stream = std::os::unix::net::UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(timeout).unwrap();
    stream.write_all(b"CONNECT 52\n").unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    stream.write_all(b"hello").unwrap();
    let mut answer = [0u8; 5];
    reader.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"world");
    // The guest's RST closes the stream.
    assert_eq!(reader.read(&mut answer).unwrap(), 0);

    let (mut guest, _) = listener.accept().unwrap();
    guest.set_read_timeout(timeout).unwrap();
    let mut bytes = [0u8; 5];
    guest.read_exact(&mut bytes).unwrap();
    assert_eq!(&bytes, b"guest");
}

/// The guest's side of a vsock rig: the receive buffers handed over, and the used ones read.
struct VsockGuest {
    /// The receive queue's next used entry.
    rx_next: u16,
    /// Transmit chains given so far.
    tx_count: u16,
}

impl VsockGuest {
    const RX_BUFFERS: u64 = 14;
    const RX_BASE: u64 = 0x8_0000;
    const TX_BASE: u64 = 0x9_0000;

    fn header(
        src_port: u32,
        dst_port: u32,
        op: u16,
        len: usize,
    ) -> ember_virtio::vsock::PacketHeader {
        ember_virtio::vsock::PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port,
            dst_port,
            len: len as u32,
            type_: ember_virtio::vsock::TYPE_STREAM,
            op,
            flags: if op == ember_virtio::vsock::OP_SHUTDOWN {
                3
            } else {
                0
            },
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        }
    }

    /// Transmits a packet and waits for the device to take it.
    fn send(
        &mut self,
        rig: &mut Rig<ember_virtio::vsock::Vsock>,
        header: ember_virtio::vsock::PacketHeader,
        payload: &[u8],
    ) {
        use ember_virtio::mock::MockBuffer;
        use vm_memory::{Bytes, GuestAddress};
        let addr = Self::TX_BASE + u64::from(self.tx_count) * 0x1000;
        let mem = &*rig.mem;
        mem.write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        mem.write_slice(
            payload,
            GuestAddress(addr + ember_virtio::vsock::HDR_SIZE as u64),
        )
        .unwrap();
        let len = (ember_virtio::vsock::HDR_SIZE + payload.len()) as u32;
        rig.drivers[1]
            .add_chain(mem, &[MockBuffer::readable(addr, len)])
            .unwrap();
        self.tx_count += 1;
        rig.transport.queue_evts()[1].write(1).unwrap();
        wait_used(mem, &rig.drivers[1], self.tx_count);
    }

    /// Waits for a packet to the guest's port `port` with operation `op`; skips others (credit
    /// updates). Returns its payload.
    fn receive(&mut self, rig: &Rig<ember_virtio::vsock::Vsock>, port: u32, op: u16) -> Vec<u8> {
        use vm_memory::{Bytes, GuestAddress};
        let mem = &*rig.mem;
        loop {
            assert!(
                u64::from(self.rx_next) < Self::RX_BUFFERS,
                "out of receive buffers"
            );
            wait_used(mem, &rig.drivers[0], self.rx_next + 1);
            let (id, _) = rig.drivers[0].used_elem(mem, self.rx_next).unwrap();
            self.rx_next += 1;
            let addr = Self::RX_BASE + u64::from(id) * 0x1000;
            let mut bytes = [0u8; ember_virtio::vsock::HDR_SIZE];
            mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let header = ember_virtio::vsock::PacketHeader::from_bytes(&bytes);
            if header.dst_port != port || header.op != op {
                continue;
            }
            let mut payload = vec![0u8; header.len as usize];
            mem.read_slice(
                &mut payload,
                GuestAddress(addr + ember_virtio::vsock::HDR_SIZE as u64),
            )
            .unwrap();
            return payload;
        }
    }
}

/// Activates the vsock device; its worker (under the vsock filter) accepts the host's
/// connection to the guest's port 52, carries data both ways, connects the guest to host
/// port 1234 (`<uds_path>_1234`), shuts that connection down, closes the first on the guest's
/// RST, and stops when the driver resets the device.
fn activate_vsock(mut rig: Rig<ember_virtio::vsock::Vsock>) -> Rig<ember_virtio::vsock::Vsock> {
    use ember_virtio::mock::MockBuffer;
    use ember_virtio::vsock::{OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN};
    use vm_memory::{Bytes, GuestAddress};
    activate(&mut rig.transport, &rig.drivers);
    for k in 0..VsockGuest::RX_BUFFERS {
        let addr = VsockGuest::RX_BASE + k * 0x1000;
        rig.drivers[0]
            .add_chain(&*rig.mem, &[MockBuffer::writable(addr, 0x1000)])
            .unwrap();
    }
    rig.transport.queue_evts()[0].write(1).unwrap();
    let mut guest = VsockGuest {
        rx_next: 0,
        tx_count: 0,
    };
    // The host's connection request, answered.
    guest.receive(&rig, 52, OP_REQUEST);
    let (id, _) = rig.drivers[0].used_elem(&*rig.mem, 0).unwrap();
    let mut bytes = [0u8; ember_virtio::vsock::HDR_SIZE];
    rig.mem
        .read_slice(
            &mut bytes,
            GuestAddress(VsockGuest::RX_BASE + u64::from(id) * 0x1000),
        )
        .unwrap();
    let host_port = ember_virtio::vsock::PacketHeader::from_bytes(&bytes).src_port;
    guest.send(
        &mut rig,
        VsockGuest::header(52, host_port, OP_RESPONSE, 0),
        &[],
    );
    assert_eq!(guest.receive(&rig, 52, OP_RW), b"hello");
    guest.send(
        &mut rig,
        VsockGuest::header(52, host_port, OP_RW, 5),
        b"world",
    );
    // The guest connects to host port 1234, writes, and shuts the connection down.
    guest.send(&mut rig, VsockGuest::header(1000, 1234, OP_REQUEST, 0), &[]);
    guest.receive(&rig, 1000, OP_RESPONSE);
    guest.send(&mut rig, VsockGuest::header(1000, 1234, OP_RW, 5), b"guest");
    guest.send(
        &mut rig,
        VsockGuest::header(1000, 1234, OP_SHUTDOWN, 0),
        &[],
    );
    // The first connection ends with the guest's RST.
    guest.send(&mut rig, VsockGuest::header(52, host_port, OP_RST, 0), &[]);
    rig.transport.write(regs::STATUS, &0u32.to_le_bytes());
    assert!(!rig.transport.is_activated());
    rig
}

/// A device worker's handler that waits on nothing but its control eventfd.
struct Idle;

impl EventHandler for Idle {
    fn init(&mut self, _: &mut EventOps<'_>) -> std::io::Result<()> {
        Ok(())
    }

    fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {}
}
