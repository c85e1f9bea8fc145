//! Building and running one microVM, as a straight line:
//! config → memory → VM → devices → kernel → boot params → vCPUs → event loop.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_boot::acpi::S5_SLEEP_TYPE;
use ember_boot::{CpuState, build_cmdline, configure_system, load_initrd, load_kernel};
use ember_bus::{BusRange, MmioBus, PioBus};
use ember_legacy::{
    ACPI_PM_LEN, AcpiPmDevice, BOOT_TIMER_LEN, BootTimer, COM1_PORT, EventFdTrigger, I8042_PORT,
    I8042_PORT_LEN, I8042Device, SERIAL_PORT_LEN, SerialDevice, SerialOut,
};
use ember_memory::layout::{
    ACPI_PM1_EVT_PORT, I8042_IRQ, IRQ_BASE, MMIO_DEVICES_END, MMIO32_START, SERIAL_IRQ,
};
use ember_memory::{GuestMemoryMmap, MemoryOptions, ResourceAllocator};
use ember_vcpu::{IoEventAddress, Kvm, Vcpu, VcpuHandle, Vm, VmExit, VmExitNotifier};
use ember_virtio::block::{self, Block};
use ember_virtio::mmio::{MMIO_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, cmdline_device};
use ember_virtio::net::Net;
use ember_virtio::tap::{self, Tap};
use ember_virtio::{VirtioDevice, WorkerGate};
use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{Cli, DiskSpec, NetSpec, SerialOutput};
use crate::terminal::RawStdin;

