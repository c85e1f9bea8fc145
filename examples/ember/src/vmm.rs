//! Building and running one microVM: [`Vmm::boot`] goes, as a straight line, from its
//! description to memory → VM → devices → kernel → boot params → vCPUs; [`run`] is the event
//! loop that serves the API before and while the guest runs, and ends with the guest.
//! [`snapshot`] saves a paused microVM and restores one in a new process.

pub mod snapshot;

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_boot::acpi::S5_SLEEP_TYPE;
use ember_boot::{
    AcpiPm, BootConfig, CpuState, Platform, build_cmdline, configure_system, load_initrd,
    load_kernel,
};
use ember_bus::{BusRange, MmioBus, PioBus};
use ember_legacy::bounded_writer::{self, BoundedWriter, BoundedWriterThread};
use ember_legacy::{
    ACPI_PM_LEN, AcpiPmDevice, BOOT_TIMER_LEN, BootTimer, COM1_PORT, EventFdTrigger, I8042_PORT,
    I8042_PORT_LEN, I8042Device, ProcessStart, SERIAL_PORT_LEN, SerialDevice, SerialOut,
};
use ember_memory::layout::{
    ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_SCI_IRQ, FIRST_ADDR_PAST_32BITS, I8042_IRQ,
    IOAPIC_PINS, IOAPIC_START, IRQ_BASE, LAPIC_START, MMIO_DEVICES_END, MMIO32_START, SERIAL_IRQ,
};
use ember_memory::{MemoryOptions, ResourceAllocator, TrackedGuestMemory};
use ember_mmds::ns::StackMetrics;
use ember_mmds::{Mmds, MmdsHandler};
use ember_rate_limiter::{BucketConfig, BucketUpdate, RateLimiter};
use ember_vcpu::bus::BusExitHandler;
use ember_vcpu::runner::StartOptions;
use ember_vcpu::vm::VmOptions;
use ember_vcpu::{IoEventAddress, Kvm, Vcpu, VcpuHandle, VmExit, VmExitNotifier};
use ember_virtio::balloon::{Balloon, BalloonConfig, BalloonStats};
use ember_virtio::block::{self, Block};
use ember_virtio::mmio::{MMIO_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, cmdline_device};
use ember_virtio::net::{MacAddr, Net};
use ember_virtio::rng::{Rng, RngMetrics};
use ember_virtio::tap::{self, Tap};
use ember_virtio::vsock::Vsock;
use ember_virtio::{VirtioDevice, WorkerGate};
use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::ApiRequests;
use crate::api::model;
use crate::cli::SerialOutput;
use crate::controller::Controller;
use crate::metrics::{FLUSH_INTERVAL, Group, Kind, Snapshot};
use crate::mmds::MmdsBackend;
use crate::resources::VmResources;
use crate::seccomp::{Filters, ThreadKind};
use crate::signals::{self, TerminationSignals};
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
    /// The main thread's seccomp filter could not be installed.
    #[error("Cannot install the seccomp filter of the VMM thread")]
    Seccomp(#[source] crate::seccomp::Error),
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
    /// A snapshot's vCPU state asks for CPU features this host's KVM does not give.
    #[error("The state of vCPU {index} does not fit this host")]
    IncompatibleVcpu {
        /// The vCPU's index.
        index: u8,
        /// The features missing.
        #[source]
        source: ember_vcpu::compat::Error,
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
    /// The serial console's output (a duplicate of stdout, the thread that writes it) cannot be
    /// set up.
    #[error("Cannot set up the serial console's output thread")]
    ConsoleThread(#[source] io::Error),
    /// An eventfd cannot be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// An MMIO range cannot be allocated.
    #[error("Cannot allocate an MMIO range")]
    Allocate(#[source] ember_memory::allocator::Error),
    /// A device cannot be put on a bus.
    #[error("Cannot register the {0} on its bus")]
    Bus(String, #[source] ember_bus::Error),
    /// The description has no kernel.
    #[error("Cannot start microvm without kernel configuration.")]
    NoKernel,
    /// `InstanceStart` came twice.
    #[error("The microVM is already started.")]
    AlreadyStarted,
    /// A drive or interface the request names does not exist.
    #[error("There is no {0} with the ID {1}.")]
    NoSuchDevice(&'static str, String),
    /// A rate limiter cannot be set up.
    #[error("Cannot set up a rate limiter")]
    RateLimiter(#[source] ember_rate_limiter::Error),
    /// A guest MAC address is malformed.
    #[error("Invalid guest MAC address {0}: {1}")]
    Mac(String, String),
    /// A network interface refuses new rate limits.
    #[error("Cannot update network interface {id}")]
    NetUpdate {
        /// The interface's ID.
        id: String,
        /// Why.
        #[source]
        source: ember_virtio::net::Error,
    },
    /// The vsock device cannot be set up: its socket cannot be made at `uds_path` (a path
    /// that exists is refused, as Firecracker refuses it).
    #[error("Cannot create the vsock device")]
    Vsock(#[source] ember_virtio::vsock::Error),
    /// The balloon refuses a change.
    #[error(transparent)]
    Balloon(ember_virtio::balloon::Error),
    /// A balloon request on a VM without one.
    #[error("No balloon device found.")]
    NoBalloon,
    /// The device workers cannot be paused or resumed.
    #[error("Cannot pause or resume the device workers")]
    Pause(#[source] io::Error),
    /// Ctrl+Alt+Del cannot be sent.
    #[error("Cannot send Ctrl+Alt+Del to the guest")]
    CtrlAltDel(#[source] ember_legacy::i8042::Error),
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

/// How a guest that stopped cleanly stopped, or `ember` was told to stop it.
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
    /// `ember` received this termination signal (SIGTERM or SIGINT), before or after boot.
    Signal(i32),
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::I8042Reset => write!(f, "The guest reset the VM through the i8042"),
            GuestExit::Reset => write!(f, "The guest reset its CPUs"),
            GuestExit::Shutdown => write!(f, "The guest powered off"),
            GuestExit::AcpiPowerOff => write!(f, "The guest powered off through ACPI"),
            GuestExit::Signal(signal) => write!(f, "Stopped by {}", signals::name(*signal)),
        }
    }
}

/// The name of the thread that writes the guest's console output to stdout or its file.
pub const CONSOLE_THREAD: &str = "ember_console";

/// How long a stopping VMM lets the console thread write what the guest printed last; a stdout
/// or file that stalls longer loses it, rather than hold up the exit.
pub const CONSOLE_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// The legacy devices the event loop talks to.
struct Legacy {
    /// The console: its output goes to a [`BoundedWriter`] (or nowhere), so that a vCPU never
    /// waits for stdout or a file.
    serial: Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>,
    /// The thread that drains the console's output, when it goes somewhere.
    console: Option<BoundedWriterThread>,
    i8042: Arc<Mutex<I8042Device>>,
    acpi_pm: Arc<Mutex<AcpiPmDevice>>,
    reset_evt: EventFd,
    power_off_evt: EventFd,
}

/// Guest memory: the pages the VMM's devices write are tracked when the microVM tracks dirty
/// pages (for diff snapshots; KVM's dirty log has the guest's own writes).
pub type GuestMemory = TrackedGuestMemory;

/// The VM, over [`GuestMemory`].
type Vm = ember_vcpu::Vm<Option<ember_memory::AtomicBitmap>>;

/// A virtio device's transport, shared with the MMIO bus.
type Transport<D> = Arc<Mutex<MmioTransport<Arc<GuestMemory>, D>>>;
/// A drive's transport, kept to reach the running device.
type BlockTransport = Transport<Block>;
/// A network interface's transport, kept to reach the running device.
type NetTransport = Transport<Net<MmdsBackend<Tap>>>;

/// A booted microVM: its vCPUs run until the guest ends the VM or the VMM stops it.
///
/// Dropping it stops the vCPUs first (their handles join the threads), then the devices and
/// their workers, then the VM.
pub struct Vmm {
    vcpus: Vec<VcpuHandle>,
    devices: VirtioDevices,
    /// The counters of the MMDS network stacks, if an interface has one.
    mmds: Option<Arc<StackMetrics>>,
    legacy: Legacy,
    boot_timer: Option<Arc<Mutex<BootTimer>>>,
    gate: WorkerGate,
    exit: VmExitNotifier,
    paused: bool,
    /// Where the virtio devices are, in the order they were attached.
    slots: Vec<DeviceSlot>,
    /// This host, as a snapshot records it.
    host: snapshot::HostInfo,
    vm: Vm,
    /// Pages dirtied before a snapshot whose files were not written: the next snapshot's
    /// diff holds them too.
    unsaved_dirty: Option<Vec<Vec<u64>>>,
    /// Dropped after the VM: see [`Machine`]'s.
    _userfault: Option<ember_memory::uffd::Userfault>,
}

impl fmt::Debug for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("drives", &self.devices.drives.len())
            .field("nets", &self.devices.nets.len())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

/// The virtio devices of a microVM, each kind in the order attached.
struct VirtioDevices {
    drives: Vec<(String, BlockTransport)>,
    nets: Vec<(String, NetTransport)>,
    /// The entropy device and its counters, if there is one.
    entropy: Option<(Arc<RngMetrics>, Transport<Rng>)>,
    balloon: Option<Transport<Balloon>>,
    /// The vsock device, if there is one: held here so that its socket is removed by the VMM
    /// thread when it stops, not by the last vCPU or the device's worker.
    vsock: Option<Transport<Vsock>>,
}

impl VirtioDevices {
    /// Resets every active device, with `gate` open so that paused workers can end.
    fn stop(&self, gate: &WorkerGate) {
        fn reset<D: VirtioDevice<Arc<GuestMemory>>>(transport: &Transport<D>) {
            let mut transport = lock(transport);
            if transport.is_activated() {
                VirtioDevice::<Arc<GuestMemory>>::reset(transport.device_mut());
            }
        }
        if let Err(err) = gate.resume() {
            warn!("Cannot resume the device workers: {err}");
        }
        self.drives.iter().for_each(|(_, t)| reset(t));
        self.nets.iter().for_each(|(_, t)| reset(t));
        self.entropy.iter().for_each(|(_, t)| reset(t));
        self.balloon.iter().for_each(reset);
        self.vsock.iter().for_each(reset);
    }
}

/// A VM with its memory and devices, before its vCPUs exist: what booting and restoring a
/// snapshot share.
struct Machine {
    vm: Vm,
    /// This host, as a snapshot records it.
    host: snapshot::HostInfo,
    pio: PioBus,
    mmio: MmioBus,
    legacy: Legacy,
    boot_timer: Option<Arc<Mutex<BootTimer>>>,
    gate: WorkerGate,
    devices: VirtioDevices,
    mmds: Option<Arc<StackMetrics>>,
    /// What the kernel command line tells the guest of the virtio devices.
    cmdline: Vec<String>,
    /// Where each virtio device is, in the order they were attached.
    slots: Vec<DeviceSlot>,
    /// The userfaultfd of memory restored through a page-fault handler: kept as long as the
    /// memory, since dropping it tells the handler to stop.
    userfault: Option<ember_memory::uffd::Userfault>,
}

/// Where a virtio device is on the MMIO bus and which interrupt line it raises.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSlot {
    /// The device, in words ("disk rootfs").
    pub name: String,
    /// The guest address of its register page.
    pub addr: u64,
    /// Its interrupt line.
    pub irq: u32,
}

impl Machine {
    /// Creates the VM over `memory` and attaches the devices `resources` describe, the boot
    /// timer first when `boot_timer`, as booting and restoring both lay them out.
    fn build(
        resources: &VmResources,
        memory: Arc<GuestMemory>,
        start: ProcessStart,
        boot_timer: bool,
    ) -> Result<Machine> {
        let machine = resources.machine();
        // Memory is registered before the irqchip exists, which `Vm::new` does in that order.
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let options = VmOptions::new().track_dirty_pages(machine.track_dirty_pages);
        let vm = Vm::new_with(&kvm, memory, options).map_err(Error::Vm)?;
        let host = snapshot::host_info(&kvm);
        check_vcpu_count(machine.vcpu_count, vm.max_vcpus())?;

        let mut pio = PioBus::new();
        let mut mmio = MmioBus::new();
        let mut allocator = ResourceAllocator::with_ranges(
            MMIO32_START..MMIO_DEVICES_END,
            IRQ_BASE..=CMDLINE_DEVICE_IRQ_MAX,
        );
        let legacy = attach_legacy_devices(
            &vm,
            &mut pio,
            &resources.serial,
            resources.serial_max_bytes,
            resources.seccomp.as_ref(),
        )?;
        let boot_timer = if boot_timer {
            Some(attach_boot_timer(&mut mmio, &mut allocator, start)?)
        } else {
            None
        };
        let gate = WorkerGate::new();
        if let Some(filters) = &resources.seccomp {
            gate.set_thread_hook(Some(filters.worker_hook()));
        }
        let mut virtio = VirtioAttacher {
            vm: &vm,
            mmio: &mut mmio,
            allocator: &mut allocator,
            gate: &gate,
            cmdline: Vec::new(),
            slots: Vec::new(),
        };
        let drives = attach_drives(&mut virtio, resources.drives())?;
        let mmds = resources.mmds_config().map(|config| MmdsStacks {
            config,
            store: resources.mmds(),
            metrics: Arc::default(),
        });
        let nets = attach_nets(&mut virtio, resources.nets(), mmds.as_ref())?;
        let mmds = mmds.map(|stacks| stacks.metrics);
        let entropy = attach_entropy(&mut virtio, resources.entropy())?;
        let balloon = match resources.balloon() {
            Some(config) => Some(attach_balloon(&mut virtio, config)?),
            None => None,
        };
        let vsock = attach_vsock(&mut virtio, resources.vsock())?;
        let VirtioAttacher { cmdline, slots, .. } = virtio;
        Ok(Machine {
            vm,
            host,
            pio,
            mmio,
            legacy,
            boot_timer,
            gate,
            devices: VirtioDevices {
                drives,
                nets,
                entropy,
                balloon,
                vsock,
            },
            mmds,
            cmdline,
            slots,
            userfault: None,
        })
    }

    /// Creates `count` vCPUs, lets `setup` load each one's state, and starts them, paused
    /// when `paused`. The caller installs the VMM thread's seccomp filter once it has set
    /// everything up ([`Vmm::install_filter`]).
    fn start(
        self,
        resources: &VmResources,
        count: u8,
        setup: &dyn Fn(&Vcpu) -> Result<()>,
        paused: bool,
    ) -> Result<Vmm> {
        let exit = VmExitNotifier::new().map_err(|source| Error::StartVcpu { index: 0, source })?;
        let seccomp = resources.seccomp.as_ref();
        let vcpus = match start_vcpus(
            &self.vm, count, setup, paused, self.pio, self.mmio, &exit, seccomp,
        ) {
            Ok(vcpus) => vcpus,
            Err(err) => {
                self.devices.stop(&self.gate);
                return Err(err);
            }
        };
        if paused {
            // Device workers that the restored devices started wait for the resume.
            self.gate.pause().map_err(Error::Pause)?;
        }
        Ok(Vmm {
            vcpus,
            devices: self.devices,
            mmds: self.mmds,
            legacy: self.legacy,
            boot_timer: self.boot_timer,
            gate: self.gate,
            exit,
            paused,
            slots: self.slots,
            host: self.host,
            vm: self.vm,
            unsaved_dirty: None,
            _userfault: self.userfault,
        })
    }
}

impl Vmm {
    /// Builds the VM `resources` describe and starts its vCPUs.
    ///
    /// # Errors
    ///
    /// When any part cannot be set up; nothing of it is left running.
    pub fn boot(resources: &VmResources, start: ProcessStart) -> Result<Vmm> {
        let Some(boot_source) = resources.boot_source() else {
            return Err(Error::NoKernel);
        };
        let machine = resources.machine();
        let memory = create_memory(resources)?;
        let built = Machine::build(resources, memory.clone(), start, resources.boot_timer)?;

        // Kernel, initrd, command line, boot parameters.
        let loading = std::time::Instant::now();
        let (cmdline, root) = resources.cmdline();
        let mut cmdline_extra = built.cmdline.clone();
        cmdline_extra.extend(root);
        let boot_state = load_guest(
            boot_source,
            &cmdline,
            &memory,
            &cmdline_extra,
            machine.vcpu_count,
        )?;
        let loaded = loading.elapsed();
        // The bootstrap processor starts where the kernel is entered; the others wait for it.
        let setup = |vcpu: &Vcpu| {
            if vcpu.index() == 0 {
                vcpu.set_boot_state(&boot_state)
                    .map_err(|source| Error::Vcpu { index: 0, source })
            } else {
                Ok(())
            }
        };
        let vmm = built.start(resources, machine.vcpu_count, &setup, false)?;
        let started = start.elapsed();
        Vmm::install_filter(resources)?;
        // The start of a boot timeline: the guest's first instruction follows at once.
        info!(
            "Started {} vCPU(s) with {} MiB of memory, {} us after the process started ({} us of \
             it loading the guest)",
            machine.vcpu_count,
            machine.mem_size_mib,
            started.wall.as_micros(),
            loaded.as_micros()
        );
        Ok(vmm)
    }

    /// Installs the VMM thread's seccomp filter. It comes after the vCPU threads exist, so that
    /// they do not inherit it (filters stack), and after the VMM thread's last setup call; it is
    /// in place before the event loop serves anything the running guest or the API can reach.
    fn install_filter(resources: &VmResources) -> Result<()> {
        match &resources.seccomp {
            Some(filters) => filters.install(ThreadKind::Vmm).map_err(Error::Seccomp),
            None => Ok(()),
        }
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU, then every device worker, each between two of its events: nothing
    /// of the guest runs until [`resume`](Self::resume).
    ///
    /// # Errors
    ///
    /// When a worker cannot be told to pause; the VM is resumed then.
    pub fn pause(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        for vcpu in &self.vcpus {
            vcpu.pause();
        }
        // The vCPUs are out of the guest: no driver can activate a device meanwhile.
        if let Err(err) = self.gate.pause() {
            if let Err(resume) = self.resume_all() {
                warn!("{resume}");
            }
            return Err(Error::Pause(err));
        }
        self.paused = true;
        info!("Paused the VM");
        Ok(())
    }

    /// Lets the devices and the vCPUs go on.
    ///
    /// # Errors
    ///
    /// When a worker cannot be told to resume.
    pub fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        self.paused = false;
        self.resume_all()?;
        info!("Resumed the VM");
        Ok(())
    }

    fn resume_all(&self) -> Result<()> {
        let gate = self.gate.resume().map_err(Error::Pause);
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
        gate
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard (the i8042), which a Linux guest answers
    /// by shutting down cleanly and rebooting.
    ///
    /// # Errors
    ///
    /// When the i8042 cannot take the keys.
    pub fn send_ctrl_alt_del(&self) -> Result<()> {
        lock(&self.legacy.i8042)
            .trigger_ctrl_alt_del()
            .map_err(Error::CtrlAltDel)
    }

    /// `PATCH /drives/{id}` on the running drive: a new backing file, new limits.
    ///
    /// The transport, which the vCPUs take at every access to the device, is never held while
    /// the new file is opened nor while the device's worker makes the change: the file is
    /// opened and checked first, then handed to the device under the lock, and the change is
    /// waited for once the lock is released.
    ///
    /// # Errors
    ///
    /// When there is no such drive, or the device refuses the change (its state is unchanged).
    pub fn update_drive(&self, update: &model::PartialDrive) -> Result<()> {
        let transport = find(&self.devices.drives, "drive", &update.drive_id)?;
        let disk_error = |source| Error::Disk {
            id: update.drive_id.clone(),
            source,
        };
        if let Some(path) = &update.path_on_host {
            let read_only = lock(transport).device().read_only();
            let backend = block::RawFile::open(Path::new(path), read_only).map_err(disk_error)?;
            let pending = lock(transport).device_mut().update_disk(backend);
            pending
                .and_then(block::PendingUpdate::wait)
                .map_err(disk_error)?;
        }
        if let Some(limiter) = &update.rate_limiter {
            let (bandwidth, ops) = bucket_updates(limiter);
            let pending = lock(transport)
                .device_mut()
                .update_rate_limiter(bandwidth, ops);
            pending
                .and_then(block::PendingUpdate::wait)
                .map_err(disk_error)?;
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` on the running interface: new limits.
    ///
    /// # Errors
    ///
    /// When there is no such interface, or the device refuses the change.
    pub fn update_net(&self, update: &model::PartialNetworkInterface) -> Result<()> {
        let transport = find(&self.devices.nets, "network interface", &update.iface_id)?;
        let none = model::RateLimiter::default();
        let (rx_bandwidth, rx_ops) =
            bucket_updates(update.rx_rate_limiter.as_ref().unwrap_or(&none));
        let (tx_bandwidth, tx_ops) =
            bucket_updates(update.tx_rate_limiter.as_ref().unwrap_or(&none));
        // Handed to the worker under the transport's lock, waited for without it.
        let pending = lock(transport).device_mut().update_rate_limiters(
            rx_bandwidth,
            rx_ops,
            tx_bandwidth,
            tx_ops,
        );
        pending
            .and_then(ember_virtio::net::PendingUpdate::wait)
            .map_err(|source| Error::NetUpdate {
                id: update.iface_id.clone(),
                source,
            })
    }

    /// `PATCH /balloon` on the running balloon: a new target, which the driver is told of
    /// with a configuration interrupt.
    ///
    /// # Errors
    ///
    /// When there is no balloon, or it refuses the target.
    pub fn update_balloon(&self, amount_mib: u32) -> Result<()> {
        let transport = self.devices.balloon.as_ref().ok_or(Error::NoBalloon)?;
        lock(transport)
            .device_mut()
            .set_target_mib(amount_mib)
            .map_err(Error::Balloon)
    }

    /// `PATCH /balloon/statistics` on the running balloon: a new polling interval, which
    /// cannot turn statistics on or off.
    ///
    /// # Errors
    ///
    /// When there is no balloon, or it refuses the interval.
    pub fn update_balloon_stats(&self, seconds: u16) -> Result<()> {
        let transport = self.devices.balloon.as_ref().ok_or(Error::NoBalloon)?;
        // Handed to the worker under the transport's lock, waited for without it.
        let pending = lock(transport).device_mut().set_stats_interval(seconds);
        pending
            .and_then(ember_virtio::balloon::PendingUpdate::wait)
            .map_err(Error::Balloon)
    }

    /// `GET /balloon/statistics`: the balloon's sizes and the guest's latest statistics.
    ///
    /// # Errors
    ///
    /// When there is no balloon, or it polls no statistics.
    pub fn balloon_stats(&self) -> Result<BalloonStats> {
        let transport = self.devices.balloon.as_ref().ok_or(Error::NoBalloon)?;
        let transport = lock(transport);
        let balloon = transport.device();
        if !balloon.stats_enabled() {
            return Err(Error::Balloon(ember_virtio::balloon::Error::StatsDisabled));
        }
        Ok(balloon.stats())
    }

    /// What the VM's counters read now.
    pub fn metrics(&self, snapshot: &mut Snapshot) {
        snapshot.push(Group::counters(
            "vcpu",
            None,
            self.vm.vcpu_metrics().values(),
        ));
        if let Some(boot) = self.boot_timer.as_ref().and_then(|t| lock(t).boot_time()) {
            let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            snapshot.push(Group {
                kind: "vmm",
                device: None,
                values: vec![
                    ("boot_time_us", Kind::Gauge, us(boot.wall)),
                    ("boot_cpu_time_us", Kind::Gauge, us(boot.cpu)),
                ],
            });
        }
        let serial = lock(&self.legacy.serial).stats();
        let console = self.legacy.console.as_ref().map(BoundedWriterThread::stats);
        // Without a console thread, what the device wrote went to the sink and was done with.
        let written = console.map_or(serial.bytes_out, |c| c.written);
        let (dropped, errors) = console.map_or((0, 0), |c| (c.dropped(), c.errors));
        snapshot.push(Group::counters(
            "uart",
            None,
            [
                ("write_count", written),
                (
                    "missed_write_count",
                    serial.bytes_lost.saturating_add(dropped),
                ),
                ("read_count", serial.bytes_in),
                (
                    "error_count",
                    serial
                        .interrupt_errors
                        .saturating_add(serial.invalid_accesses)
                        .saturating_add(errors),
                ),
            ],
        ));
        for (id, transport) in &self.devices.drives {
            let values = lock(transport).device().metrics().values();
            snapshot.push(Group::counters("block", Some(id.clone()), values));
        }
        for (id, transport) in &self.devices.nets {
            let values = lock(transport).device().metrics().values();
            snapshot.push(Group::counters("net", Some(id.clone()), values));
        }
        if let Some((entropy, _)) = &self.devices.entropy {
            snapshot.push(Group::counters("entropy", None, entropy.values()));
        }
        if let Some(mmds) = &self.mmds {
            snapshot.push(Group::counters("mmds", None, mmds.values()));
        }
        if let Some(transport) = &self.devices.balloon {
            let values = lock(transport).device().metrics().values();
            snapshot.push(Group::counters("balloon", None, values));
        }
        if let Some(transport) = &self.devices.vsock {
            let values = lock(transport).device().metrics().values();
            snapshot.push(Group::counters("vsock", None, values));
        }
    }

    /// Stops the vCPUs and the devices.
    pub fn stop(mut self) {
        // Paused workers would keep waiting: open the gate for them to stop.
        if let Err(err) = self.resume() {
            warn!("{err}");
        }
        for vcpu in std::mem::take(&mut self.vcpus) {
            if let Err(err) = vcpu.stop() {
                warn!("{err}");
            }
        }
        // The vsock device's worker gives its backend back, which is dropped here, with the
        // device, removing its socket.
        if let Some(transport) = self.devices.vsock.take() {
            VirtioDevice::<Arc<GuestMemory>>::reset(lock(&transport).device_mut());
        }
        if let Some(console) = self.legacy.console.as_mut() {
            if !console.finish(CONSOLE_FLUSH_TIMEOUT) {
                warn!(
                    "The serial console's output did not drain within {} ms; the rest is dropped",
                    CONSOLE_FLUSH_TIMEOUT.as_millis()
                );
            }
            let dropped = console.stats().dropped();
            if dropped > 0 {
                warn!("The serial console dropped {dropped} bytes of the guest's output");
            }
        }
    }
}

/// The device named `id` among `devices`, which are of the `kind` named.
fn find<'a, T>(devices: &'a [(String, T)], kind: &'static str, id: &str) -> Result<&'a T> {
    devices
        .iter()
        .find(|(name, _)| name == id)
        .map(|(_, device)| device)
        .ok_or_else(|| Error::NoSuchDevice(kind, id.to_string()))
}

/// The bucket updates of a limiter in a PATCH: a bucket given replaces the old one (or removes
/// it when it limits nothing), a bucket not given stays.
fn bucket_updates(limiter: &model::RateLimiter) -> (BucketUpdate, BucketUpdate) {
    let update = |bucket: Option<model::TokenBucket>| match bucket {
        Some(bucket) => BucketUpdate::from(bucket_config(bucket)),
        None => BucketUpdate::None,
    };
    (update(limiter.bandwidth), update(limiter.ops))
}

fn bucket_config(bucket: model::TokenBucket) -> BucketConfig {
    BucketConfig {
        size: bucket.size,
        one_time_burst: bucket.one_time_burst.unwrap_or(0),
        refill_time: bucket.refill_time,
    }
}

/// The rate limiter a drive or interface is configured with (unlimited when absent).
fn rate_limiter(limiter: Option<&model::RateLimiter>) -> Result<RateLimiter> {
    let limiter = limiter.copied().unwrap_or_default();
    RateLimiter::new(
        limiter.bandwidth.map(bucket_config),
        limiter.ops.map(bucket_config),
    )
    .map_err(Error::RateLimiter)
}

fn create_memory(resources: &VmResources) -> Result<Arc<GuestMemory>> {
    let machine = resources.machine();
    let memory_error = |source| Error::Memory {
        mib: machine.mem_size_mib,
        source,
    };
    let size = ember_memory::mem_size_from_mib(machine.mem_size_mib).map_err(memory_error)?;
    let mut options = MemoryOptions::default();
    options.ksm = resources.ksm;
    options.hugepages = machine.huge_pages == model::HugePages::Transparent;
    options.include_in_core_dumps = resources.dump_guest_memory;
    let memory =
        ember_memory::create_tracked_guest_memory(size, options, machine.track_dirty_pages)
            .map_err(memory_error)?;
    Ok(Arc::new(memory))
}

fn check_vcpu_count(requested: u8, kvm_max: usize) -> Result<()> {
    let max = kvm_max.min(usize::from(ember_boot::mptable::MAX_VCPUS));
    if requested == 0 || usize::from(requested) > max {
        return Err(Error::VcpuCount { requested, max });
    }
    Ok(())
}

/// Where the guest's console output goes: a [`BoundedWriter`] and its thread in front of stdout
/// or the file (capped at `max_bytes` when it is a regular file, 0 for no cap), under the
/// `console` seccomp filter when there are filters; or nowhere.
fn console_output(
    serial: &SerialOutput,
    max_bytes: u64,
    seccomp: Option<&Arc<Filters>>,
) -> Result<(Box<dyn Write + Send>, Option<BoundedWriterThread>)> {
    let (out, max_bytes) = match serial {
        SerialOutput::Stdio => {
            // A duplicate of stdout, written without std's lock and line buffer: the thread
            // allocates nothing, and nothing else that prints waits for it.
            let stdout = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(Error::ConsoleThread)?;
            (SerialOut::File(File::from(stdout)), None)
        }
        SerialOutput::File(path) => {
            let out = SerialOut::file(path).map_err(Error::Serial)?;
            let max_bytes = match (max_bytes, out.regular_file_len()) {
                (0, _) | (_, None) => None,
                (max, Some(len)) => Some(max.saturating_sub(len)),
            };
            (out, max_bytes)
        }
        SerialOutput::None => return Ok((Box::new(io::sink()), None)),
    };
    let mut config = bounded_writer::Config::default();
    config.max_bytes = max_bytes;
    let hook = seccomp.map(|filters| filters.thread_hook(ThreadKind::Console));
    let (writer, thread) = BoundedWriter::spawn_with(CONSOLE_THREAD, out, config, move || {
        hook.map_or(Ok(()), |hook| hook())
    })
    .map_err(Error::ConsoleThread)?;
    Ok((Box::new(writer), Some(thread)))
}

/// COM1 on IRQ 4, the i8042 on IRQ 1 and the ACPI PM registers, on the port bus.
fn attach_legacy_devices(
    vm: &Vm,
    pio: &mut PioBus,
    serial: &SerialOutput,
    serial_max_bytes: u64,
    seccomp: Option<&Arc<Filters>>,
) -> Result<Legacy> {
    let (out, console) = console_output(serial, serial_max_bytes, seccomp)?;
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
    pio.insert(range, i8042.clone())
        .map_err(|e| Error::Bus("i8042".into(), e))?;

    let power_off = EventFdTrigger::new().map_err(Error::EventFd)?;
    let power_off_evt = power_off.eventfd().try_clone().map_err(Error::EventFd)?;
    let pm = Arc::new(Mutex::new(AcpiPmDevice::new(power_off, S5_SLEEP_TYPE)));
    let range = BusRange::new(u64::from(ACPI_PM1_EVT_PORT), ACPI_PM_LEN)
        .map_err(|e| Error::Bus("ACPI PM registers".into(), e))?;
    pio.insert(range, pm.clone())
        .map_err(|e| Error::Bus("ACPI PM registers".into(), e))?;

    Ok(Legacy {
        serial,
        console,
        i8042,
        acpi_pm: pm,
        reset_evt,
        power_off_evt,
    })
}

/// The boot timer takes the first MMIO range, which the guest's init knows (0xd0000000).
fn attach_boot_timer(
    mmio: &mut MmioBus,
    allocator: &mut ResourceAllocator,
    start: ProcessStart,
) -> Result<Arc<Mutex<BootTimer>>> {
    let addr = allocator
        .allocate_mmio(BOOT_TIMER_LEN)
        .map_err(Error::Allocate)?;
    let range =
        BusRange::new(addr.0, BOOT_TIMER_LEN).map_err(|e| Error::Bus("boot timer".into(), e))?;
    let timer = Arc::new(Mutex::new(BootTimer::from_process_start(start)));
    mmio.insert(range, timer.clone())
        .map_err(|e| Error::Bus("boot timer".into(), e))?;
    debug!("Boot timer at {:#x}", addr.0);
    Ok(timer)
}

/// Puts virtio devices on the MMIO bus, each with a page of MMIO, an interrupt line, an irqfd
/// and one ioeventfd per queue, and collects the command line that tells the guest where they
/// are.
struct VirtioAttacher<'a> {
    vm: &'a Vm,
    mmio: &'a mut MmioBus,
    allocator: &'a mut ResourceAllocator,
    gate: &'a WorkerGate,
    cmdline: Vec<String>,
    slots: Vec<DeviceSlot>,
}

impl VirtioAttacher<'_> {
    fn attach<D: VirtioDevice<Arc<GuestMemory>> + 'static>(
        &mut self,
        name: String,
        device: D,
    ) -> Result<Transport<D>> {
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
        let transport = MmioTransport::new(
            self.vm.memory().clone(),
            Box::new(device),
            irq_evt,
            self.gate.clone(),
        )
        .map_err(|e| Error::Transport(name.clone(), e))?;
        let notify = IoEventAddress::Mmio(addr.0 + QUEUE_NOTIFY_OFFSET);
        for (index, evt) in (0u32..).zip(transport.queue_evts()) {
            self.vm
                .register_ioevent(evt, notify, index)
                .map_err(|e| Error::Ioevent(name.clone(), e))?;
        }
        let range = BusRange::new(addr.0, MMIO_SIZE).map_err(|e| Error::Bus(name.clone(), e))?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(range, transport.clone())
            .map_err(|e| Error::Bus(name.clone(), e))?;
        debug!("{name} at {:#x}, IRQ {irq}", addr.0);
        self.cmdline.push(cmdline_device(addr, irq));
        self.slots.push(DeviceSlot {
            name,
            addr: addr.0,
            irq,
        });
        Ok(transport)
    }
}

/// The drives, in order: the first is `/dev/vda`.
fn attach_drives(
    virtio: &mut VirtioAttacher<'_>,
    drives: &[model::Drive],
) -> Result<Vec<(String, BlockTransport)>> {
    let mut attached = Vec::with_capacity(drives.len());
    for drive in drives {
        let id = drive.drive_id.clone();
        let disk_error = |source| Error::Disk {
            id: id.clone(),
            source,
        };
        let path = drive.path_on_host.as_deref().unwrap_or_default();
        let backend =
            block::RawFile::open(Path::new(path), drive.read_only()).map_err(disk_error)?;
        let config = block::Config::new(serial_of(&id))
            .with_read_only(drive.read_only())
            .with_rate_limiter(rate_limiter(drive.rate_limiter.as_ref())?)
            .with_io_engine(io_engine(drive.io_engine));
        let block = Block::new(backend, config).map_err(disk_error)?;
        let transport = virtio.attach(format!("disk {id}"), block)?;
        attached.push((id, transport));
    }
    Ok(attached)
}

/// The block device's engine for a drive's `io_engine`: with `Async`, [`Block::new`] sets up
/// its io_uring, here, before the seccomp filters are installed, so that the threads that serve
/// the drive only need `io_uring_enter`.
fn io_engine(io_engine: model::IoEngine) -> block::IoEngine {
    match io_engine {
        model::IoEngine::Sync => block::IoEngine::Sync,
        model::IoEngine::Async => block::IoEngine::Async,
    }
}

/// The serial number a drive's guest reads (virtio-blk GET_ID): its ID when it fits in the 20
/// bytes of the field, else none, rather than a cut that two drives could share.
fn serial_of(id: &str) -> String {
    if id.len() <= block::ID_BYTES {
        id.to_string()
    } else {
        String::new()
    }
}

/// What the interfaces `mmds-config` lists get: the MMDS network stack in front of their TAP,
/// answering for its address from the store, all counting into `metrics`.
struct MmdsStacks<'a> {
    config: &'a model::MmdsConfig,
    store: &'a Arc<Mutex<Mmds>>,
    metrics: Arc<StackMetrics>,
}

impl MmdsStacks<'_> {
    /// The backend of the interface `id` over `tap`: with the stack if the interface is listed.
    fn backend<B>(&self, id: &str, tap: B) -> MmdsBackend<B> {
        if !self
            .config
            .network_interfaces
            .iter()
            .any(|listed| listed == id)
        {
            return MmdsBackend::new(tap);
        }
        let address = self
            .config
            .ipv4_address
            .unwrap_or(model::DEFAULT_MMDS_ADDRESS);
        let handler = Box::new(MmdsHandler::new(self.store.clone()));
        let stack = crate::mmds::stack(address, handler, self.metrics.clone());
        MmdsBackend::with_stack(tap, stack)
    }
}

fn attach_nets(
    virtio: &mut VirtioAttacher<'_>,
    nets: &[model::NetworkInterface],
    mmds: Option<&MmdsStacks<'_>>,
) -> Result<Vec<(String, NetTransport)>> {
    let mut attached = Vec::with_capacity(nets.len());
    for net in nets {
        let tap = Tap::open(&net.host_dev_name).map_err(|source| Error::Tap {
            name: net.host_dev_name.clone(),
            source,
        })?;
        let mac = match &net.guest_mac {
            Some(text) => Some(
                text.parse::<MacAddr>()
                    .map_err(|e| Error::Mac(text.clone(), e.to_string()))?,
            ),
            None => None,
        };
        let backend = match mmds {
            Some(mmds) => mmds.backend(&net.iface_id, tap),
            None => MmdsBackend::new(tap),
        };
        let device = Net::new(backend, mac).with_rate_limiters(
            rate_limiter(net.rx_rate_limiter.as_ref())?,
            rate_limiter(net.tx_rate_limiter.as_ref())?,
        );
        let transport = virtio.attach(format!("network interface {}", net.iface_id), device)?;
        attached.push((net.iface_id.clone(), transport));
    }
    Ok(attached)
}

/// The entropy device, if the description has one, with its counters.
fn attach_entropy(
    virtio: &mut VirtioAttacher<'_>,
    entropy: Option<&model::EntropyDeviceConfig>,
) -> Result<Option<(Arc<RngMetrics>, Transport<Rng>)>> {
    let Some(entropy) = entropy else {
        return Ok(None);
    };
    let device = Rng::new(rate_limiter(entropy.rate_limiter.as_ref())?);
    let metrics = device.metrics().clone();
    let transport = virtio.attach("entropy device".to_string(), device)?;
    Ok(Some((metrics, transport)))
}

/// The balloon device.
fn attach_balloon(
    virtio: &mut VirtioAttacher<'_>,
    config: &model::Balloon,
) -> Result<Transport<Balloon>> {
    let device = Balloon::new(BalloonConfig::new(
        config.amount_mib,
        config.deflate_on_oom,
        config.stats_polling_interval_s,
    ))
    .map_err(Error::Balloon)?;
    virtio.attach("balloon".to_string(), device)
}

/// The vsock device, if the description has one. Its socket is made at `uds_path` now, and
/// removed with the device.
fn attach_vsock(
    virtio: &mut VirtioAttacher<'_>,
    vsock: Option<&model::VsockConfig>,
) -> Result<Option<Transport<Vsock>>> {
    let Some(vsock) = vsock else {
        return Ok(None);
    };
    let device = Vsock::new(u64::from(vsock.guest_cid), &vsock.uds_path).map_err(Error::Vsock)?;
    virtio.attach("vsock device".to_string(), device).map(Some)
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The boot configuration of ember's guests with `vcpus` vCPUs: ember-boot's default layout
/// (everything below 1 MiB) on the platform of ember-memory's address map, its MMIO gap, APICs,
/// I/O APIC lines and ACPI PM ports and SCI.
pub fn boot_config(vcpus: u8) -> BootConfig {
    let platform = Platform::new(
        IOAPIC_START,
        LAPIC_START,
        IOAPIC_PINS,
        MMIO32_START..FIRST_ADDR_PAST_32BITS,
        AcpiPm::new(ACPI_PM1_EVT_PORT, ACPI_PM1_CNT_PORT, ACPI_SCI_IRQ),
    );
    BootConfig::new(platform, vcpus)
}

/// Loads kernel and initrd, writes the command line and boot tables; returns the boot vCPU's
/// initial state.
fn load_guest(
    boot_source: &model::BootSource,
    cmdline: &str,
    memory: &GuestMemory,
    cmdline_extra: &[String],
    vcpus: u8,
) -> Result<CpuState> {
    let kernel_path = PathBuf::from(&boot_source.kernel_image_path);
    let kernel =
        load_kernel(memory, &mut open("kernel image", &kernel_path)?).map_err(|source| {
            Error::Kernel {
                path: kernel_path.clone(),
                source,
            }
        })?;
    debug!(
        "Kernel {:?} entered at {:#x}",
        kernel.format, kernel.entry.0
    );
    let config = boot_config(vcpus);
    let initrd = match &boot_source.initrd_path {
        Some(path) => {
            let path = PathBuf::from(path);
            Some(
                load_initrd(memory, &mut open("initrd", &path)?, &kernel, &config)
                    .map_err(|source| Error::Initrd { path, source })?,
            )
        }
        None => None,
    };
    let extra: Vec<&str> = cmdline_extra.iter().map(String::as_str).collect();
    let cmdline = build_cmdline(cmdline, &extra).map_err(Error::Cmdline)?;
    configure_system(memory, &kernel, &cmdline, initrd, &config).map_err(Error::Boot)
}

/// Creates `count` vCPUs, each set up by `setup`, on threads that start paused when `paused`.
#[allow(clippy::too_many_arguments)]
fn start_vcpus(
    vm: &Vm,
    count: u8,
    setup: &dyn Fn(&Vcpu) -> Result<()>,
    paused: bool,
    pio: PioBus,
    mmio: MmioBus,
    exit: &VmExitNotifier,
    seccomp: Option<&Arc<Filters>>,
) -> Result<Vec<VcpuHandle>> {
    // One handler for all vCPUs: accesses that hit no device read zeros and are logged sparsely.
    let handler = Arc::new(BusExitHandler::new(Arc::new(pio), Arc::new(mmio)));
    let mut handles = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let vcpu = Vcpu::new(vm, index, count, handler.clone())
            .map_err(|source| Error::Vcpu { index, source })?;
        setup(&vcpu)?;
        let mut options = StartOptions::new().paused(paused);
        if let Some(filters) = seccomp {
            options = options.hook(filters.thread_hook(ThreadKind::Vcpu));
        }
        let handle = vcpu
            .start_with(exit.clone(), options)
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
const TOKEN_API: u64 = 5;
const TOKEN_METRICS: u64 = 6;
const TOKEN_SIGNAL: u64 = 7;

/// What the event loop serves besides the VM: the API and the metrics.
#[derive(Debug)]
pub struct Control<'a> {
    /// The requests of the API server, when there is one.
    pub api: Option<&'a ApiRequests>,
    /// Answers them, and owns the VM description and the metrics.
    pub controller: &'a mut Controller,
    /// SIGTERM and SIGINT, which end the loop with [`GuestExit::Signal`], when watched.
    pub signals: Option<&'a TerminationSignals>,
}

/// Runs the VMM: boots at once when `boot` (flags or a configuration file), or when the API
/// asks, then waits for the guest to end the VM, feeding stdin to the serial console and
/// serving the API meanwhile.
///
/// One epoll loop serves it all. Before the VM starts it watches the API, the termination
/// signals and the metrics timer; once the VM has started, the guest's events join them (the
/// i8042 reset, the ACPI power-off, the vCPUs' exit, the serial console and stdin).
///
/// Stdin is watched only while the serial receive FIFO has room and the VM runs: when it is
/// full, stdin leaves the epoll set until the guest drains the FIFO, so a fast producer neither
/// spins the loop nor grows a buffer.
pub fn run(control: Control<'_>, boot: bool, start: ProcessStart) -> Result<GuestExit> {
    let Control {
        api,
        controller,
        signals,
    } = control;
    let epoll = Epoll::new().map_err(Error::EventLoop)?;
    if let Some(api) = api {
        watch(&epoll, api.as_raw_fd(), TOKEN_API).map_err(Error::EventLoop)?;
    }
    if let Some(signals) = signals {
        watch(&epoll, signals.as_raw_fd(), TOKEN_SIGNAL).map_err(Error::EventLoop)?;
    }
    let stop_signal = || {
        signals
            .and_then(TerminationSignals::read)
            .map(GuestExit::Signal)
    };
    let timer_error = |e: vmm_sys_util::errno::Error| Error::EventLoop(e.into());
    let mut metrics_timer = TimerFd::new().map_err(timer_error)?;
    metrics_timer
        .reset(FLUSH_INTERVAL, Some(FLUSH_INTERVAL))
        .map_err(timer_error)?;
    watch(&epoll, metrics_timer.as_raw_fd(), TOKEN_METRICS).map_err(Error::EventLoop)?;

    if boot {
        controller.start_instance(start)?;
    }
    // The guest's events, watched from the first turn of the loop that finds the VM started.
    let mut guest: Option<GuestEvents> = None;
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        if guest.is_none() {
            if let Some(vmm) = controller.vmm() {
                let stdio = matches!(controller.resources().serial, SerialOutput::Stdio);
                guest = Some(GuestEvents::watch(&epoll, vmm, stdio)?);
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Error::EventLoop(err)),
        };
        for event in events.iter().take(n) {
            match event.data() {
                TOKEN_SIGNAL => {
                    if let Some(exit) = stop_signal() {
                        return Ok(exit);
                    }
                }
                TOKEN_API => {
                    if let Some(api) = api {
                        serve_api(api, controller, start);
                    }
                    // A paused VM takes no input; a resumed one takes it again.
                    if let Some(guest) = guest.as_mut() {
                        if controller.vmm().is_some_and(Vmm::is_paused) {
                            guest.unwatch_stdin(&epoll)?;
                        } else {
                            guest.rewatch_stdin(&epoll);
                        }
                    }
                }
                TOKEN_METRICS => {
                    let _ = metrics_timer.wait();
                    controller.flush_metrics_quietly();
                }
                TOKEN_RESET => return Ok(GuestExit::I8042Reset),
                TOKEN_POWER_OFF => return Ok(GuestExit::AcpiPowerOff),
                TOKEN_VM_EXIT => {
                    let exit = guest.as_ref().and_then(|guest| guest.exit.exit());
                    return match exit {
                        Some(VmExit::Reset) => Ok(GuestExit::Reset),
                        Some(VmExit::Shutdown) => Ok(GuestExit::Shutdown),
                        Some(VmExit::Error(err)) => Err(Error::Guest(err)),
                        Some(other) => Err(Error::Guest(other.to_string())),
                        None => continue,
                    };
                }
                TOKEN_SERIAL_READY => {
                    let paused = controller.vmm().is_some_and(Vmm::is_paused);
                    if let Some(guest) = guest.as_mut() {
                        // Clearing a non-blocking eventfd that another event already cleared
                        // is fine.
                        let _ = guest.serial_ready.read();
                        if !paused {
                            guest.rewatch_stdin(&epoll);
                        }
                    }
                }
                TOKEN_STDIN => {
                    if let Some(guest) = guest.as_mut() {
                        guest.feed_stdin(&epoll)?;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Adds `fd` to the epoll set, reported with `token` when readable.
fn watch(epoll: &Epoll, fd: i32, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// Standard input, read straight from its descriptor. The standard library's `Stdin` reads
/// ahead into a buffer of its own (8 KiB), where epoll does not see the bytes the serial console
/// had no room for: they would wait there for the next input.
struct StdinFd;

impl io::Read for StdinFd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length for the duration of the call.
        let read = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(read).map_err(|_| io::Error::last_os_error())
    }
}

/// The part of the event loop that exists once the VM has started: what it needs of the VM to
/// answer the guest's events, and the state of stdin.
struct GuestEvents {
    serial: Arc<Mutex<SerialDevice<Box<dyn Write + Send>>>>,
    exit: VmExitNotifier,
    /// Signalled when the serial receive FIFO has room again.
    serial_ready: EventFd,
    /// Whether stdin is in the epoll set.
    stdin_watched: bool,
    /// Whether stdin may still give input: it is the console's and has not ended.
    stdin_open: bool,
    /// Keeps a terminal stdin in raw mode until the loop ends.
    _raw: Option<RawStdin>,
}

impl GuestEvents {
    /// Adds the guest's events to the epoll set, and stdin when the console is on stdio (in
    /// raw mode if it is a terminal) and the VM is not paused.
    fn watch(epoll: &Epoll, vmm: &Vmm, stdio: bool) -> Result<Self> {
        let legacy = &vmm.legacy;
        for (fd, token) in [
            (legacy.reset_evt.as_raw_fd(), TOKEN_RESET),
            (legacy.power_off_evt.as_raw_fd(), TOKEN_POWER_OFF),
            (vmm.exit.event_fd().as_raw_fd(), TOKEN_VM_EXIT),
        ] {
            watch(epoll, fd, token).map_err(Error::EventLoop)?;
        }
        let serial_ready = lock(&legacy.serial)
            .input_ready_evt()
            .try_clone()
            .map_err(Error::EventFd)?;
        watch(epoll, serial_ready.as_raw_fd(), TOKEN_SERIAL_READY).map_err(Error::EventLoop)?;
        let raw = if stdio {
            Some(RawStdin::enable().map_err(Error::Terminal)?)
        } else {
            None
        };
        // Regular files and /dev/null cannot be watched with epoll; such a stdin gives no input.
        let stdin_watched = stdio && watch(epoll, libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
        let mut guest = GuestEvents {
            serial: legacy.serial.clone(),
            exit: vmm.exit.clone(),
            serial_ready,
            stdin_watched,
            stdin_open: stdin_watched,
            _raw: raw,
        };
        if vmm.is_paused() {
            guest.unwatch_stdin(epoll)?;
        }
        Ok(guest)
    }

    /// Watches stdin again, if it is still open and not watched.
    fn rewatch_stdin(&mut self, epoll: &Epoll) {
        if self.stdin_open && !self.stdin_watched {
            self.stdin_watched = watch(epoll, libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
        }
    }

    /// Stops watching stdin, if it is watched.
    fn unwatch_stdin(&mut self, epoll: &Epoll) -> Result<()> {
        if self.stdin_watched {
            epoll
                .ctl(
                    ControlOperation::Delete,
                    libc::STDIN_FILENO,
                    EpollEvent::default(),
                )
                .map_err(Error::EventLoop)?;
            self.stdin_watched = false;
        }
        Ok(())
    }

    /// Feeds what stdin holds to the serial console; stops watching stdin when it ends, fails,
    /// or the receive FIFO is full.
    fn feed_stdin(&mut self, epoll: &Epoll) -> Result<()> {
        let outcome = lock(&self.serial).feed_from(&mut StdinFd);
        let stop_watching = match outcome {
            Ok(outcome) if outcome.eof => {
                self.stdin_open = false;
                true
            }
            Ok(outcome) => outcome.full,
            Err(err) => {
                warn!("Serial input stopped: {err}");
                self.stdin_open = false;
                true
            }
        };
        if stop_watching {
            self.unwatch_stdin(epoll)?;
        }
        Ok(())
    }
}

/// Answers every API request waiting.
fn serve_api(api: &ApiRequests, controller: &mut Controller, start: ProcessStart) {
    while let Some((request, responder)) = api.try_recv() {
        responder.send(controller.handle(request, start));
    }
}

/// Locks a device, going on with its state if a vCPU thread panicked while holding it.
fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_interfaces_mmds_config_lists_get_the_stack_at_its_address() {
        let config = model::MmdsConfig {
            version: ember_mmds::MmdsVersion::V1,
            network_interfaces: vec!["eth1".to_string()],
            ipv4_address: Some(std::net::Ipv4Addr::new(169, 254, 170, 2)),
            imds_compat: false,
        };
        let store = Arc::new(Mutex::new(Mmds::new(1024)));
        let stacks = MmdsStacks {
            config: &config,
            store: &store,
            metrics: Arc::default(),
        };
        assert!(stacks.backend("eth0", ()).stack().is_none());
        let listed = stacks.backend("eth1", ());
        let stack = listed.stack().expect("eth1 is listed");
        assert_eq!(stack.ipv4(), std::net::Ipv4Addr::new(169, 254, 170, 2));
        assert_eq!(stack.mac(), crate::mmds::MMDS_MAC);
        assert!(Arc::ptr_eq(stack.metrics(), &stacks.metrics));

        let default = model::MmdsConfig {
            ipv4_address: None,
            ..config.clone()
        };
        let stacks = MmdsStacks {
            config: &default,
            ..stacks
        };
        let listed = stacks.backend("eth1", ());
        assert_eq!(listed.stack().unwrap().ipv4(), model::DEFAULT_MMDS_ADDRESS);
    }

    /// FNV-1a, enough to tell whether bytes changed.
    fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn boot_config_gives_the_guest_the_tables_it_always_had() {
        use ember_boot::test_utils::{tiny_bzimage, tiny_elf, tiny_pvh_elf};
        use ember_memory::{Bytes, GuestAddress, create_guest_memory, mem_size_from_mib};
        use std::io::Cursor;

        // (image, memory, vCPUs, initrd address, hash of the first MiB, hash of the vCPU
        // state), as ember wrote them when the boot crate had ember's platform built in.
        let cases = [
            (
                tiny_elf(&[0xf4]),
                64,
                2,
                0x3ffe000,
                0xac31_5f0e_ddef_d57b,
                0xb7f0_3de2_996d_9893,
            ),
            (
                tiny_pvh_elf(&[0xf4]),
                64,
                254,
                0x3ffe000,
                0x9eb0_3791_0ea2_8334,
                0x0144_67b7_6b31_d167,
            ),
            (
                tiny_bzimage(&[0xf4]),
                0xd00 + 16,
                2,
                0x7fffe000,
                0xb3c0_ec0d_27de_31e7,
                0x0b59_c3fb_4679_7d22,
            ),
        ];
        for (image, mib, vcpus, initrd_addr, low_hash, cpu_hash) in cases {
            let size = mem_size_from_mib(mib).unwrap();
            let mem = create_guest_memory(size, MemoryOptions::default()).unwrap();
            let config = boot_config(vcpus);
            let kernel = load_kernel(&mem, &mut Cursor::new(image)).unwrap();
            let initrd = vec![0x55u8; 5000];
            let initrd = load_initrd(&mem, &mut Cursor::new(initrd), &kernel, &config).unwrap();
            let cmdline = build_cmdline("console=ttyS0 reboot=k panic=1", &[]).unwrap();
            let cpu = configure_system(&mem, &kernel, &cmdline, Some(initrd), &config).unwrap();
            let mut low = vec![0u8; 1 << 20];
            mem.read_slice(&mut low, GuestAddress(0)).unwrap();
            assert_eq!(initrd.addr.0, initrd_addr, "{mib} MiB, {vcpus} vCPUs");
            assert_eq!(fnv(&low), low_hash, "{mib} MiB, {vcpus} vCPUs");
            assert_eq!(fnv(format!("{cpu:?}").as_bytes()), cpu_hash);
        }
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

    #[test]
    fn a_drive_s_io_engine_chooses_the_block_device_s_engine() {
        assert_eq!(io_engine(model::IoEngine::Sync), block::IoEngine::Sync);
        assert_eq!(io_engine(model::IoEngine::Async), block::IoEngine::Async);
        assert_eq!(io_engine(Default::default()), block::IoEngine::Sync);
    }

    #[test]
    fn a_drive_id_is_its_serial_when_it_fits() {
        assert_eq!(serial_of("rootfs"), "rootfs");
        assert_eq!(serial_of(&"a".repeat(20)), "a".repeat(20));
        assert_eq!(serial_of(&"a".repeat(21)), "");
    }

    #[test]
    fn a_patch_replaces_the_buckets_it_gives_and_keeps_the_others() {
        let bucket = |size| model::TokenBucket {
            size,
            one_time_burst: Some(5),
            refill_time: 100,
        };
        let (bandwidth, ops) = bucket_updates(&model::RateLimiter {
            bandwidth: Some(bucket(1000)),
            ops: None,
        });
        assert!(matches!(&bandwidth, BucketUpdate::Update(b) if b.size() == 1000));
        assert_eq!(ops, BucketUpdate::None);
        let (bandwidth, _) = bucket_updates(&model::RateLimiter {
            bandwidth: Some(bucket(0)),
            ops: None,
        });
        assert_eq!(bandwidth, BucketUpdate::Disabled);
    }
}
