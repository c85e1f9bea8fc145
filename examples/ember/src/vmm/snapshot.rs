//! Snapshots of a paused microVM, and microVMs restored from them in a new process.
//!
//! A snapshot is two files:
//!
//! - the **state file** (`snapshot_path`): an [`ember_snapshot`] file of format
//!   [`FORMAT_VERSION`] holding a [`MicrovmState`]: where and on what it was taken (ember's
//!   version, the host CPU, the KVM capabilities it relied on), the microVM's description (the
//!   JSON of `GET /vm/config`), the VM's and every vCPU's KVM state, and every device's state;
//! - the **memory file** (`mem_file_path`): guest memory, region after region from offset 0,
//!   all-zero pages left as holes (see `ember_memory::file`). A diff snapshot's memory file has
//!   only the pages written since the previous snapshot, at their offsets, and holes elsewhere:
//!   `ember-snapshot-merge` or [`ember_memory::merge_diff`] copies it onto the full one.
//!
//! A restore reads and checks the whole state file before anything is built (version,
//! checksum, host compatibility), maps the memory file private (pages are read when the guest
//! first touches them, and clones of one snapshot share what they have not written), builds
//! the devices as the description says, checks that they land where the snapshot's were,
//! creates the vCPUs with their state, paused, then loads the interrupt controllers' and every
//! device's state (so that what a device raises again reaches a vCPU); `resume_vm` resumes it.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_legacy::{AcpiPmState, I8042State, ProcessStart, SerialState};
use ember_memory::uffd::Userfault;
use ember_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryOptions};
use ember_vcpu::compat::HostCpu;
use ember_vcpu::vcpu::VcpuState;
use ember_vcpu::vm::VmState;
use ember_virtio::StateError;
use ember_virtio::balloon::BalloonState;
use ember_virtio::block::BlockState;
use ember_virtio::mmio::MmioState;
use ember_virtio::net::NetState;
use ember_virtio::rng::RngState;
use ember_virtio::vsock::VsockState;
use serde::{Deserialize, Serialize};

use ember_virtio::balloon::Balloon;
use ember_virtio::block::Block;
use ember_virtio::net::Net;
use ember_virtio::rng::Rng;
use ember_virtio::vsock::Vsock;

use super::{DeviceSlot, GuestMemory, Machine, Vmm, lock};
use crate::api::model::{
    MemoryBackendType, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
};
use crate::metrics::{Group, Kind};
use crate::resources::VmResources;

/// The version of [`MicrovmState`]'s shape. It changes whenever that shape does: a snapshot
/// of another version is refused, as the state it holds would not decode as this one.
pub const FORMAT_VERSION: u32 = 1;