/// Everything that can stop `ember` before or while the guest runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest memory size is invalid or cannot be mapped.
    #[error("Cannot set up {mib} MiB of guest memory")]
    Memory {
        /// Requested size.
        mib: u64,
        /// Why.
        #[source]
        source: ember_memory::Error,
    },
    /// `/dev/kvm` cannot be opened.
    #[error("Cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// The VM cannot be created.
    #[error("Cannot create the VM")]
    Vm(#[source] ember_vcpu::vm::Error),
    /// The vCPU count is out of range.
    #[error("The number of vCPUs must be between 1 and {max}, not {requested}")]
    VcpuCount {
        /// Requested count.
        requested: u8,
        /// The most this host's KVM and the MP table allow.
        max: usize,
    },
    /// A vCPU cannot be created or configured.
    #[error("Cannot set up vCPU {index}")]
    Vcpu {
        /// The vCPU's index.
        index: u8,
        /// Why.
        #[source]
        source: ember_vcpu::vcpu::Error,
    },
    /// A vCPU thread cannot be started.
    #[error("Cannot start vCPU {index}")]
    StartVcpu {
        /// The vCPU's index.
        index: u8,
        /// Why.
        #[source]
        source: ember_vcpu::runner::Error,
    },
    /// A file given on the command line cannot be opened.
    #[error("Cannot open the {what} {}", path.display())]
    Open {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel image cannot be loaded.
    #[error("Cannot load the kernel image {}", path.display())]
    Kernel {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: ember_boot::kernel::Error,
    },
    /// The initrd cannot be loaded.
    #[error("Cannot load the initrd {}", path.display())]
    Initrd {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: ember_boot::initrd::Error,
    },
    /// The kernel command line is invalid.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] ember_boot::cmdline::Error),
    /// Boot parameters, tables or page tables cannot be written.
    #[error("Cannot set up the guest's boot environment")]
    Boot(#[source] ember_boot::system::Error),
    /// The serial console cannot be set up.
    #[error("Cannot set up the serial console")]
    Serial(#[source] ember_legacy::serial::Error),
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// An MMIO range cannot be allocated.
    #[error("Cannot allocate an MMIO range")]
    Allocate(#[source] ember_memory::allocator::Error),
    /// A device cannot be put on a bus.
    #[error("Cannot register the {0} on its bus")]
    Bus(String, #[source] ember_bus::Error),
    /// Two disks have the same ID.
    #[error("Two disks have the ID {0}")]
    DuplicateDiskId(String),
    /// A disk other than the first is marked as the root device.
    #[error("Only the first disk can be the root device (/dev/vda); disk {0} is marked root")]
    RootNotFirst(String),
    /// A disk cannot be set up.
    #[error("Cannot set up disk {id}")]
    Disk {
        /// The disk's ID.
        id: String,
        /// Why.
        #[source]
        source: block::Error,
    },
    /// A TAP interface cannot be opened.
    #[error("Cannot open the TAP interface {name}")]
    Tap {
        /// The interface's name.
        name: String,
        /// Why.
        #[source]
        source: tap::Error,
    },
    /// A virtio device's transport cannot be set up.
    #[error("Cannot set up the MMIO transport of {0}")]
    Transport(String, #[source] io::Error),
    /// An interrupt line cannot be allocated.
    #[error(
        "Cannot allocate an interrupt line for {0} (a guest has at most {MAX_VIRTIO_DEVICES} virtio devices)"
    )]
    AllocateIrq(String, #[source] ember_memory::allocator::Error),
    /// A queue notification cannot be connected.
    #[error("Cannot connect the queue notifications of {0}")]
    Ioevent(String, #[source] ember_vcpu::vm::Error),
    /// An interrupt line cannot be connected.
    #[error("Cannot connect the {0} to its interrupt line")]
    Irq(String, #[source] ember_vcpu::vm::Error),
    /// The terminal cannot be switched to raw mode.
    #[error("Cannot put the terminal in raw mode")]
    Terminal(#[source] io::Error),
    /// The event loop failed.
    #[error("The event loop failed")]
    EventLoop(#[source] io::Error),
    /// The guest stopped in a way that is not a reboot or power-off.
    #[error("The guest stopped: {0}")]
    Guest(String),
}

/// Last interrupt line of the devices declared on the kernel command line. A Linux guest that
/// boots with ACPI maps the ISA lines (0-15) by itself, but lines 16-23 only for devices its
/// ACPI tables describe: a virtio-mmio device on line 16 fails to probe.
const CMDLINE_DEVICE_IRQ_MAX: u32 = 15;

/// How many virtio devices fit on the lines from `IRQ_BASE` to `CMDLINE_DEVICE_IRQ_MAX`.
const MAX_VIRTIO_DEVICES: u32 = CMDLINE_DEVICE_IRQ_MAX - IRQ_BASE + 1;

/// Result type of building and running a VM.
pub type Result<T> = std::result::Result<T, Error>;

/// How a guest that stopped cleanly stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine through the i8042 keyboard controller (Linux `reboot=k`).
    I8042Reset,
    /// The guest reset its CPUs: a triple fault (Linux `reboot=t`) or a reset system event.
    Reset,
    /// The guest asked for a power-off through a system event.
    Shutdown,
    /// The guest powered off through the ACPI PM1a control register (Linux `poweroff`).
    AcpiPowerOff,
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::I8042Reset => write!(f, "The guest reset the VM through the i8042"),
            GuestExit::Reset => write!(f, "The guest reset its CPUs"),
            GuestExit::Shutdown => write!(f, "The guest powered off"),
            GuestExit::AcpiPowerOff => write!(f, "The guest powered off through ACPI"),
        }
    }
}

/// The legacy devices the event loop talks to.
struct Legacy {
    serial: Arc<Mutex<SerialDevice<SerialOut>>>,
    reset_evt: EventFd,
    power_off_evt: EventFd,
}

/// Builds the VM `cli` describes, runs it until the guest reboots, powers off or fails.
pub fn run(cli: &Cli, start: Instant) -> Result<GuestExit> {
    // Guest memory and the VM around it. Memory is registered before the irqchip exists,
    // which `Vm::new` does in that order.
    let memory = create_memory(cli)?;
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = Vm::new(&kvm, memory.clone()).map_err(Error::Vm)?;
    check_vcpu_count(cli.vcpus, vm.max_vcpus())?;

    // Devices.
    let mut pio = PioBus::new();
    let mut mmio = MmioBus::new();
    let mut allocator = ResourceAllocator::with_ranges(
        MMIO32_START..MMIO_DEVICES_END,
        IRQ_BASE..=CMDLINE_DEVICE_IRQ_MAX,
    );
    let legacy = attach_legacy_devices(&vm, &mut pio, &cli.serial)?;
    if cli.boot_timer {
        attach_boot_timer(&mut mmio, &mut allocator, start)?;
    }
    let mut virtio = VirtioAttacher {
        vm: &vm,
        mmio: &mut mmio,
        allocator: &mut allocator,
        cmdline: Vec::new(),
    };
    attach_disks(&mut virtio, &cli.disks)?;
    attach_nets(&mut virtio, &cli.nets)?;
    let cmdline_extra = virtio.cmdline;

    // Kernel, initrd, command line, boot parameters.
    let boot_state = load_guest(cli, &memory, &cmdline_extra)?;

    // vCPUs, then the loop that waits for the guest to finish.
    let exit = VmExitNotifier::new().map_err(|source| Error::StartVcpu { index: 0, source })?;
    let vcpus = start_vcpus(&vm, cli.vcpus, &boot_state, pio, mmio, &exit)?;
    info!(
        "Started {} vCPU(s) with {} MiB of memory",
        cli.vcpus, cli.memory
    );

    let outcome = event_loop(&legacy, &exit, matches!(cli.serial, SerialOutput::Stdio));
    for vcpu in vcpus {
        if let Err(err) = vcpu.stop() {
            warn!("{err}");
        }
    }
    outcome
}

fn create_memory(cli: &Cli) -> Result<Arc<GuestMemoryMmap>> {
    let memory_error = |source| Error::Memory {
        mib: cli.memory,
        source,
    };
    let size = ember_memory::mem_size_from_mib(cli.memory).map_err(memory_error)?;
    let options = MemoryOptions {
        ksm: cli.ksm,
        hugepages: cli.hugepages,
    };
    let memory = ember_memory::create_guest_memory(size, options).map_err(memory_error)?;
    Ok(Arc::new(memory))
}

fn check_vcpu_count(requested: u8, kvm_max: usize) -> Result<()> {
    let max = kvm_max.min(usize::from(ember_boot::mptable::MAX_VCPUS));
    if requested == 0 || usize::from(requested) > max {
        return Err(Error::VcpuCount { requested, max });
    }
    Ok(())
}

/// COM1 on IRQ 4, the i8042 on IRQ 1 and the ACPI PM registers, on the port bus.
fn attach_legacy_devices(vm: &Vm, pio: &mut PioBus, serial: &SerialOutput) -> Result<Legacy> {
    let out = match serial {
        SerialOutput::Stdio => SerialOut::stdout(),
        SerialOutput::File(path) => SerialOut::file(path).map_err(Error::Serial)?,
        SerialOutput::None => SerialOut::sink(),
    };
    let serial_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
    vm.register_irqfd(serial_irq.eventfd(), SERIAL_IRQ)
        .map_err(|e| Error::Irq("serial console".into(), e))?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, out).map_err(Error::Serial)?,
    ));
    let range = BusRange::new(COM1_PORT, SERIAL_PORT_LEN)
        .map_err(|e| Error::Bus("serial console".into(), e))?;
    pio.insert(range, serial.clone())
        .map_err(|e| Error::Bus("serial console".into(), e))?;

    let reset = EventFdTrigger::new().map_err(Error::EventFd)?;
    let reset_evt = reset.eventfd().try_clone().map_err(Error::EventFd)?;
    let kbd_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
    vm.register_irqfd(kbd_irq.eventfd(), I8042_IRQ)
        .map_err(|e| Error::Irq("i8042".into(), e))?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(reset, kbd_irq)));
    let range =
        BusRange::new(I8042_PORT, I8042_PORT_LEN).map_err(|e| Error::Bus("i8042".into(), e))?;
    pio.insert(range, i8042)
        .map_err(|e| Error::Bus("i8042".into(), e))?;

    let power_off = EventFdTrigger::new().map_err(Error::EventFd)?;
    let power_off_evt = power_off.eventfd().try_clone().map_err(Error::EventFd)?;
    let pm = Arc::new(Mutex::new(AcpiPmDevice::new(power_off, S5_SLEEP_TYPE)));
    let range = BusRange::new(ACPI_PM1_EVT_PORT, ACPI_PM_LEN)
        .map_err(|e| Error::Bus("ACPI PM registers".into(), e))?;
    pio.insert(range, pm)
        .map_err(|e| Error::Bus("ACPI PM registers".into(), e))?;

    Ok(Legacy {
        serial,
        reset_evt,
        power_off_evt,
    })
}

/// The boot timer takes the first MMIO range, which the guest's init knows (0xd0000000).
fn attach_boot_timer(
    mmio: &mut MmioBus,
    allocator: &mut ResourceAllocator,
    start: Instant,
) -> Result<()> {
    let addr = allocator
        .allocate_mmio(BOOT_TIMER_LEN)
        .map_err(Error::Allocate)?;
    let range =
        BusRange::new(addr.0, BOOT_TIMER_LEN).map_err(|e| Error::Bus("boot timer".into(), e))?;
    mmio.insert(range, Arc::new(Mutex::new(BootTimer::new(start))))
        .map_err(|e| Error::Bus("boot timer".into(), e))?;
    debug!("Boot timer at {:#x}", addr.0);
    Ok(())
}

/// Puts virtio devices on the MMIO bus, each with a page of MMIO, an interrupt line, an irqfd
/// and one ioeventfd per queue, and collects the command line that tells the guest where they
/// are.
struct VirtioAttacher<'a> {
    vm: &'a Vm,
    mmio: &'a mut MmioBus,
    allocator: &'a mut ResourceAllocator,
    cmdline: Vec<String>,
}

