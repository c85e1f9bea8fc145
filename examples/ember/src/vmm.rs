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
use ember_memory::layout::{ACPI_PM1_EVT_PORT, I8042_IRQ, SERIAL_IRQ};
use ember_memory::{GuestMemoryMmap, MemoryOptions, ResourceAllocator};
use ember_vcpu::{Kvm, Vcpu, VcpuHandle, Vm, VmExit, VmExitNotifier};
use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{Cli, SerialOutput};
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
    Bus(&'static str, #[source] ember_bus::Error),
    /// An interrupt line cannot be connected.
    #[error("Cannot connect the {0} to its interrupt line")]
    Irq(&'static str, #[source] ember_vcpu::vm::Error),
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
    let mut allocator = ResourceAllocator::new();
    let legacy = attach_legacy_devices(&vm, &mut pio, &cli.serial)?;
    if cli.boot_timer {
        attach_boot_timer(&mut mmio, &mut allocator, start)?;
    }

    // Kernel, initrd, command line, boot parameters.
    let boot_state = load_guest(cli, &memory)?;

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
        .map_err(|e| Error::Irq("serial console", e))?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, out).map_err(Error::Serial)?,
    ));
    let range =
        BusRange::new(COM1_PORT, SERIAL_PORT_LEN).map_err(|e| Error::Bus("serial console", e))?;
    pio.insert(range, serial.clone())
        .map_err(|e| Error::Bus("serial console", e))?;

    let reset = EventFdTrigger::new().map_err(Error::EventFd)?;
    let reset_evt = reset.eventfd().try_clone().map_err(Error::EventFd)?;
    let kbd_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
    vm.register_irqfd(kbd_irq.eventfd(), I8042_IRQ)
        .map_err(|e| Error::Irq("i8042", e))?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(reset, kbd_irq)));
    let range = BusRange::new(I8042_PORT, I8042_PORT_LEN).map_err(|e| Error::Bus("i8042", e))?;
    pio.insert(range, i8042)
        .map_err(|e| Error::Bus("i8042", e))?;

    let power_off = EventFdTrigger::new().map_err(Error::EventFd)?;
    let power_off_evt = power_off.eventfd().try_clone().map_err(Error::EventFd)?;
    let pm = Arc::new(Mutex::new(AcpiPmDevice::new(power_off, S5_SLEEP_TYPE)));
    let range = BusRange::new(ACPI_PM1_EVT_PORT, ACPI_PM_LEN)
        .map_err(|e| Error::Bus("ACPI PM registers", e))?;
    pio.insert(range, pm)
        .map_err(|e| Error::Bus("ACPI PM registers", e))?;

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
    let range = BusRange::new(addr.0, BOOT_TIMER_LEN).map_err(|e| Error::Bus("boot timer", e))?;
    mmio.insert(range, Arc::new(Mutex::new(BootTimer::new(start))))
        .map_err(|e| Error::Bus("boot timer", e))?;
    debug!("Boot timer at {:#x}", addr.0);
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
fn load_guest(cli: &Cli, memory: &GuestMemoryMmap) -> Result<CpuState> {
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
    let cmdline = build_cmdline(&cli.cmdline, &[]).map_err(Error::Cmdline)?;
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