/// Why a snapshot cannot be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The microVM runs.
    #[error("The microVM must be paused before a snapshot is created (PATCH /vm).")]
    NotPaused,
    /// A diff snapshot of a VM that does not track dirty pages.
    #[error("A diff snapshot needs dirty page tracking (track_dirty_pages) on the microVM.")]
    DiffWithoutTracking,
    /// A vCPU's state cannot be read.
    #[error("Cannot save the state of vCPU {index}")]
    SaveVcpu {
        /// The vCPU.
        index: u8,
        /// Why.
        #[source]
        source: ember_vcpu::runner::Error,
    },
    /// The VM's state cannot be read.
    #[error("Cannot save the VM's state")]
    SaveVm(#[source] ember_vcpu::vm::Error),
    /// A device's state cannot be read.
    #[error("Cannot save the state of the {0}")]
    SaveDevice(String, #[source] StateError),
    /// A file cannot be created or opened.
    #[error("Cannot open {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Guest memory cannot be written to the memory file.
    #[error("Cannot write the memory file {}", path.display())]
    WriteMemory {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ember_memory::file::Error,
    },
    /// The dirty page log cannot be read.
    #[error("Cannot read the log of dirty pages")]
    DirtyLog(#[source] ember_vcpu::vm::Error),
    /// The state file cannot be written or read.
    #[error("Cannot write or read the snapshot file {}", path.display())]
    StateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ember_snapshot::Error,
    },
    /// The snapshot was taken on a host this one cannot stand in for.
    #[error("The snapshot cannot be restored on this host: {0}")]
    Incompatible(String),
    /// The snapshot's description cannot be used.
    #[error("Cannot restore the microVM's description")]
    Resources(#[source] crate::resources::Error),
    /// The memory file does not fit the snapshot.
    #[error("Cannot map the memory file {}", path.display())]
    MapMemory {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ember_memory::Error,
    },
    /// The page-fault handler cannot be given the memory.
    #[error("Cannot hand guest memory to the page-fault handler at {}", path.display())]
    Uffd {
        /// The handler's socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: ember_memory::uffd::Error,
    },
    /// The snapshot's state does not fit what its own description builds.
    #[error("The snapshot is inconsistent: {0}")]
    Inconsistent(String),
    /// The VM cannot be built.
    #[error("Cannot build the microVM")]
    Build(#[source] Box<super::Error>),
    /// The VM's state cannot be loaded.
    #[error("Cannot restore the VM's state")]
    RestoreVm(#[source] ember_vcpu::vm::Error),
    /// The serial console's state cannot be loaded.
    #[error("Cannot restore the state of the serial console")]
    RestoreSerial(#[source] ember_legacy::serial::Error),
    /// The i8042's state cannot be loaded.
    #[error("Cannot restore the state of the i8042")]
    RestoreI8042(#[source] ember_legacy::i8042::Error),
    /// The ACPI PM registers' state cannot be loaded.
    #[error("Cannot restore the state of the ACPI PM registers")]
    RestoreAcpiPm(#[source] ember_legacy::acpi_pm::Error),
    /// A virtio device's state cannot be loaded.
    #[error("Cannot restore the state of the {0}")]
    RestoreDevice(String, #[source] StateError),
}

impl From<super::Error> for Error {
    fn from(err: super::Error) -> Self {
        Error::Build(Box::new(err))
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a snapshot was taken: what a restore checks before it builds anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// ember's version.
    pub ember_version: String,
    /// The host CPU.
    pub cpu: HostCpu,
    /// The KVM capabilities the VM relied on (`KVM_CAP_*` numbers) that the host had.
    pub kvm_caps: Vec<u32>,
}

/// A virtio device's state: its transport's, and what the device itself keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState<T> {
    /// The device's ID, or its kind for a device of which there is one.
    pub id: String,
    /// The MMIO transport, with the queues at their positions.
    pub transport: MmioState,
    /// The device's own state.
    pub device: T,
}

/// Everything a snapshot holds but guest memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicrovmState {
    /// Where the snapshot was taken.
    pub host: HostInfo,
    /// The microVM's description, as `GET /vm/config` gives it.
    pub config: String,
    /// Whether the boot timer was attached (it takes the first MMIO page).
    pub boot_timer: bool,
    /// The size of guest memory, in bytes.
    pub memory_size: u64,
    /// Where each virtio device was.
    pub slots: Vec<DeviceSlot>,
    /// The VM: irqchip, PIT, clock.
    pub vm: VmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The serial console.
    pub serial: SerialState,
    /// The i8042 controller.
    pub i8042: I8042State,
    /// The ACPI PM registers.
    pub acpi_pm: AcpiPmState,
    /// The drives, in order.
    pub drives: Vec<DeviceState<BlockState>>,
    /// The network interfaces, in order.
    pub nets: Vec<DeviceState<NetState>>,
    /// The entropy device.
    pub entropy: Option<DeviceState<RngState>>,
    /// The balloon.
    pub balloon: Option<DeviceState<BalloonState>>,
    /// The vsock device.
    pub vsock: Option<DeviceState<VsockState>>,
}

/// What creating a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateReport {
    /// From the request to both files written.
    pub duration: Duration,
    /// Of that, saving the VM's and the devices' state.
    pub state: Duration,
    /// Of that, writing guest memory.
    pub memory: Duration,
    /// The bytes of guest memory written.
    pub memory_bytes: u64,
    /// The bytes of the state file.
    pub state_bytes: u64,
}

/// Where a restore's time went, step by step: the restore timeline of the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimeline {
    /// Reading and checking the state file.
    pub load: Duration,
    /// Mapping guest memory.
    pub memory: Duration,
    /// Loading the state of the interrupt controllers, the PIT, the clock and the devices.
    pub devices: Duration,
    /// Building the VM and its devices, creating the vCPUs and loading their state.
    pub vcpus: Duration,
    /// Resuming the VM, when asked.
    pub resume: Duration,
}

impl RestoreTimeline {
    /// The whole restore.
    pub fn total(&self) -> Duration {
        self.load + self.memory + self.vcpus + self.devices + self.resume
    }
}

impl fmt::Display for RestoreTimeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} us (state {} us, memory {} us, VM and vCPUs {} us, devices {} us, resume {} us)",
            self.total().as_micros(),
            self.load.as_micros(),
            self.memory.as_micros(),
            self.vcpus.as_micros(),
            self.devices.as_micros(),
            self.resume.as_micros()
        )
    }
}

/// The `snapshot` group of the metrics: the last creation and the restore, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct SnapshotMetrics {
    created: u64,
    last_create: Option<CreateReport>,
    restore: Option<RestoreTimeline>,
}