impl VirtioAttacher<'_> {
    fn attach(
        &mut self,
        name: String,
        device: Box<dyn VirtioDevice<GuestMemoryMmap>>,
    ) -> Result<()> {
        let addr = self
            .allocator
            .allocate_mmio(MMIO_SIZE)
            .map_err(Error::Allocate)?;
        let irq = self
            .allocator
            .allocate_irq()
            .map_err(|e| Error::AllocateIrq(name.clone(), e))?;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm
            .register_irqfd(&irq_evt, irq)
            .map_err(|e| Error::Irq(name.clone(), e))?;
        let transport =
            MmioTransport::new(self.vm.memory().clone(), device, irq_evt, WorkerGate::new())
                .map_err(|e| Error::Transport(name.clone(), e))?;
        let notify = IoEventAddress::Mmio(addr.0 + QUEUE_NOTIFY_OFFSET);
        for (index, evt) in (0u32..).zip(transport.queue_evts()) {
            self.vm
                .register_ioevent(evt, notify, index)
                .map_err(|e| Error::Ioevent(name.clone(), e))?;
        }
        let range = BusRange::new(addr.0, MMIO_SIZE).map_err(|e| Error::Bus(name.clone(), e))?;
        self.mmio
            .insert(range, Arc::new(Mutex::new(transport)))
            .map_err(|e| Error::Bus(name.clone(), e))?;
        debug!("{name} at {:#x}, IRQ {irq}", addr.0);
        self.cmdline.push(cmdline_device(addr, irq));
        Ok(())
    }
}

/// The disks, in order: the first is `/dev/vda`, and the root device when marked so.
fn attach_disks(virtio: &mut VirtioAttacher<'_>, disks: &[DiskSpec]) -> Result<()> {
    let ids = disk_ids(disks)?;
    for (disk, id) in disks.iter().zip(ids) {
        let config = block::Config {
            path: disk.path.clone(),
            read_only: disk.read_only,
            id: id.clone(),
        };
        let block = Block::new(&config).map_err(|source| Error::Disk {
            id: id.clone(),
            source,
        })?;
        if disk.root {
            virtio.cmdline.push("root=/dev/vda".into());
            virtio
                .cmdline
                .push(if disk.read_only { "ro" } else { "rw" }.into());
        }
        virtio.attach(format!("disk {id}"), Box::new(block))?;
    }
    Ok(())
}

/// Each disk's ID (`diskN` unless given), checked: distinct, and only the first disk is root.
fn disk_ids(disks: &[DiskSpec]) -> Result<Vec<String>> {
    let ids: Vec<String> = disks
        .iter()
        .enumerate()
        .map(|(index, disk)| disk.id.clone().unwrap_or_else(|| format!("disk{index}")))
        .collect();
    for (index, id) in ids.iter().enumerate() {
        if ids.get(..index).is_some_and(|before| before.contains(id)) {
            return Err(Error::DuplicateDiskId(id.clone()));
        }
        if index > 0 && disks.get(index).is_some_and(|d| d.root) {
            return Err(Error::RootNotFirst(id.clone()));
        }
    }
    Ok(ids)
}