impl SnapshotMetrics {
    /// Counts a snapshot made.
    pub fn created(&mut self, report: &CreateReport) {
        self.created = self.created.saturating_add(1);
        self.last_create = Some(*report);
    }

    /// Records how this process's microVM was restored.
    pub fn restored(&mut self, timeline: RestoreTimeline) {
        self.restore = Some(timeline);
    }

    /// The group, once there is something to say.
    pub fn group(&self) -> Option<Group> {
        if self.last_create.is_none() && self.restore.is_none() {
            return None;
        }
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut values = vec![("create_count", Kind::Counter, self.created)];
        if let Some(create) = &self.last_create {
            values.extend([
                ("create_us", Kind::Gauge, us(create.duration)),
                ("create_state_us", Kind::Gauge, us(create.state)),
                ("create_memory_us", Kind::Gauge, us(create.memory)),
                ("create_memory_bytes", Kind::Gauge, create.memory_bytes),
                ("create_state_bytes", Kind::Gauge, create.state_bytes),
            ]);
        }
        if let Some(restore) = &self.restore {
            values.extend([
                ("restore_us", Kind::Gauge, us(restore.total())),
                ("restore_load_us", Kind::Gauge, us(restore.load)),
                ("restore_memory_us", Kind::Gauge, us(restore.memory)),
                ("restore_devices_us", Kind::Gauge, us(restore.devices)),
                ("restore_vcpus_us", Kind::Gauge, us(restore.vcpus)),
                ("restore_resume_us", Kind::Gauge, us(restore.resume)),
            ]);
        }
        Some(Group {
            kind: "snapshot",
            device: None,
            values,
        })
    }
}

/// The KVM capabilities a restored VM relies on, which the snapshot records when the host had
/// them.
const KVM_CAPS: [kvm_ioctls::Cap; 8] = [
    kvm_ioctls::Cap::Xsave,
    kvm_ioctls::Cap::Xcrs,
    kvm_ioctls::Cap::Debugregs,
    kvm_ioctls::Cap::VcpuEvents,
    kvm_ioctls::Cap::AdjustClock,
    kvm_ioctls::Cap::TscDeadlineTimer,
    kvm_ioctls::Cap::TscControl,
    kvm_ioctls::Cap::KvmclockCtrl,
];

/// This host, as a snapshot records it: read when the VM is built, before any seccomp filter.
pub(super) fn host_info(kvm: &ember_vcpu::Kvm) -> HostInfo {
    let kvm_caps = KVM_CAPS
        .iter()
        .filter(|cap| kvm.check_extension(**cap))
        .map(|cap| *cap as u32)
        .collect();
    HostInfo {
        ember_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu: HostCpu::current(),
        kvm_caps,
    }
}