fn attach_nets(virtio: &mut VirtioAttacher<'_>, nets: &[NetSpec]) -> Result<()> {
    for net in nets {
        let tap = Tap::open(&net.tap).map_err(|source| Error::Tap {
            name: net.tap.clone(),
            source,
        })?;
        virtio.attach(
            format!("network interface {}", net.tap),
            Box::new(Net::new(tap, net.mac)),
        )?;
    }
    Ok(())
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads kernel and initrd, writes the command line and boot tables; returns the boot vCPU's
/// initial state.
fn load_guest(cli: &Cli, memory: &GuestMemoryMmap, cmdline_extra: &[String]) -> Result<CpuState> {
    let kernel =
        load_kernel(memory, &mut open("kernel image", &cli.kernel)?).map_err(|source| {
            Error::Kernel {
                path: cli.kernel.clone(),
                source,
            }
        })?;
    debug!(
        "Kernel {:?} entered at {:#x}",
        kernel.format, kernel.entry.0
    );
    let initrd = match &cli.initrd {
        Some(path) => Some(
            load_initrd(memory, &mut open("initrd", path)?, &kernel).map_err(|source| {
                Error::Initrd {
                    path: path.clone(),
                    source,
                }
            })?,
        ),
        None => None,
    };
    let extra: Vec<&str> = cmdline_extra.iter().map(String::as_str).collect();
    let cmdline = build_cmdline(&cli.cmdline, &extra).map_err(Error::Cmdline)?;
    configure_system(memory, &kernel, &cmdline, initrd, cli.vcpus).map_err(Error::Boot)
}

fn start_vcpus(
    vm: &Vm,
    count: u8,
    boot_state: &CpuState,
    pio: PioBus,
    mmio: MmioBus,
    exit: &VmExitNotifier,
) -> Result<Vec<VcpuHandle>> {
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut handles = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let vcpu = Vcpu::new(vm, index, count, pio.clone(), mmio.clone())
            .map_err(|source| Error::Vcpu { index, source })?;
        if index == 0 {
            vcpu.set_boot_state(boot_state)
                .map_err(|source| Error::Vcpu { index, source })?;
        }
        let handle = vcpu
            .start(exit.clone())
            .map_err(|source| Error::StartVcpu { index, source })?;
        handles.push(handle);
    }
    Ok(handles)
}

const TOKEN_STDIN: u64 = 0;
const TOKEN_SERIAL_READY: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_VM_EXIT: u64 = 3;
const TOKEN_POWER_OFF: u64 = 4;

/// Waits for the guest to end the VM, feeding stdin to the serial console meanwhile.
///
/// Stdin is watched only while the serial receive FIFO has room: when it is full, stdin leaves
/// the epoll set until the guest drains the FIFO, so a fast producer neither spins the loop nor
/// grows a buffer.
fn event_loop(legacy: &Legacy, exit: &VmExitNotifier, stdio: bool) -> Result<GuestExit> {
    let epoll = Epoll::new().map_err(Error::EventLoop)?;
    let watch = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    watch(legacy.reset_evt.as_raw_fd(), TOKEN_RESET).map_err(Error::EventLoop)?;
    watch(legacy.power_off_evt.as_raw_fd(), TOKEN_POWER_OFF).map_err(Error::EventLoop)?;
    watch(exit.event_fd().as_raw_fd(), TOKEN_VM_EXIT).map_err(Error::EventLoop)?;
    let serial_ready = lock(&legacy.serial)
        .input_ready_evt()
        .try_clone()
        .map_err(Error::EventFd)?;
    watch(serial_ready.as_raw_fd(), TOKEN_SERIAL_READY).map_err(Error::EventLoop)?;

    let _raw = if stdio {
        Some(RawStdin::enable().map_err(Error::Terminal)?)
    } else {
        None
    };
    let stdin_fd = io::stdin().as_raw_fd();
    // Regular files and /dev/null cannot be watched with epoll; such a stdin gives no input.
    let mut stdin_watched = stdio && watch(stdin_fd, TOKEN_STDIN).is_ok();
    let mut stdin_open = stdin_watched;

    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Error::EventLoop(err)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_RESET => return Ok(GuestExit::I8042Reset),
                TOKEN_POWER_OFF => return Ok(GuestExit::AcpiPowerOff),
                TOKEN_VM_EXIT => {
                    return match exit.exit() {
                        Some(VmExit::Reset) => Ok(GuestExit::Reset),
                        Some(VmExit::Shutdown) => Ok(GuestExit::Shutdown),
                        Some(VmExit::Error(err)) => Err(Error::Guest(err)),
                        None => continue,
                    };
                }
                TOKEN_SERIAL_READY => {
                    // Clearing a non-blocking eventfd that another event already cleared is
                    // fine.
                    let _ = serial_ready.read();
                    if stdin_open && !stdin_watched {
                        stdin_watched = watch(stdin_fd, TOKEN_STDIN).is_ok();
                    }
                }
                TOKEN_STDIN => {
                    let outcome = lock(&legacy.serial).feed_from(&mut io::stdin().lock());
                    let stop_watching = match outcome {
                        Ok(outcome) if outcome.eof => {
                            stdin_open = false;
                            true
                        }
                        Ok(outcome) => outcome.full,
                        Err(err) => {
                            warn!("Serial input stopped: {err}");
                            stdin_open = false;
                            true
                        }
                    };
                    if stop_watching && stdin_watched {
                        epoll
                            .ctl(ControlOperation::Delete, stdin_fd, EpollEvent::default())
                            .map_err(Error::EventLoop)?;
                        stdin_watched = false;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Locks a device, going on with its state if a vCPU thread panicked while holding it.
fn lock<T>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: Option<&str>, root: bool) -> DiskSpec {
        DiskSpec {
            path: "disk.img".into(),
            read_only: false,
            root,
            id: id.map(String::from),
        }
    }

    #[test]
    fn disks_are_named_disk_n_unless_given_an_id() {
        let ids = disk_ids(&[
            disk(None, true),
            disk(Some("data"), false),
            disk(None, false),
        ])
        .unwrap();
        assert_eq!(ids, ["disk0", "data", "disk2"]);
    }

    #[test]
    fn disk_ids_must_differ() {
        let err = disk_ids(&[disk(Some("a"), false), disk(Some("a"), false)]).unwrap_err();
        assert!(matches!(err, Error::DuplicateDiskId(id) if id == "a"));
        // A default name counts too.
        let err = disk_ids(&[disk(Some("disk1"), false), disk(None, false)]).unwrap_err();
        assert!(matches!(err, Error::DuplicateDiskId(id) if id == "disk1"));
    }

    #[test]
    fn only_the_first_disk_can_be_root() {
        let err = disk_ids(&[disk(None, false), disk(None, true)]).unwrap_err();
        assert!(matches!(err, Error::RootNotFirst(id) if id == "disk1"));
    }

    #[test]
    fn vcpu_count_must_be_between_one_and_the_limit() {
        assert!(matches!(
            check_vcpu_count(0, 64),
            Err(Error::VcpuCount {
                requested: 0,
                max: 64
            })
        ));
        assert!(matches!(
            check_vcpu_count(65, 64),
            Err(Error::VcpuCount { requested: 65, .. })
        ));
        assert!(check_vcpu_count(64, 64).is_ok());
        // The MP table caps what a large KVM limit allows.
        assert!(matches!(
            check_vcpu_count(255, 1024),
            Err(Error::VcpuCount { max: 254, .. })
        ));
    }
}