/// Checks that this host (`here`) can stand in for the one the snapshot was taken on: the
/// same CPU model and every KVM capability the snapshot relied on; the error names each
/// difference.
fn check_host(saved: &HostInfo, here: &HostInfo) -> Result<()> {
    let mut differences = Vec::new();
    if saved.cpu != here.cpu {
        differences.push(format!(
            "it was taken on a {} CPU, this host has a {} CPU",
            saved.cpu, here.cpu
        ));
    }
    for cap in &saved.kvm_caps {
        if !here.kvm_caps.contains(cap) {
            differences.push(format!("this host's KVM lacks capability {cap}"));
        }
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::Incompatible(differences.join("; ")))
    }
}

fn open_error(path: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Open {
        path: PathBuf::from(path),
        source,
    }
}

impl Vmm {
    /// Ends a restored microVM that never ran: its vCPU threads are stopped without being
    /// resumed, so that no guest code runs on devices restored halfway, then its devices.
    fn abandon(mut self) {
        for vcpu in std::mem::take(&mut self.vcpus) {
            if let Err(err) = vcpu.stop() {
                log::warn!("{err}");
            }
        }
        self.devices.stop(&self.gate);
    }

    /// `PUT /snapshot/create`: writes the paused microVM's memory to `mem_file_path`, then its
    /// state to `snapshot_path`, so that a state file on disk always has its memory file.
    ///
    /// # Errors
    ///
    /// When the microVM runs, a state cannot be read, or a file cannot be written.
    pub fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        resources: &VmResources,
    ) -> Result<CreateReport> {
        let began = Instant::now();
        if !self.paused {
            return Err(Error::NotPaused);
        }
        let tracking = self.vm.options().track_dirty_pages;
        if params.snapshot_type == SnapshotType::Diff && !tracking {
            return Err(Error::DiffWithoutTracking);
        }
        let state = self.save_state(resources)?;
        let saved = began.elapsed();

        // What the guest (KVM's log) and the devices (the memory's bitmap) wrote since the
        // last snapshot written; reading both starts the next diff from here, so pages read
        // for a snapshot whose files are not written are kept for the next one.
        let dirty: Option<Vec<Vec<u64>>> = if tracking {
            let mut dirty = self.vm.dirty_log().map_err(Error::DirtyLog)?;
            if let Some(unsaved) = self.unsaved_dirty.take() {
                for (pages, more) in dirty.iter_mut().zip(&unsaved) {
                    for (word, more) in pages.iter_mut().zip(more) {
                        *word |= more;
                    }
                }
            }
            if let Err(source) = ember_memory::take_bitmap_dirty_pages(self.vm.memory(), &mut dirty)
            {
                self.unsaved_dirty = Some(dirty);
                return Err(Error::WriteMemory {
                    path: PathBuf::from(&params.mem_file_path),
                    source,
                });
            }
            Some(dirty)
        } else {
            None
        };
        let written = self.write_files(params, &state, dirty.as_deref());
        if written.is_err() {
            self.unsaved_dirty = dirty;
        }
        let (memory, memory_bytes, state_bytes) = written?;
        Ok(CreateReport {
            duration: began.elapsed(),
            state: saved,
            memory,
            memory_bytes,
            state_bytes,
        })
    }

    /// Writes the memory file, whole or the `dirty` pages for a diff, then the state file;
    /// returns the time the memory took and the bytes of each file.
    fn write_files(
        &self,
        params: &SnapshotCreateParams,
        state: &MicrovmState,
        dirty: Option<&[Vec<u64>]>,
    ) -> Result<(Duration, u64, u64)> {
        let memory_began = Instant::now();
        let mem_path = &params.mem_file_path;
        let write_error = |source| Error::WriteMemory {
            path: PathBuf::from(mem_path),
            source,
        };
        let mut file = File::create(mem_path).map_err(open_error(mem_path))?;
        let memory_bytes = match (params.snapshot_type, dirty) {
            (SnapshotType::Diff, Some(dirty)) => {
                ember_memory::write_dirty_pages(self.vm.memory(), &mut file, dirty)
                    .map_err(write_error)?
            }
            _ => {
                ember_memory::write_memory(self.vm.memory(), &mut file).map_err(write_error)?;
                allocated_bytes(&file)
            }
        };
        let memory = memory_began.elapsed();

        let path = &params.snapshot_path;
        let file = File::create(path).map_err(open_error(path))?;
        let state_bytes = ember_snapshot::save(&mut BufWriter::new(file), FORMAT_VERSION, state)
            .map_err(|source| Error::StateFile {
                path: PathBuf::from(path),
                source,
            })?;
        Ok((memory, memory_bytes, state_bytes))
    }

    /// The state of the paused VM and of its devices.
    fn save_state(&self, resources: &VmResources) -> Result<MicrovmState> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|vcpu| {
                vcpu.save_state().map_err(|source| Error::SaveVcpu {
                    index: vcpu.index(),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let vm = self.vm.save_state().map_err(Error::SaveVm)?;
        let config = serde_json::to_string(resources.vm_config())
            .map_err(|e| Error::Inconsistent(e.to_string()))?;
        let drives = self
            .devices
            .drives
            .iter()
            .map(|(id, t)| save_transport(id, t, Block::save_state))
            .collect::<Result<Vec<_>>>()?;
        let nets = self
            .devices
            .nets
            .iter()
            .map(|(id, t)| save_transport(id, t, Net::save_state))
            .collect::<Result<Vec<_>>>()?;
        let entropy = self
            .devices
            .entropy
            .as_ref()
            .map(|(_, t)| save_transport("entropy", t, Rng::save_state))
            .transpose()?;
        let balloon = self
            .devices
            .balloon
            .as_ref()
            .map(|t| save_transport("balloon", t, |b: &Balloon| Ok(b.save_state())))
            .transpose()?;
        let vsock = self
            .devices
            .vsock
            .as_ref()
            .map(|t| save_transport("vsock", t, |v: &Vsock| Ok(v.save_state())))
            .transpose()?;
        Ok(MicrovmState {
            host: self.host.clone(),
            config,
            boot_timer: self.boot_timer.is_some(),
            memory_size: self.vm.memory().iter().map(|r| r.len()).sum(),
            slots: self.slots.clone(),
            vm,
            vcpus,
            serial: lock(&self.legacy.serial).save_state(),
            i8042: lock(&self.legacy.i8042).save_state(),
            acpi_pm: lock(&self.legacy.acpi_pm).save_state(),
            drives,
            nets,
            entropy,
            balloon,
            vsock,
        })
    }

    /// `PUT /snapshot/load`: the microVM of the snapshot, built with this process's settings
    /// (`base`), paused unless `resume_vm`; with its description and where the time went.
    ///
    /// # Errors
    ///
    /// When the snapshot is unreadable, of another version, corrupted, from an incompatible
    /// host, or does not fit its memory file or its own description; nothing is left running.
    pub fn restore(
        params: &SnapshotLoadParams,
        base: &VmResources,
        start: ProcessStart,
    ) -> Result<(Vmm, VmResources, RestoreTimeline)> {
        let mut timeline = RestoreTimeline::default();
        let mut step = Instant::now();
        let mut lap = |field: &mut Duration| {
            *field = step.elapsed();
            step = Instant::now();
        };

        let path = &params.snapshot_path;
        let file = File::open(path).map_err(open_error(path))?;
        let state: MicrovmState = ember_snapshot::load(
            &mut BufReader::new(file),
            FORMAT_VERSION,
            ember_snapshot::Limits::default(),
        )
        .map_err(|source| Error::StateFile {
            path: PathBuf::from(path),
            source,
        })?;
        let resources = base
            .restored(
                &state.config,
                &params.network_overrides,
                params.vsock_override.as_ref().map(|v| v.uds_path.as_str()),
                params.tracks_dirty_pages(),
            )
            .map_err(Error::Resources)?;
        lap(&mut timeline.load);

        let (memory, userfault) = restore_memory(params, &resources, state.memory_size)?;
        lap(&mut timeline.memory);

        let mut machine = Machine::build(&resources, memory, start, state.boot_timer)?;
        machine.userfault = userfault;
        check_host(&state.host, &machine.host)?;
        if machine.slots != state.slots {
            return Err(Error::Inconsistent(format!(
                "its devices were at {:?}, its description puts them at {:?}",
                state.slots, machine.slots
            )));
        }
        let count = u8::try_from(state.vcpus.len())
            .ok()
            .filter(|count| *count == resources.machine().vcpu_count)
            .ok_or_else(|| {
                Error::Inconsistent(format!(
                    "it has {} vCPU states for {} vCPUs",
                    state.vcpus.len(),
                    resources.machine().vcpu_count
                ))
            })?;
        // The vCPUs first, with their state, paused, and the device workers paused: the
        // interrupt controllers then take their state with the vCPUs there to receive what
        // is pending, as Firecracker orders it, and the devices theirs, so that an interrupt
        // a device raises again as it is restored reaches a vCPU instead of being lost.
        machine.gate.pause().map_err(super::Error::Pause)?;
        let setup = |vcpu: &ember_vcpu::Vcpu| {
            let index = vcpu.index();
            // `count` is the number of states: every index has one.
            let saved = &state.vcpus[usize::from(index)];
            vcpu.check_compatible(saved)
                .map_err(|source| super::Error::IncompatibleVcpu { index, source })?;
            vcpu.restore_state(saved)
                .map_err(|source| super::Error::Vcpu { index, source })
        };
        let mut vmm = machine.start(&resources, count, &setup, true)?;
        lap(&mut timeline.vcpus);

        if let Err(err) = restore_devices(&vmm, &state) {
            vmm.abandon();
            return Err(err);
        }
        Vmm::install_filter(&resources)?;
        lap(&mut timeline.devices);

        if params.resume_vm {
            vmm.resume()?;
        }
        lap(&mut timeline.resume);
        Ok((vmm, resources, timeline))
    }
}

/// A transport's state, with what `device` says of the device itself.
fn save_transport<D, T>(
    id: &str,
    transport: &super::Transport<D>,
    device: impl FnOnce(&D) -> std::result::Result<T, StateError>,
) -> Result<DeviceState<T>>
where
    D: ember_virtio::VirtioDevice<Arc<GuestMemory>>,
{
    let transport = lock(transport);
    let failed = |e| Error::SaveDevice(id.to_string(), e);
    Ok(DeviceState {
        id: id.to_string(),
        transport: transport.save_state().map_err(failed)?,
        device: device(transport.device()).map_err(failed)?,
    })
}

/// Loads `saved` into a transport built for it, after `device` loads the device's own state.
fn restore_transport<D, T>(
    transport: &super::Transport<D>,
    saved: &DeviceState<T>,
    device: impl FnOnce(&mut D, &T) -> std::result::Result<(), StateError>,
) -> Result<()>
where
    D: ember_virtio::VirtioDevice<Arc<GuestMemory>>,
{
    let mut transport = lock(transport);
    let failed = |e| Error::RestoreDevice(saved.id.clone(), e);
    device(transport.device_mut(), &saved.device).map_err(failed)?;
    transport.restore_state(&saved.transport).map_err(failed)
}

/// Guest memory as the load asks: the memory file mapped private, or empty memory whose
/// pages a page-fault handler fills (with the userfaultfd to keep as long as the memory).
fn restore_memory(
    params: &SnapshotLoadParams,
    resources: &VmResources,
    size: u64,
) -> Result<(Arc<GuestMemory>, Option<Userfault>)> {
    let backend = params.memory_backend();
    let path = PathBuf::from(&backend.backend_path);
    let track = params.tracks_dirty_pages();
    let mut options = MemoryOptions::default();
    options.ksm = resources.ksm;
    options.include_in_core_dumps = resources.dump_guest_memory;
    let map_error = |source| Error::MapMemory {
        path: path.clone(),
        source,
    };
    match backend.backend_type {
        MemoryBackendType::File => {
            let file = File::open(&path).map_err(open_error(&backend.backend_path))?;
            let memory =
                ember_memory::create_tracked_guest_memory_from_file(&file, size, options, track)
                    .map_err(map_error)?;
            Ok((Arc::new(memory), None))
        }
        MemoryBackendType::Uffd => {
            let memory = ember_memory::create_tracked_guest_memory(size, options, track)
                .map_err(map_error)?;
            let uffd_error = |source| Error::Uffd {
                path: path.clone(),
                source,
            };
            let mut userfault = Userfault::new().map_err(uffd_error)?;
            userfault.register(&memory).map_err(uffd_error)?;
            let regions = userfault.regions().to_vec();
            userfault
                .send_to_handler(&path, &regions)
                .map_err(uffd_error)?;
            Ok((Arc::new(memory), Some(userfault)))
        }
    }
}

/// Loads the state of the VM and of every device into a paused microVM built for it.
fn restore_devices(machine: &Vmm, state: &MicrovmState) -> Result<()> {
    machine
        .vm
        .restore_state(&state.vm)
        .map_err(Error::RestoreVm)?;
    let legacy = &machine.legacy;
    lock(&legacy.serial)
        .restore_state(&state.serial)
        .map_err(Error::RestoreSerial)?;
    lock(&legacy.i8042)
        .restore_state(&state.i8042)
        .map_err(Error::RestoreI8042)?;
    lock(&legacy.acpi_pm)
        .restore_state(&state.acpi_pm)
        .map_err(Error::RestoreAcpiPm)?;

    let count_mismatch = |kind: &str, saved: usize, built: usize| {
        Error::Inconsistent(format!("it has {saved} {kind} states for {built} {kind}s"))
    };
    if state.drives.len() != machine.devices.drives.len() {
        return Err(count_mismatch(
            "drive",
            state.drives.len(),
            machine.devices.drives.len(),
        ));
    }
    for ((_, transport), saved) in machine.devices.drives.iter().zip(&state.drives) {
        restore_transport(transport, saved, Block::restore_state)?;
    }
    if state.nets.len() != machine.devices.nets.len() {
        return Err(count_mismatch(
            "interface",
            state.nets.len(),
            machine.devices.nets.len(),
        ));
    }
    for ((_, transport), saved) in machine.devices.nets.iter().zip(&state.nets) {
        restore_transport(transport, saved, Net::restore_state)?;
    }
    match (&machine.devices.entropy, &state.entropy) {
        (Some((_, transport)), Some(saved)) => {
            restore_transport(transport, saved, Rng::restore_state)?;
        }
        (None, None) => {}
        _ => return Err(count_mismatch("entropy device", 1, 0)),
    }
    match (&machine.devices.balloon, &state.balloon) {
        (Some(transport), Some(saved)) => {
            restore_transport(transport, saved, |b, s| b.restore_state(s))?;
        }
        (None, None) => {}
        _ => return Err(count_mismatch("balloon", 1, 0)),
    }
    match (&machine.devices.vsock, &state.vsock) {
        (Some(transport), Some(saved)) => {
            restore_transport(transport, saved, |v, s| v.restore_state(s))?;
        }
        (None, None) => {}
        _ => return Err(count_mismatch("vsock device", 1, 0)),
    }
    Ok(())
}

/// The bytes `file` takes on disk (its holes take none).
fn allocated_bytes(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

/// `--describe-snapshot`: what a snapshot file's header says, in words.
///
/// # Errors
///
/// When the file cannot be read or is not a snapshot.
pub fn describe(path: &std::path::Path) -> std::result::Result<String, ember_snapshot::Error> {
    let mut file = File::open(path).map_err(ember_snapshot::Error::Io)?;
    let header = ember_snapshot::read_header(&mut file)?;
    Ok(format!("v{}", header.version))
}
