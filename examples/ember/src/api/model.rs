//! The JSON bodies of the API, as Firecracker's `OpenAPI` description (`firecracker.yaml`) names
//! them, and the checks of what ember can honour.
//!
//! Each type deserializes with `deny_unknown_fields`, so a misspelt or unsupported key is a 400
//! that names it, and serializes back to the same JSON (for `GET /machine-config`,
//! `GET /vm/config`). Optional keys that are absent stay absent when serialized.
//!
//! Deserializing checks the shape; each type's `validate` checks the values, and refuses with a
//! [`ModelError`] what ember cannot do rather than silently ignoring it: SMT, CPU templates,
//! hugetlbfs pages, the `Async` I/O engine, vhost-user drives and a guest
//! MTU. The same checks serve a configuration file ([`FullVmConfiguration`]).

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;

use ember_virtio::block;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::controller::error_chain;

/// The longest resource ID (`drive_id`, `iface_id`) accepted.
pub const MAX_ID_LEN: usize = 64;

/// The most vCPUs a microVM can have, as in Firecracker.
pub const MAX_VCPUS: u8 = 32;

/// The default number of vCPUs, before any `PUT /machine-config`.
pub const DEFAULT_VCPUS: u8 = 1;

/// The default memory size in MiB, before any `PUT /machine-config`.
pub const DEFAULT_MEM_SIZE_MIB: u64 = 128;

/// The longest name of a host network interface (`IFNAMSIZ` less its NUL).
pub const MAX_HOST_DEV_NAME_LEN: usize = 15;

/// The lowest CID a guest may have: 0 is the hypervisor, 1 the loopback, 2 the host.
pub const MIN_GUEST_CID: u32 = 3;

/// The highest CID a guest may have: `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u32 = u32::MAX - 1;

/// The longest vsock `uds_path`: a Unix socket's `sun_path` holds 108 bytes with its NUL.
pub const MAX_UDS_PATH_LEN: usize = 107;

/// Nanoseconds in a millisecond: a token bucket's `refill_time` is in ms and must fit in a `u64`
/// once turned into ns.
const NS_PER_MS: u64 = 1_000_000;

/// Why a well-formed body asks for something ember refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A resource ID is empty (Firecracker's message).
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// A resource ID holds a character other than `[A-Za-z0-9_]` (Firecracker's message).
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    InvalidId,
    /// A resource ID is longer than [`MAX_ID_LEN`].
    #[error("API Resource IDs can be at most {MAX_ID_LEN} characters long.")]
    IdTooLong,
    /// `vcpu_count` is outside `1..=MAX_VCPUS`.
    #[error("The number of vCPUs must be between 1 and {MAX_VCPUS}, not {0}.")]
    VcpuCount(u8),
    /// `mem_size_mib` is 0.
    #[error("The memory size (MiB) must be greater than 0.")]
    ZeroMemory,
    /// `mem_size_mib` is more bytes than a 64-bit address space holds.
    #[error("The memory size of {0} MiB is larger than the address space.")]
    MemoryTooLarge(u64),
    /// `smt` is true.
    #[error("Simultaneous multithreading (smt) is not supported by ember.")]
    Smt,
    /// `cpu_template` names a template.
    #[error("The CPU template {0} is not supported by ember: only \"None\" is accepted.")]
    CpuTemplate(CpuTemplate),
    /// `huge_pages` is `"2M"`.
    #[error(
        "Huge pages \"2M\" (hugetlbfs) are not supported by ember: use \"Transparent\" or \"None\"."
    )]
    HugetlbfsPages,
    /// A path field is the empty string.
    #[error("The {0} cannot be empty.")]
    EmptyPath(&'static str),
    /// A drive names a vhost-user `socket`.
    #[error(
        "vhost-user block devices (socket) are not supported by ember: give path_on_host instead."
    )]
    VhostUserBlock,
    /// A drive has no `path_on_host`.
    #[error("The drive has no path_on_host.")]
    MissingDrivePath,
    /// `host_dev_name` is not a possible interface name.
    #[error(
        "The host_dev_name must be the name of a TAP interface: 1 to {MAX_HOST_DEV_NAME_LEN} bytes, without '/' or NUL."
    )]
    HostDevName,
    /// `guest_mac` is not six hexadecimal octets separated by `:`.
    #[error("The guest_mac {0:?} is not a MAC address of the form 06:00:ac:10:00:02.")]
    GuestMac(String),
    /// A network interface gives an `mtu`.
    #[error("Setting the mtu of a network interface is not supported by ember.")]
    Mtu,
    /// A token bucket's `refill_time` overflows once turned into nanoseconds.
    #[error("The refill_time of {0} ms is too large.")]
    RefillTime(u64),
    /// Two drives of a configuration have the same ID.
    #[error("The drive ID {0:?} is used twice.")]
    DuplicateDrive(String),
    /// Two network interfaces of a configuration have the same ID.
    #[error("The network interface ID {0:?} is used twice.")]
    DuplicateInterface(String),
    /// More than one drive of a configuration is the root device.
    #[error("Only one drive can be the root device.")]
    TwoRootDevices,
    /// A drive's host file is of a kind that cannot back a drive.
    #[error("The drive file {path} is {kind}: a drive must be a regular file or a block device.")]
    DriveFileKind {
        /// The path, as given.
        path: String,
        /// What it is: "a directory", "a FIFO", "a socket" or "a character device".
        kind: &'static str,
    },
    /// A drive's host file cannot be looked at: it does not exist (as a path in a jail that
    /// leads out of it), or a directory on the way cannot be searched.
    #[error("Cannot find the drive file {path}: {reason}.")]
    DriveFileMissing {
        /// The path, as given.
        path: String,
        /// Why, in the system's words.
        reason: String,
    },
    /// A balloon asks for free page hinting or reporting.
    #[error("Free page {0} is not supported by ember's balloon.")]
    BalloonFreePage(&'static str),
    /// A balloon request, before one was put.
    #[error("No balloon device found.")]
    NoBalloon,
    /// A balloon's target is more than the guest's memory, or does not fit in 32 bits of
    /// 4 KiB pages (Firecracker's message).
    #[error("Amount of pages requested is too large.")]
    BalloonTooLarge,
    /// A drive names an inherited descriptor (`/proc/self/fd/N`) that cannot back it; the
    /// text says why.
    #[error("{0}")]
    DriveFd(String),
    /// An MMDS configuration lists no network interface (Firecracker's message).
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    MmdsNoInterface,
    /// An MMDS configuration lists an interface that was not put (Firecracker's message).
    #[error(
        "The list of network interface IDs provided contains at least one ID that does not \
         correspond to any existing network interface."
    )]
    MmdsUnknownInterface,
    /// The MMDS address is not a usable IPv4 link-local address (Firecracker's message).
    #[error("The MMDS IPv4 address is not link local.")]
    MmdsAddressNotLinkLocal,
    /// A vsock `guest_cid` is one of the reserved CIDs (0 to 2, and `u32::MAX`).
    #[error(
        "The guest_cid {0} is reserved: a guest's CID is between {MIN_GUEST_CID} and {MAX_GUEST_CID}."
    )]
    GuestCid(u32),
    /// A vsock `uds_path` cannot name a Unix socket.
    #[error(
        "The uds_path must be the path of a Unix socket: 1 to {MAX_UDS_PATH_LEN} bytes, without NUL."
    )]
    UdsPath,
    /// A vsock `uds_path` names a file that exists: ember creates the socket there, as
    /// Firecracker does, and does not remove what is in the way.
    #[error("Cannot create backend for vsock device: the uds_path {0} exists.")]
    UdsPathExists(String),
    /// A snapshot load gives both `mem_backend` and `mem_file_path` (Firecracker's message).
    #[error("Too many fields: `mem_backend` and `mem_file_path` are mutually exclusive.")]
    MemorySourceTwice,
    /// A snapshot load gives neither `mem_backend` nor `mem_file_path` (Firecracker's
    /// message).
    #[error("Missing mandatory field: `mem_backend` or `mem_file_path`.")]
    MemorySourceMissing,
    /// A snapshot load asks for `clock_realtime`.
    #[error("clock_realtime is not supported by ember: kvmclock resumes where it was saved.")]
    ClockRealtime,
    /// A snapshot load asks for huge pages other than "None".
    #[error(
        "Huge pages {0:?} are not supported on snapshot restore by ember: the memory file is mapped with ordinary pages."
    )]
    SnapshotHugePages(String),
}

/// The result of a check of this module.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Checks a resource ID (`drive_id`, `iface_id`, or the ID in the path): not empty, at most
/// [`MAX_ID_LEN`] characters of `[A-Za-z0-9_]`.
///
/// # Errors
///
/// [`ModelError::EmptyId`], [`ModelError::IdTooLong`] or [`ModelError::InvalidId`].
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(ModelError::EmptyId);
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ModelError::InvalidId);
    }
    if id.len() > MAX_ID_LEN {
        return Err(ModelError::IdTooLong);
    }
    Ok(())
}

/// Checks that the file at `path`, when it exists, can back a drive: a regular file or a block
/// device, not a directory, a FIFO, a socket or a character device.
///
/// Host paths are the API client's to give, as in Firecracker: this is no confinement (the
/// jailer's job), only a clear refusal of files that would fail or hang later. It looks with
/// `stat` (following symbolic links) and never opens the file: opening a FIFO would block until
/// a writer came. A path that does not exist, or cannot be looked at, passes: opening it later
/// reports why ([`check_drive_file_exists`] refuses it at once). So does an empty path, which
/// the body's own checks refuse.
///
/// `/proc/self/fd/N` names the descriptor N that ember inherited, never a path: it must be
/// open on a regular file or a block device, for reading, and for writing too unless
/// `read_only` ([`ember_virtio::block::check_inherited_fd`], which looks at the descriptor
/// without going through `/proc`).
///
/// # Errors
///
/// [`ModelError::DriveFileKind`], and [`ModelError::DriveFd`] for a descriptor.
pub fn check_drive_file(path: &str, read_only: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;

    if path.is_empty() {
        return Ok(());
    }
    if let Some(fd) = inherited_fd(path)? {
        return block::check_inherited_fd(fd, read_only)
            .map_err(|err| ModelError::DriveFd(error_chain(&err)));
    }
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    let file_type = metadata.file_type();
    let kind = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        return Ok(());
    };
    Err(ModelError::DriveFileKind {
        path: path.to_string(),
        kind,
    })
}

/// Checks that the file at `path` exists and can be looked at (`stat`, following symbolic
/// links), as `PUT /drives` asks, so that a drive path that leads nowhere (out of a jail, say)
/// is refused when it is given, as Firecracker refuses it, rather than at `InstanceStart`. An
/// inherited descriptor (`/proc/self/fd/N`) and an empty path are left to
/// [`check_drive_file`] and the body's own checks.
///
/// # Errors
///
/// [`ModelError::DriveFileMissing`].
pub fn check_drive_file_exists(path: &str) -> Result<()> {
    if path.is_empty() || inherited_fd(path)?.is_some() {
        return Ok(());
    }
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(err) => Err(ModelError::DriveFileMissing {
            path: path.to_string(),
            reason: err.to_string(),
        }),
    }
}

/// The descriptor `path` names when it is `/proc/self/fd/N`.
fn inherited_fd(path: &str) -> Result<Option<std::os::fd::RawFd>> {
    block::inherited_fd(std::path::Path::new(path))
        .map_err(|err| ModelError::DriveFd(error_chain(&err)))
}

/// Checks that a path field, when given, is not empty.
fn validate_path(field: &'static str, path: Option<&str>) -> Result<()> {
    match path {
        Some("") => Err(ModelError::EmptyPath(field)),
        _ => Ok(()),
    }
}

/// The body of `PUT /boot-source`: the guest kernel, its command line and initrd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image.
    pub kernel_image_path: String,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSource {
    /// Checks that the paths are not empty.
    ///
    /// # Errors
    ///
    /// [`ModelError::EmptyPath`].
    pub fn validate(&self) -> Result<()> {
        validate_path("kernel_image_path", Some(&self.kernel_image_path))?;
        validate_path("initrd_path", self.initrd_path.as_deref())
    }
}

/// The CPU templates of Firecracker; ember applies none of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Intel C3.
    C3,
    /// Intel T2.
    T2,
    /// Intel T2S.
    T2S,
    /// Intel T2CL.
    T2CL,
    /// AMD T2A.
    T2A,
    /// Arm V1N1.
    V1N1,
    /// No template: the guest sees the host's CPU features, filtered by KVM.
    None,
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self:?}\"")
    }
}

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    Transparent,
    /// hugetlbfs 2 MiB pages; ember refuses them.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// The body of `PUT /machine-config` and of `GET /machine-config`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs, `1..=32`.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading; ember accepts only `false`.
    #[serde(default)]
    pub smt: bool,
    /// A CPU template; ember accepts only `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking; ember accepts only `false`.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// How guest memory is backed; ember accepts `"None"` and `"Transparent"`.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfiguration {
    /// Firecracker's defaults: 1 vCPU, 128 MiB, nothing else.
    fn default() -> Self {
        MachineConfiguration {
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

impl MachineConfiguration {
    /// Checks the values and refuses what ember cannot honour.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field refused.
    pub fn validate(&self) -> Result<()> {
        validate_vcpus(self.vcpu_count)?;
        validate_memory(self.mem_size_mib)?;
        validate_machine_options(self.smt, self.cpu_template, self.huge_pages)
    }

    /// This configuration with the fields that `update` gives replaced, checked.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field of the result refused.
    pub fn update(&self, update: &MachineConfigurationUpdate) -> Result<MachineConfiguration> {
        let updated = MachineConfiguration {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            cpu_template: update.cpu_template.or(self.cpu_template),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
        };
        updated.validate()?;
        Ok(updated)
    }
}

fn validate_vcpus(vcpu_count: u8) -> Result<()> {
    if (1..=MAX_VCPUS).contains(&vcpu_count) {
        Ok(())
    } else {
        Err(ModelError::VcpuCount(vcpu_count))
    }
}

fn validate_memory(mem_size_mib: u64) -> Result<()> {
    if mem_size_mib == 0 {
        return Err(ModelError::ZeroMemory);
    }
    match mem_size_mib.checked_mul(1 << 20) {
        Some(_) => Ok(()),
        None => Err(ModelError::MemoryTooLarge(mem_size_mib)),
    }
}

fn validate_machine_options(
    smt: bool,
    cpu_template: Option<CpuTemplate>,
    huge_pages: HugePages,
) -> Result<()> {
    if smt {
        return Err(ModelError::Smt);
    }
    match cpu_template {
        None | Some(CpuTemplate::None) => {}
        Some(template) => return Err(ModelError::CpuTemplate(template)),
    }
    if huge_pages == HugePages::Hugetlbfs2M {
        return Err(ModelError::HugetlbfsPages);
    }
    Ok(())
}

/// The body of `PATCH /machine-config`: the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    /// Number of vCPUs, `1..=32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading; ember accepts only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// A CPU template; ember accepts only `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking; ember accepts only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// How guest memory is backed; ember accepts `"None"` and `"Transparent"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigurationUpdate {
    /// Whether the update changes nothing (`{}`), which Firecracker refuses.
    pub fn is_empty(&self) -> bool {
        self == &MachineConfigurationUpdate::default()
    }

    /// Checks the fields given, each on its own.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field refused.
    pub fn validate(&self) -> Result<()> {
        if let Some(vcpu_count) = self.vcpu_count {
            validate_vcpus(vcpu_count)?;
        }
        if let Some(mem_size_mib) = self.mem_size_mib {
            validate_memory(mem_size_mib)?;
        }
        validate_machine_options(
            self.smt.unwrap_or(false),
            self.cpu_template,
            self.huge_pages.unwrap_or_default(),
        )
    }
}

/// A token bucket of a rate limiter.
///
/// As in Firecracker, a bucket whose `size` or `refill_time` is 0 does not limit: see
/// [`TokenBucket::limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// The most tokens the bucket holds.
    pub size: u64,
    /// Tokens available once at the start, on top of `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty to `size`.
    pub refill_time: u64,
}

impl TokenBucket {
    /// Whether the bucket limits anything: Firecracker disables a bucket whose `size` or
    /// `refill_time` is 0.
    pub fn limits(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }

    /// Checks that `refill_time` can be counted in nanoseconds.
    ///
    /// # Errors
    ///
    /// [`ModelError::RefillTime`].
    pub fn validate(&self) -> Result<()> {
        match self.refill_time.checked_mul(NS_PER_MS) {
            Some(_) => Ok(()),
            None => Err(ModelError::RefillTime(self.refill_time)),
        }
    }
}

/// A rate limiter: independent limits on bytes and on operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// The bucket whose tokens are bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// The bucket whose tokens are operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Checks both buckets.
    ///
    /// # Errors
    ///
    /// [`ModelError::RefillTime`].
    pub fn validate(&self) -> Result<()> {
        self.bandwidth
            .iter()
            .chain(&self.ops)
            .try_for_each(TokenBucket::validate)
    }
}

fn validate_rate_limiter(limiter: Option<&RateLimiter>) -> Result<()> {
    limiter.map_or(Ok(()), RateLimiter::validate)
}

/// The caching strategy of a drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests from the guest are not required to reach the disk.
    #[default]
    Unsafe,
    /// Flush requests from the guest reach the disk.
    Writeback,
}

/// The I/O engine of a drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the device's own thread.
    #[default]
    Sync,
    /// Reads, writes and flushes in flight on an `io_uring`, many at once, from the drive's
    /// one thread. A host without io_uring fails the boot with an error that says so.
    Async,
}

/// The body of `PUT /drives/{drive_id}`: a virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's ID, equal to the one in the path.
    pub drive_id: String,
    /// The unique ID of the root partition, used when this is the root device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Whether the guest mounts its root file system from this drive.
    pub is_root_device: bool,
    /// The caching strategy.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Whether the guest may only read the drive; `false` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Host path of the disk image or block device; required by ember. `/proc/self/fd/N` is
    /// the descriptor N that ember inherited, used without opening any path
    /// ([`check_drive_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Limits on the drive's I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// The I/O engine: `"Sync"` when absent, and always written out, as Firecracker does.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// The socket of a vhost-user block backend; ember refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl Drive {
    /// Whether the guest may only read the drive.
    pub fn read_only(&self) -> bool {
        self.is_read_only.unwrap_or(false)
    }

    /// Checks the drive and refuses what ember cannot honour.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field refused.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.drive_id)?;
        if self.socket.is_some() {
            return Err(ModelError::VhostUserBlock);
        }
        match self.path_on_host.as_deref() {
            None => return Err(ModelError::MissingDrivePath),
            path => validate_path("path_on_host", path)?,
        }
        validate_rate_limiter(self.rate_limiter.as_ref())
    }
}

/// The body of `PATCH /drives/{drive_id}`: a new backing file or rate limiter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's ID, equal to the one in the path.
    pub drive_id: String,
    /// A new host path for the drive, or `/proc/self/fd/N` for the inherited descriptor N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New limits on the drive's I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl PartialDrive {
    /// Checks the update.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field refused.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.drive_id)?;
        validate_path("path_on_host", self.path_on_host.as_deref())?;
        validate_rate_limiter(self.rate_limiter.as_ref())
    }
}

/// The body of `PUT /entropy` (Firecracker's `EntropyDevice`): a virtio-rng device, whose
/// requests may go through a rate limiter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EntropyDeviceConfig {
    /// Limits on the random bytes the guest gets, and on its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl EntropyDeviceConfig {
    /// A device whose requests go through `rate_limiter`, if any.
    pub fn new(rate_limiter: Option<RateLimiter>) -> Self {
        EntropyDeviceConfig { rate_limiter }
    }

    /// Checks the rate limiter.
    ///
    /// # Errors
    ///
    /// [`ModelError::RefillTime`].
    pub fn validate(&self) -> Result<()> {
        validate_rate_limiter(self.rate_limiter.as_ref())
    }
}

/// `PUT /vsock` and the configuration's `vsock`: Firecracker's `Vsock`, a virtio-vsock device
/// whose host side is Unix sockets.
///
/// A host process connects to `uds_path` and writes `CONNECT <port>\n` to reach the guest's
/// listener on that port; a guest connecting to host port P reaches the Unix socket listening
/// at `<uds_path>_P`. In a jail, `uds_path` is a path inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VsockConfig {
    /// Firecracker's deprecated device ID: accepted, and dropped as Firecracker drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context ID, [`MIN_GUEST_CID`] or more.
    pub guest_cid: u32,
    /// Where ember listens for host-initiated connections.
    pub uds_path: String,
}

impl VsockConfig {
    /// A device for the guest `guest_cid`, listening at `uds_path`.
    pub fn new(guest_cid: u32, uds_path: impl Into<String>) -> Self {
        VsockConfig {
            vsock_id: None,
            guest_cid,
            uds_path: uds_path.into(),
        }
    }

    /// Checks the CID and that the path can name a Unix socket.
    ///
    /// # Errors
    ///
    /// [`ModelError::GuestCid`], [`ModelError::UdsPath`].
    pub fn validate(&self) -> Result<()> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.guest_cid) {
            return Err(ModelError::GuestCid(self.guest_cid));
        }
        let path = self.uds_path.as_bytes();
        if path.is_empty() || path.len() > MAX_UDS_PATH_LEN || path.contains(&0) {
            return Err(ModelError::UdsPath);
        }
        Ok(())
    }

    /// Checks that nothing is at `uds_path` yet, where ember is to create the socket. It only
    /// looks (`lstat`): a path that cannot be looked at passes, and creating the socket later
    /// says why it fails.
    ///
    /// # Errors
    ///
    /// [`ModelError::UdsPathExists`].
    pub fn check_uds_path_free(&self) -> Result<()> {
        match std::fs::symlink_metadata(&self.uds_path) {
            Ok(_) => Err(ModelError::UdsPathExists(self.uds_path.clone())),
            Err(_) => Ok(()),
        }
    }
}

/// The body of `PUT /network-interfaces/{iface_id}`: a virtio network device on a TAP interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's ID, equal to the one in the path.
    pub iface_id: String,
    /// The name of the host's TAP interface.
    pub host_dev_name: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// An MTU to advertise to the guest; ember refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterface {
    /// Checks the interface and refuses what ember cannot honour.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field refused.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.iface_id)?;
        validate_host_dev_name(&self.host_dev_name)?;
        if let Some(mac) = self.guest_mac.as_ref().filter(|mac| !is_mac_address(mac)) {
            return Err(ModelError::GuestMac(mac.clone()));
        }
        if self.mtu.is_some() {
            return Err(ModelError::Mtu);
        }
        validate_rate_limiter(self.rx_rate_limiter.as_ref())?;
        validate_rate_limiter(self.tx_rate_limiter.as_ref())
    }
}

/// Checks that `name` can name a host network interface.
fn validate_host_dev_name(name: &str) -> Result<()> {
    let name = name.as_bytes();
    if name.is_empty()
        || name.len() > MAX_HOST_DEV_NAME_LEN
        || name.iter().any(|&b| b == b'/' || b == 0)
    {
        return Err(ModelError::HostDevName);
    }
    Ok(())
}

/// Whether `text` is six octets of two hexadecimal digits separated by `:`.
fn is_mac_address(text: &str) -> bool {
    let mut octets = 0usize;
    for octet in text.split(':') {
        if octet.len() != 2 || !octet.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        octets = octets.saturating_add(1);
    }
    octets == 6
}

/// The body of `PATCH /network-interfaces/{iface_id}`: new rate limiters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's ID, equal to the one in the path.
    pub iface_id: String,
    /// New limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl PartialNetworkInterface {
    /// Checks the update.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first field refused.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.iface_id)?;
        validate_rate_limiter(self.rx_rate_limiter.as_ref())?;
        validate_rate_limiter(self.tx_rate_limiter.as_ref())
    }
}

/// What `PUT /actions` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured microVM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
}

/// The body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// The state `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop running the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The state asked for.
    pub state: VmState,
}

/// A log level, read without regard to case as Firecracker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings (`"Warning"`, also read as `"Warn"`).
    Warning,
    /// Also information.
    Info,
    /// Also debugging details.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        const LEVELS: &[&str] = &["Error", "Warning", "Info", "Debug", "Trace", "Off"];
        let text = String::deserialize(deserializer)?;
        let level = match text.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => return Err(de::Error::unknown_variant(&text, LEVELS)),
        };
        Ok(level)
    }
}

/// The body of `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// The file or named pipe the log goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The most verbose level written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Whether each line shows its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Whether each line shows the file and line it comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only messages from this module path are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// Checks that the path, when given, is not empty.
    ///
    /// # Errors
    ///
    /// [`ModelError::EmptyPath`].
    pub fn validate(&self) -> Result<()> {
        validate_path("log_path", self.log_path.as_deref())
    }
}

/// The body of `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// The file or named pipe the JSON metrics go to.
    pub metrics_path: String,
}

impl Metrics {
    /// Checks that the path is not empty.
    ///
    /// # Errors
    ///
    /// [`ModelError::EmptyPath`].
    pub fn validate(&self) -> Result<()> {
        validate_path("metrics_path", Some(&self.metrics_path))
    }
}

/// The state of the microVM in [`InstanceInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Being configured: `InstanceStart` has not been asked for.
    #[serde(rename = "Not started")]
    NotStarted,
    /// The vCPUs run.
    Running,
    /// The vCPUs are paused.
    Paused,
}

/// The answer to `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// The VMM's name.
    pub app_name: String,
    /// The microVM's ID.
    pub id: String,
    /// The microVM's state.
    pub state: InstanceState,
    /// The VMM's version.
    pub vmm_version: String,
}

/// The answer to `GET /version` (`FirecrackerVersion` in the spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmVersion {
    /// The VMM's version, under the key clients of Firecracker read.
    pub firecracker_version: String,
}

/// The body of every error answer (`Error` in the spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultMessage {
    /// What went wrong.
    pub fault_message: String,
}

/// `PUT /balloon` and the configuration's `balloon`: Firecracker's `Balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// The size the balloon is asked to reach, in MiB.
    pub amount_mib: u32,
    /// Whether the guest may deflate the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between two statistics polls; 0 (the default) turns statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting: accepted only as `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub free_page_hinting: bool,
    /// Free page reporting: accepted only as `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub free_page_reporting: bool,
}

impl Balloon {
    /// Checks what ember supports: no free page hinting or reporting, a target that fits in
    /// 32 bits of 4 KiB pages.
    ///
    /// # Errors
    ///
    /// [`ModelError::BalloonFreePage`], [`ModelError::BalloonTooLarge`].
    pub fn validate(&self) -> Result<()> {
        if self.free_page_hinting {
            return Err(ModelError::BalloonFreePage("hinting"));
        }
        if self.free_page_reporting {
            return Err(ModelError::BalloonFreePage("reporting"));
        }
        validate_balloon_amount(self.amount_mib)
    }
}

fn validate_balloon_amount(amount_mib: u32) -> Result<()> {
    ember_virtio::balloon::mib_to_pages(amount_mib)
        .map(drop)
        .map_err(|_| ModelError::BalloonTooLarge)
}

/// `PATCH /balloon`: Firecracker's `BalloonUpdate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target, in MiB.
    pub amount_mib: u32,
}

impl BalloonUpdate {
    /// Checks that the target fits in 32 bits of 4 KiB pages.
    ///
    /// # Errors
    ///
    /// [`ModelError::BalloonTooLarge`].
    pub fn validate(&self) -> Result<()> {
        validate_balloon_amount(self.amount_mib)
    }
}

/// `PATCH /balloon/statistics`: Firecracker's `BalloonStatsUpdate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between two statistics polls.
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics`: Firecracker's `BalloonStats`. The guest's statistics are left out
/// until its driver reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats {
    /// The size the balloon is asked to reach, in 4 KiB pages.
    pub target_pages: u32,
    /// The size the driver says it reached, in 4 KiB pages.
    pub actual_pages: u32,
    /// `target_pages` in MiB.
    pub target_mib: u32,
    /// `actual_pages` in MiB.
    pub actual_mib: u32,
    /// Memory swapped in, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Memory swapped out, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Memory not used at all, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Memory the guest has, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Memory available without swapping, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Huge page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Huge page allocations that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

impl From<ember_virtio::balloon::BalloonStats> for BalloonStats {
    fn from(stats: ember_virtio::balloon::BalloonStats) -> Self {
        let guest = stats.guest;
        BalloonStats {
            target_pages: stats.target_pages,
            actual_pages: stats.actual_pages,
            target_mib: stats.target_mib,
            actual_mib: stats.actual_mib,
            swap_in: guest.swap_in,
            swap_out: guest.swap_out,
            major_faults: guest.major_faults,
            minor_faults: guest.minor_faults,
            free_memory: guest.free_memory,
            total_memory: guest.total_memory,
            available_memory: guest.available_memory,
            disk_caches: guest.disk_caches,
            hugetlb_allocations: guest.hugetlb_allocations,
            hugetlb_failures: guest.hugetlb_failures,
        }
    }
}

/// The MMDS address when `PUT /mmds/config` gives none, as in Firecracker.
pub const DEFAULT_MMDS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// `PUT /mmds/config`, and a configuration file's `mmds-config`: how guests reach the MMDS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 (the default) or V2 (session tokens).
    #[serde(default)]
    pub version: ember_mmds::MmdsVersion,
    /// The IDs of the network interfaces whose guest traffic to the MMDS address the MMDS
    /// answers; each must have been put, and there must be one at least.
    pub network_interfaces: Vec<String>,
    /// The MMDS's IPv4 address: link-local (`169.254.1.0` to `169.254.254.255`). Absent from
    /// a request, it is [`DEFAULT_MMDS_ADDRESS`], and recorded so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Whether answers are always IMDS text, whatever the guest's `Accept` says.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// Checks the interface list is not empty and the address is link-local as Firecracker
    /// checks it: `169.254.0.0/16` without its first and last 256 addresses (RFC 3927).
    /// That the interfaces exist is checked against the microVM's.
    ///
    /// # Errors
    ///
    /// [`ModelError::MmdsNoInterface`] or [`ModelError::MmdsAddressNotLinkLocal`].
    pub fn validate(&self) -> Result<()> {
        if self.network_interfaces.is_empty() {
            return Err(ModelError::MmdsNoInterface);
        }
        if let Some(address) = self.ipv4_address {
            match address.octets() {
                [169, 254, 1..=254, _] => {}
                _ => return Err(ModelError::MmdsAddressNotLinkLocal),
            }
        }
        Ok(())
    }

    /// Checks that every listed interface is one of `nets`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MmdsUnknownInterface`].
    pub fn check_interfaces(&self, nets: &[NetworkInterface]) -> Result<()> {
        let known = |id: &String| nets.iter().any(|net| &net.iface_id == id);
        if self.network_interfaces.iter().all(known) {
            Ok(())
        } else {
            Err(ModelError::MmdsUnknownInterface)
        }
    }
}

/// The whole configuration of a microVM: the answer to `GET /vm/config`, and the format of a
/// configuration file.
///
/// Keys of Firecracker's configuration that ember does not implement (`cpu-config`,
/// `memory-hotplug`, `pmem`) are accepted only when `null`
/// (or, for the list `pmem`, empty), so that a configuration written for Firecracker without them
/// loads unchanged; they are never written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// The kernel, its command line and initrd.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// The block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    /// The network devices.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Where the log goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Where the metrics go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing,
        deserialize_with = "reject_cpu_config"
    )]
    cpu_config: Unsupported,
    /// The entropy device, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDeviceConfig>,
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing,
        deserialize_with = "reject_memory_hotplug"
    )]
    memory_hotplug: Unsupported,
    /// How guests reach the MMDS; the MMDS is not reachable from the guest without it.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    #[serde(default, skip_serializing, deserialize_with = "reject_pmem")]
    pmem: Unsupported,
    /// The vsock device, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

impl FullVmConfiguration {
    /// Checks every part, and that IDs are unique and at most one drive is the root device.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] of the first value refused.
    pub fn validate(&self) -> Result<()> {
        if let Some(boot_source) = &self.boot_source {
            boot_source.validate()?;
        }
        if let Some(machine_config) = &self.machine_config {
            machine_config.validate()?;
        }
        let mut drive_ids = HashSet::new();
        let mut has_root = false;
        for drive in &self.drives {
            drive.validate()?;
            if !drive_ids.insert(drive.drive_id.as_str()) {
                return Err(ModelError::DuplicateDrive(drive.drive_id.clone()));
            }
            if drive.is_root_device && std::mem::replace(&mut has_root, true) {
                return Err(ModelError::TwoRootDevices);
            }
        }
        let mut iface_ids = HashSet::new();
        for iface in &self.network_interfaces {
            iface.validate()?;
            if !iface_ids.insert(iface.iface_id.as_str()) {
                return Err(ModelError::DuplicateInterface(iface.iface_id.clone()));
            }
        }
        if let Some(logger) = &self.logger {
            logger.validate()?;
        }
        if let Some(metrics) = &self.metrics {
            metrics.validate()?;
        }
        if let Some(entropy) = &self.entropy {
            entropy.validate()?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate()?;
        }
        if let Some(mmds_config) = &self.mmds_config {
            mmds_config.validate()?;
            mmds_config.check_interfaces(&self.network_interfaces)?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        Ok(())
    }
}

/// A key of Firecracker's configuration that ember does not implement, present only as `null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Unsupported;

/// Defines a `deserialize_with` function that refuses anything but `null` (or `[]`) under `key`.
macro_rules! reject_key {
    ($name:ident, $key:literal) => {
        fn $name<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> std::result::Result<Unsupported, D::Error> {
            deserializer.deserialize_any(RejectVisitor($key))
        }
    };
}

reject_key!(reject_cpu_config, "cpu-config");
reject_key!(reject_memory_hotplug, "memory-hotplug");
reject_key!(reject_pmem, "pmem");

/// Accepts `null` and `[]`, and refuses any other value with a message that names the key.
struct RejectVisitor(&'static str);

impl RejectVisitor {
    fn refuse<E: de::Error>(&self) -> E {
        E::custom(format!(
            "\"{}\" is not supported by ember: remove it or set it to null",
            self.0
        ))
    }
}

impl<'de> Visitor<'de> for RejectVisitor {
    type Value = Unsupported;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "null: ember does not support \"{}\"", self.0)
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Unsupported, E> {
        Ok(Unsupported)
    }

    fn visit_none<E: de::Error>(self) -> std::result::Result<Unsupported, E> {
        Ok(Unsupported)
    }

    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Unsupported, A::Error> {
        match seq.next_element::<IgnoredAny>()? {
            None => Ok(Unsupported),
            Some(_) => Err(self.refuse()),
        }
    }

    fn visit_map<A: de::MapAccess<'de>>(
        self,
        _map: A,
    ) -> std::result::Result<Unsupported, A::Error> {
        Err(self.refuse())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<Unsupported, E> {
        Err(self.refuse())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Unsupported, E> {
        Err(self.refuse())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Unsupported, E> {
        Err(self.refuse())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Unsupported, E> {
        Err(self.refuse())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Unsupported, E> {
        Err(self.refuse())
    }
}

/// The kind of snapshot `PUT /snapshot/create` makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// The whole guest memory goes to the memory file.
    #[default]
    Full,
    /// Only the pages written since the last snapshot go to the memory file, at their
    /// offsets; the rest of the file is holes (`track_dirty_pages` must be on).
    Diff,
}

/// The body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the microVM's state goes.
    pub snapshot_path: String,
    /// Where the guest memory goes.
    pub mem_file_path: String,
}

impl SnapshotCreateParams {
    /// Checks that both paths are given.
    ///
    /// # Errors
    ///
    /// [`ModelError::EmptyPath`].
    pub fn validate(&self) -> Result<()> {
        validate_path("snapshot_path", Some(&self.snapshot_path))?;
        validate_path("mem_file_path", Some(&self.mem_file_path))
    }
}

/// Where a restored microVM's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// The memory file, mapped private: pages are read when the guest first touches them.
    File,
    /// A page-fault handler process, reached through a Unix socket, which is given the
    /// userfaultfd of the guest memory and serves its faults.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the Unix socket of the page-fault handler.
    pub backend_path: String,
}

/// One of `network_overrides` of `PUT /snapshot/load`: a restored interface on another TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as the snapshot names it.
    pub iface_id: String,
    /// The TAP it is to use.
    pub host_dev_name: String,
}

/// `vsock_override` of `PUT /snapshot/load`: the restored vsock device listens elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// Where ember listens for host-initiated connections.
    pub uds_path: String,
}

/// The body of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The microVM's state.
    pub snapshot_path: String,
    /// Firecracker's deprecated way to name the memory file; `mem_backend` is the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// Where the guest memory comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Tracks the pages the restored guest writes, for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resumes the microVM once it is loaded; otherwise it stays paused.
    #[serde(default)]
    pub resume_vm: bool,
    /// Interfaces restored on other TAPs.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock device's socket elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advances kvmclock by the wall-clock time since the snapshot; ember accepts only
    /// `false`.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages of the restored memory: ember accepts only "None" (a file mapping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl SnapshotLoadParams {
    /// The memory file or socket, and the backend: `mem_backend`, or the deprecated
    /// `mem_file_path`.
    pub fn memory_backend(&self) -> MemoryBackend {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(backend), _) => backend.clone(),
            (None, path) => MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: path.clone().unwrap_or_default(),
            },
        }
    }

    /// Whether the restored VM tracks dirty pages (either name of the field).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }

    /// Checks that exactly one memory source is given, the paths, the overrides, and refuses
    /// what ember cannot do.
    ///
    /// # Errors
    ///
    /// The [`ModelError`] naming the problem.
    pub fn validate(&self) -> Result<()> {
        validate_path("snapshot_path", Some(&self.snapshot_path))?;
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => return Err(ModelError::MemorySourceTwice),
            (None, None) => return Err(ModelError::MemorySourceMissing),
            (Some(backend), None) => validate_path("backend_path", Some(&backend.backend_path))?,
            (None, Some(path)) => validate_path("mem_file_path", Some(path))?,
        }
        let mut ids = HashSet::new();
        for net in &self.network_overrides {
            validate_id(&net.iface_id)?;
            validate_host_dev_name(&net.host_dev_name)?;
            if !ids.insert(net.iface_id.as_str()) {
                return Err(ModelError::DuplicateInterface(net.iface_id.clone()));
            }
        }
        if let Some(vsock) = &self.vsock_override {
            VsockConfig::new(MIN_GUEST_CID, vsock.uds_path.clone()).validate()?;
        }
        if self.clock_realtime {
            return Err(ModelError::ClockRealtime);
        }
        match self.huge_pages.as_deref() {
            None | Some("None" | "Snapshot") => Ok(()),
            Some(other) => Err(ModelError::SnapshotHugePages(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;

    use super::*;

    /// Deserializes `json`, serializes the result and deserializes that again: both values must be
    /// equal, and the second JSON must equal `json` once both are normalized.
    fn round_trip<T>(json: &str) -> T
    where
        T: DeserializeOwned + Serialize + PartialEq + fmt::Debug,
    {
        let value: T = serde_json::from_str(json).unwrap();
        let written = serde_json::to_string(&value).unwrap();
        let again: T = serde_json::from_str(&written).unwrap();
        assert_eq!(value, again);
        let expected: serde_json::Value = serde_json::from_str(json).unwrap();
        let actual: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(actual, expected, "{written}");
        value
    }

    fn error_of<T: DeserializeOwned + fmt::Debug>(json: &str) -> String {
        serde_json::from_str::<T>(json).unwrap_err().to_string()
    }

    #[test]
    fn ids_allow_only_ascii_alphanumerics_and_underscores() {
        validate_id("rootfs").unwrap();
        validate_id("Drive_1").unwrap();
        validate_id(&"a".repeat(MAX_ID_LEN)).unwrap();
        assert_eq!(validate_id(""), Err(ModelError::EmptyId));
        for id in ["a/b", "..", "a-b", "a b", "é", "a%2f", "x\0"] {
            assert_eq!(validate_id(id), Err(ModelError::InvalidId), "{id:?}");
        }
        assert_eq!(
            validate_id(&"a".repeat(MAX_ID_LEN + 1)),
            Err(ModelError::IdTooLong)
        );
        assert_eq!(
            ModelError::InvalidId.to_string(),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
    }

    #[test]
    fn boot_source_round_trips() {
        let boot: BootSource = round_trip(
            r#"{"kernel_image_path":"/k","initrd_path":"/i","boot_args":"console=ttyS0"}"#,
        );
        boot.validate().unwrap();
        let boot: BootSource = round_trip(r#"{"kernel_image_path":"/k"}"#);
        assert_eq!(boot.initrd_path, None);
    }

    #[test]
    fn boot_source_refuses_missing_unknown_and_empty_fields() {
        assert!(
            error_of::<BootSource>(r#"{"boot_args":"x"}"#)
                .contains("missing field `kernel_image_path`")
        );
        assert!(
            error_of::<BootSource>(r#"{"kernel_image_path":"/k","kernel":"x"}"#)
                .contains("unknown field `kernel`")
        );
        assert!(
            error_of::<BootSource>(r#"{"kernel_image_path":1}"#)
                .contains("invalid type: integer `1`, expected a string")
        );
        let boot: BootSource = serde_json::from_str(r#"{"kernel_image_path":""}"#).unwrap();
        assert_eq!(
            boot.validate().unwrap_err().to_string(),
            "The kernel_image_path cannot be empty."
        );
    }

    #[test]
    fn machine_configuration_round_trips_and_defaults() {
        let config: MachineConfiguration = round_trip(
            r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":false,
                "huge_pages":"Transparent","cpu_template":"None"}"#,
        );
        config.validate().unwrap();
        let config: MachineConfiguration =
            serde_json::from_str(r#"{"vcpu_count":1,"mem_size_mib":128}"#).unwrap();
        assert_eq!(config, MachineConfiguration::default());
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#
        );
    }

    #[test]
    fn machine_configuration_refuses_bad_shapes() {
        assert!(
            error_of::<MachineConfiguration>(r#"{"mem_size_mib":128}"#)
                .contains("missing field `vcpu_count`")
        );
        assert!(
            error_of::<MachineConfiguration>(r#"{"vcpu_count":1}"#)
                .contains("missing field `mem_size_mib`")
        );
        assert!(
            error_of::<MachineConfiguration>(r#"{"vcpu_count":256,"mem_size_mib":1}"#)
                .contains("expected u8")
        );
        assert!(
            error_of::<MachineConfiguration>(r#"{"vcpu_count":-1,"mem_size_mib":1}"#)
                .contains("expected u8")
        );
        assert!(
            error_of::<MachineConfiguration>(r#"{"vcpu_count":"2","mem_size_mib":1}"#)
                .contains("invalid type")
        );
        assert!(
            error_of::<MachineConfiguration>(
                r#"{"vcpu_count":1,"mem_size_mib":1,"huge_pages":"7M"}"#
            )
            .contains("unknown variant `7M`")
        );
        assert!(
            error_of::<MachineConfiguration>(r#"{"vcpu_count":1,"mem_size_mib":1,"gdb":"x"}"#)
                .contains("unknown field `gdb`")
        );
    }

    #[test]
    fn machine_configuration_refuses_what_ember_cannot_honour() {
        let base = MachineConfiguration::default();
        let cases = [
            (
                MachineConfiguration {
                    vcpu_count: 0,
                    ..base.clone()
                },
                ModelError::VcpuCount(0),
            ),
            (
                MachineConfiguration {
                    vcpu_count: 33,
                    ..base.clone()
                },
                ModelError::VcpuCount(33),
            ),
            (
                MachineConfiguration {
                    mem_size_mib: 0,
                    ..base.clone()
                },
                ModelError::ZeroMemory,
            ),
            (
                MachineConfiguration {
                    mem_size_mib: u64::MAX,
                    ..base.clone()
                },
                ModelError::MemoryTooLarge(u64::MAX),
            ),
            (
                MachineConfiguration {
                    smt: true,
                    ..base.clone()
                },
                ModelError::Smt,
            ),
            (
                MachineConfiguration {
                    cpu_template: Some(CpuTemplate::T2),
                    ..base.clone()
                },
                ModelError::CpuTemplate(CpuTemplate::T2),
            ),
            (
                MachineConfiguration {
                    huge_pages: HugePages::Hugetlbfs2M,
                    ..base.clone()
                },
                ModelError::HugetlbfsPages,
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(config.validate(), Err(expected), "{config:?}");
        }
        MachineConfiguration {
            vcpu_count: MAX_VCPUS,
            ..base
        }
        .validate()
        .unwrap();
        assert_eq!(
            ModelError::CpuTemplate(CpuTemplate::T2).to_string(),
            "The CPU template \"T2\" is not supported by ember: only \"None\" is accepted."
        );
    }

    #[test]
    fn machine_configuration_update_round_trips_and_applies() {
        let update: MachineConfigurationUpdate = round_trip(r#"{"vcpu_count":4}"#);
        assert!(!update.is_empty());
        update.validate().unwrap();
        let updated = MachineConfiguration::default().update(&update).unwrap();
        assert_eq!(updated.vcpu_count, 4);
        assert_eq!(updated.mem_size_mib, DEFAULT_MEM_SIZE_MIB);

        let empty: MachineConfigurationUpdate = round_trip("{}");
        assert!(empty.is_empty());

        let bad: MachineConfigurationUpdate =
            serde_json::from_str(r#"{"mem_size_mib":0}"#).unwrap();
        assert_eq!(bad.validate(), Err(ModelError::ZeroMemory));
        assert_eq!(
            MachineConfiguration::default().update(&bad),
            Err(ModelError::ZeroMemory)
        );
        let smt: MachineConfigurationUpdate = serde_json::from_str(r#"{"smt":true}"#).unwrap();
        assert_eq!(smt.validate(), Err(ModelError::Smt));
        assert!(
            error_of::<MachineConfigurationUpdate>(r#"{"vcpus":1}"#)
                .contains("unknown field `vcpus`")
        );
    }

    #[test]
    fn token_buckets_of_zero_do_not_limit() {
        let bucket: TokenBucket =
            round_trip(r#"{"size":1000,"one_time_burst":10,"refill_time":100}"#);
        assert!(bucket.limits());
        let zero_size: TokenBucket = round_trip(r#"{"size":0,"refill_time":100}"#);
        assert!(!zero_size.limits());
        let zero_time: TokenBucket = round_trip(r#"{"size":10,"refill_time":0}"#);
        assert!(!zero_time.limits());
        zero_time.validate().unwrap();
    }

    #[test]
    fn token_buckets_refuse_bad_shapes_and_huge_refill_times() {
        assert!(error_of::<TokenBucket>(r#"{"size":100}"#).contains("missing field `refill_time`"));
        assert!(error_of::<TokenBucket>(r#"{"size":-1,"refill_time":1}"#).contains("expected u64"));
        assert!(
            error_of::<TokenBucket>(r#"{"size":1,"refill_time":1,"rate":1}"#)
                .contains("unknown field `rate`")
        );
        let huge = TokenBucket {
            size: 1,
            one_time_burst: None,
            refill_time: u64::MAX / 1000,
        };
        assert_eq!(
            huge.validate(),
            Err(ModelError::RefillTime(u64::MAX / 1000))
        );
        let limiter = RateLimiter {
            bandwidth: None,
            ops: Some(huge),
        };
        assert!(limiter.validate().is_err());
    }

    #[test]
    fn rate_limiters_round_trip() {
        let limiter: RateLimiter = round_trip(
            r#"{"bandwidth":{"size":1048576,"refill_time":1000},"ops":{"size":100,"one_time_burst":50,"refill_time":1000}}"#,
        );
        limiter.validate().unwrap();
        let empty: RateLimiter = round_trip("{}");
        assert_eq!(empty, RateLimiter::default());
        assert!(error_of::<RateLimiter>(r#"{"iops":{}}"#).contains("unknown field `iops`"));
    }

    #[test]
    fn drives_round_trip() {
        let drive: Drive = round_trip(
            r#"{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,
                "is_read_only":true,"partuuid":"0eaa91a0-01","cache_type":"Writeback",
                "io_engine":"Sync","rate_limiter":{"ops":{"size":10,"refill_time":10}}}"#,
        );
        drive.validate().unwrap();
        assert!(drive.read_only());
        let drive: Drive = serde_json::from_str(
            r#"{"drive_id":"data","path_on_host":"/d","is_root_device":false}"#,
        )
        .unwrap();
        drive.validate().unwrap();
        assert!(!drive.read_only());
        assert_eq!(drive.cache_type, CacheType::Unsafe);
        // Serialized, the default cache type is written out.
        assert_eq!(
            serde_json::to_string(&drive).unwrap(),
            r#"{"drive_id":"data","is_root_device":false,"cache_type":"Unsafe","path_on_host":"/d","io_engine":"Sync"}"#
        );
    }

    #[test]
    fn drives_refuse_what_ember_cannot_honour() {
        let drive = |extra: &str| -> Drive {
            serde_json::from_str(&format!(
                r#"{{"drive_id":"d","is_root_device":false{extra}}}"#
            ))
            .unwrap()
        };
        assert_eq!(
            drive(r#","socket":"/vhost.sock""#).validate(),
            Err(ModelError::VhostUserBlock)
        );
        assert_eq!(
            drive(r#","path_on_host":"/d","socket":"/s""#).validate(),
            Err(ModelError::VhostUserBlock)
        );
        assert_eq!(drive("").validate(), Err(ModelError::MissingDrivePath));
        assert_eq!(
            drive(r#","path_on_host":"""#).validate(),
            Err(ModelError::EmptyPath("path_on_host"))
        );
        // The Async engine is accepted, and written out.
        let async_drive = drive(r#","path_on_host":"/d","io_engine":"Async""#);
        assert_eq!(async_drive.validate(), Ok(()));
        assert_eq!(async_drive.io_engine, IoEngine::Async);
        assert!(
            serde_json::to_string(&async_drive)
                .unwrap()
                .contains(r#""io_engine":"Async""#)
        );
        let mut bad_id = drive(r#","path_on_host":"/d""#);
        bad_id.drive_id = "../etc".into();
        assert_eq!(bad_id.validate(), Err(ModelError::InvalidId));
        assert!(
            ModelError::VhostUserBlock
                .to_string()
                .contains("vhost-user")
        );
    }

    #[test]
    fn drives_refuse_bad_shapes() {
        assert!(
            error_of::<Drive>(r#"{"drive_id":"d","path_on_host":"/d"}"#)
                .contains("missing field `is_root_device`")
        );
        assert!(
            error_of::<Drive>(r#"{"drive_id":"d","is_root_device":"yes"}"#)
                .contains("invalid type: string \"yes\", expected a boolean")
        );
        assert!(
            error_of::<Drive>(r#"{"drive_id":"d","is_root_device":true,"cache_type":"None"}"#)
                .contains("unknown variant `None`, expected `Unsafe` or `Writeback`")
        );
        assert!(
            error_of::<Drive>(r#"{"drive_id":"d","is_root_device":true,"direct":true}"#)
                .contains("unknown field `direct`")
        );
    }

    #[test]
    fn partial_drives_round_trip_and_are_checked() {
        let patch: PartialDrive = round_trip(r#"{"drive_id":"d","path_on_host":"/new"}"#);
        patch.validate().unwrap();
        let patch: PartialDrive = round_trip(
            r#"{"drive_id":"d","rate_limiter":{"bandwidth":{"size":0,"refill_time":0}}}"#,
        );
        patch.validate().unwrap();
        assert!(
            error_of::<PartialDrive>(r#"{"drive_id":"d","is_read_only":true}"#)
                .contains("unknown field `is_read_only`")
        );
        assert!(
            error_of::<PartialDrive>(r#"{"path_on_host":"/x"}"#)
                .contains("missing field `drive_id`")
        );
        let empty: PartialDrive =
            serde_json::from_str(r#"{"drive_id":"d","path_on_host":""}"#).unwrap();
        assert_eq!(empty.validate(), Err(ModelError::EmptyPath("path_on_host")));
    }

    #[test]
    fn network_interfaces_round_trip() {
        let iface: NetworkInterface = round_trip(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02",
                "rx_rate_limiter":{"bandwidth":{"size":1,"refill_time":1}},
                "tx_rate_limiter":{"ops":{"size":1,"refill_time":1}}}"#,
        );
        iface.validate().unwrap();
        let iface: NetworkInterface = round_trip(r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#);
        iface.validate().unwrap();
    }

    #[test]
    fn network_interfaces_refuse_bad_values() {
        let iface = |name: &str, mac: Option<&str>| NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: name.into(),
            guest_mac: mac.map(Into::into),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        for name in ["", "a/b", "sixteen_chars_xx", "a\0b"] {
            assert_eq!(
                iface(name, None).validate(),
                Err(ModelError::HostDevName),
                "{name:?}"
            );
        }
        iface("fifteen_chars_x", None).validate().unwrap();
        for mac in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "06-00-ac-10-00-02",
            "g6:00:ac:10:00:02",
            "6:00:ac:10:00:02",
        ] {
            assert_eq!(
                iface("tap0", Some(mac)).validate(),
                Err(ModelError::GuestMac(mac.into())),
                "{mac:?}"
            );
        }
        let mut with_mtu = iface("tap0", None);
        with_mtu.mtu = Some(1500);
        assert_eq!(with_mtu.validate(), Err(ModelError::Mtu));
        assert!(
            error_of::<NetworkInterface>(r#"{"iface_id":"e"}"#)
                .contains("missing field `host_dev_name`")
        );
        assert!(
            error_of::<NetworkInterface>(r#"{"iface_id":"e","host_dev_name":"t","mtu":70000}"#)
                .contains("expected u16")
        );
    }

    #[test]
    fn partial_network_interfaces_round_trip_and_are_checked() {
        let patch: PartialNetworkInterface = round_trip(
            r#"{"iface_id":"eth0","rx_rate_limiter":{"ops":{"size":5,"refill_time":5}}}"#,
        );
        patch.validate().unwrap();
        assert!(
            error_of::<PartialNetworkInterface>(r#"{"iface_id":"e","host_dev_name":"t"}"#)
                .contains("unknown field `host_dev_name`")
        );
        let bad = PartialNetworkInterface {
            iface_id: "a.b".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert_eq!(bad.validate(), Err(ModelError::InvalidId));
    }

    #[test]
    fn actions_and_vm_states_round_trip() {
        for action in ["FlushMetrics", "InstanceStart", "SendCtrlAltDel"] {
            round_trip::<InstanceActionInfo>(&format!(r#"{{"action_type":"{action}"}}"#));
        }
        assert!(
            error_of::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#)
                .contains("unknown variant `Reboot`")
        );
        assert!(
            error_of::<InstanceActionInfo>(r#"{"action_type":"InstanceStart","payload":1}"#)
                .contains("unknown field `payload`")
        );
        assert_eq!(
            round_trip::<Vm>(r#"{"state":"Paused"}"#).state,
            VmState::Paused
        );
        assert_eq!(
            round_trip::<Vm>(r#"{"state":"Resumed"}"#).state,
            VmState::Resumed
        );
        assert!(error_of::<Vm>(r#"{"state":"Running"}"#).contains("unknown variant `Running`"));
        assert!(error_of::<Vm>("{}").contains("missing field `state`"));
    }

    #[test]
    fn loggers_read_levels_without_regard_to_case() {
        let logger: Logger = round_trip(
            r#"{"log_path":"/l","level":"Debug","show_level":true,"show_log_origin":false,"module":"ember::api"}"#,
        );
        logger.validate().unwrap();
        for (text, level) in [
            ("error", LogLevel::Error),
            ("WARNING", LogLevel::Warning),
            ("Warn", LogLevel::Warning),
            ("info", LogLevel::Info),
            ("dEbUg", LogLevel::Debug),
            ("trace", LogLevel::Trace),
            ("off", LogLevel::Off),
        ] {
            let logger: Logger = serde_json::from_str(&format!(r#"{{"level":"{text}"}}"#)).unwrap();
            assert_eq!(logger.level, Some(level));
        }
        assert!(error_of::<Logger>(r#"{"level":"loud"}"#).contains("unknown variant `loud`"));
        assert_eq!(round_trip::<Logger>("{}"), Logger::default());
        let empty: Logger = serde_json::from_str(r#"{"log_path":""}"#).unwrap();
        assert_eq!(empty.validate(), Err(ModelError::EmptyPath("log_path")));
    }

    #[test]
    fn metrics_round_trip() {
        let metrics: Metrics = round_trip(r#"{"metrics_path":"/m.fifo"}"#);
        metrics.validate().unwrap();
        assert!(error_of::<Metrics>("{}").contains("missing field `metrics_path`"));
        assert!(
            error_of::<Metrics>(r#"{"metrics_path":"/m","emit_id":true}"#)
                .contains("unknown field `emit_id`")
        );
    }

    #[test]
    fn instance_info_and_version_round_trip() {
        for state in ["Not started", "Running", "Paused"] {
            round_trip::<InstanceInfo>(&format!(
                r#"{{"app_name":"ember","id":"vm0","state":"{state}","vmm_version":"0.1.0"}}"#
            ));
        }
        let info = InstanceInfo {
            app_name: "ember".into(),
            id: "anonymous-instance".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0.1.0".into(),
        };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"app_name":"ember","id":"anonymous-instance","state":"Not started","vmm_version":"0.1.0"}"#
        );
        round_trip::<VmmVersion>(r#"{"firecracker_version":"1.0.0"}"#);
        round_trip::<FaultMessage>(r#"{"fault_message":"x"}"#);
    }

    #[test]
    fn full_configurations_round_trip() {
        let config: FullVmConfiguration = round_trip(
            r#"{
                "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
                "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true,
                            "cache_type": "Unsafe", "io_engine": "Async"}],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                                   "track_dirty_pages": false, "huge_pages": "None"},
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
                "logger": {"level": "Info"},
                "metrics": {"metrics_path": "/m"}
            }"#,
        );
        config.validate().unwrap();
        let empty: FullVmConfiguration = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, FullVmConfiguration::default());
        assert_eq!(
            serde_json::to_string(&empty).unwrap(),
            r#"{"drives":[],"network-interfaces":[]}"#
        );
    }

    #[test]
    fn full_configurations_accept_unimplemented_keys_only_when_null() {
        let config: FullVmConfiguration = serde_json::from_str(
            r#"{"cpu-config": null, "entropy": null, "memory-hotplug": null,
                "mmds-config": null, "pmem": [], "vsock": null}"#,
        )
        .unwrap();
        assert_eq!(config, FullVmConfiguration::default());
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"drives":[],"network-interfaces":[]}"#
        );
        for (key, value) in [
            ("pmem", r#"[{"id":"p","path_on_host":"/p"}]"#),
            ("cpu-config", r#""x""#),
        ] {
            let err = error_of::<FullVmConfiguration>(&format!(r#"{{"{key}": {value}}}"#));
            assert!(
                err.contains(&format!("\"{key}\" is not supported by ember")),
                "{key}: {err}"
            );
        }
        assert!(
            error_of::<FullVmConfiguration>(r#"{"serial": null}"#)
                .contains("unknown field `serial`")
        );
    }

    #[test]
    fn an_mmds_config_is_firecracker_s_and_checked() {
        let config: MmdsConfig =
            serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(config.version, ember_mmds::MmdsVersion::V1);
        assert_eq!((config.ipv4_address, config.imds_compat), (None, false));
        config.validate().unwrap();
        let config: MmdsConfig = serde_json::from_str(
            r#"{"version": "V2", "network_interfaces": ["eth0", "eth1"],
                "ipv4_address": "169.254.170.2", "imds_compat": true}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"version":"V2","network_interfaces":["eth0","eth1"],"ipv4_address":"169.254.170.2","imds_compat":true}"#
        );
        for (body, message) in [
            (r#"{"network_interfaces": []}"#, "is empty"),
            (
                r#"{"network_interfaces": ["a"], "ipv4_address": "10.0.0.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["a"], "ipv4_address": "169.254.0.1"}"#,
                "not link local",
            ),
            (
                r#"{"network_interfaces": ["a"], "ipv4_address": "169.254.255.1"}"#,
                "not link local",
            ),
        ] {
            let config: MmdsConfig = serde_json::from_str(body).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(message), "{body}: {err}");
        }
        for body in [
            r#"{}"#,
            r#"{"network_interfaces": ["a"], "version": "V3"}"#,
            r#"{"network_interfaces": ["a"], "ipv4_address": "169.254.1"}"#,
            r#"{"network_interfaces": ["a"], "extra": 1}"#,
        ] {
            assert!(serde_json::from_str::<MmdsConfig>(body).is_err(), "{body}");
        }
        // In a configuration file, the interfaces must be the file's.
        let file = r#"{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
                      "mmds-config": {"network_interfaces": ["eth0"]}}"#;
        let config: FullVmConfiguration = serde_json::from_str(file).unwrap();
        config.validate().unwrap();
        let config: FullVmConfiguration =
            serde_json::from_str(&file.replace(r#"["eth0"]}"#, r#"["eth1"]}"#)).unwrap();
        assert_eq!(config.validate(), Err(ModelError::MmdsUnknownInterface));
    }

    #[test]
    fn a_configuration_s_balloon_is_firecracker_s_and_checked() {
        let config: FullVmConfiguration = serde_json::from_str(
            r#"{"balloon": {"amount_mib": 64, "deflate_on_oom": true,
                             "stats_polling_interval_s": 5}}"#,
        )
        .unwrap();
        let balloon = config.balloon.unwrap();
        assert_eq!((balloon.amount_mib, balloon.deflate_on_oom), (64, true));
        assert_eq!(balloon.stats_polling_interval_s, 5);
        config.validate().unwrap();
        assert_eq!(
            serde_json::to_string(&balloon).unwrap(),
            r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":5}"#
        );
        let reporting: FullVmConfiguration = serde_json::from_str(
            r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false,
                             "free_page_reporting": true}}"#,
        )
        .unwrap();
        assert_eq!(
            reporting.validate(),
            Err(ModelError::BalloonFreePage("reporting"))
        );
        let huge = Balloon {
            amount_mib: u32::MAX,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hinting: false,
            free_page_reporting: false,
        };
        assert_eq!(huge.validate(), Err(ModelError::BalloonTooLarge));
        assert!(error_of::<BalloonUpdate>(r#"{"amount_mib": 1, "x": 2}"#).contains("x"));
        let stats = BalloonStats {
            target_pages: 256,
            target_mib: 1,
            free_memory: Some(4096),
            ..BalloonStats::default()
        };
        assert_eq!(
            serde_json::to_string(&stats).unwrap(),
            r#"{"target_pages":256,"actual_pages":0,"target_mib":1,"actual_mib":0,"free_memory":4096}"#
        );
    }

    #[test]
    fn full_configurations_refuse_duplicates_and_two_roots() {
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            partuuid: None,
            is_root_device: root,
            cache_type: CacheType::Unsafe,
            is_read_only: None,
            path_on_host: Some("/d".into()),
            rate_limiter: None,
            io_engine: IoEngine::Sync,
            socket: None,
        };
        let mut config = FullVmConfiguration {
            drives: vec![drive("a", true), drive("a", false)],
            ..FullVmConfiguration::default()
        };
        assert_eq!(
            config.validate(),
            Err(ModelError::DuplicateDrive("a".into()))
        );
        config.drives = vec![drive("a", true), drive("b", true)];
        assert_eq!(config.validate(), Err(ModelError::TwoRootDevices));
        config.drives = vec![drive("a", true), drive("b", false)];
        config.validate().unwrap();
        let iface = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        config.network_interfaces = vec![iface.clone(), iface];
        assert_eq!(
            config.validate(),
            Err(ModelError::DuplicateInterface("eth0".into()))
        );
        config.network_interfaces.clear();
        config.machine_config = Some(MachineConfiguration {
            smt: true,
            ..MachineConfiguration::default()
        });
        assert_eq!(config.validate(), Err(ModelError::Smt));
    }

    #[test]
    fn a_drive_file_that_is_not_a_file_or_block_device_is_refused() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-model-").unwrap();
        let at = |name: &str| dir.as_path().join(name).to_string_lossy().into_owned();
        let fifo = at("fifo");
        let c_fifo = std::ffi::CString::new(fifo.clone()).unwrap();
        // SAFETY: `c_fifo` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        let socket = at("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let link_to_dir = at("link");
        std::os::unix::fs::symlink(dir.as_path(), &link_to_dir).unwrap();
        for (path, kind) in [
            (at(""), "a directory"),
            (link_to_dir, "a directory"),
            (fifo, "a FIFO"),
            (socket, "a socket"),
            ("/dev/null".to_string(), "a character device"),
        ] {
            let err = check_drive_file(&path, true).unwrap_err();
            assert_eq!(
                err,
                ModelError::DriveFileKind {
                    path: path.clone(),
                    kind
                }
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "The drive file {path} is {kind}: a drive must be a regular file or a block device."
                )
            );
        }
        let file = at("disk.img");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(check_drive_file(&file, false), Ok(()));
        assert_eq!(check_drive_file_exists(&file), Ok(()));
        // Opening it will say why; PUT /drives asks for it to be there.
        assert_eq!(check_drive_file(&at("missing"), false), Ok(()));
        let missing = at("missing");
        assert_eq!(
            check_drive_file_exists(&missing),
            Err(ModelError::DriveFileMissing {
                path: missing.clone(),
                reason: "No such file or directory (os error 2)".into()
            })
        );
        assert_eq!(check_drive_file_exists(""), Ok(()));
    }

    #[test]
    fn a_drive_path_in_proc_self_fd_is_checked_as_the_descriptor() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-model-").unwrap();
        let image = dir.as_path().join("disk.img");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let read_only = std::fs::File::open(&image).unwrap();
        let fd_path = |file: &std::fs::File| {
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file))
        };
        let path = fd_path(&read_only);
        assert_eq!(check_drive_file(&path, true), Ok(()));
        assert_eq!(check_drive_file_exists(&path), Ok(()));
        let err = check_drive_file(&path, false).unwrap_err();
        assert!(
            matches!(&err, ModelError::DriveFd(text) if text.contains("not open for reading and writing")),
            "{err}"
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        let err = check_drive_file(&fd_path(&null), true).unwrap_err();
        assert!(
            err.to_string()
                .contains("neither a regular file nor a block device"),
            "{err}"
        );
        for bad in ["/proc/self/fd/x", "/proc/self/fd/1/../../../../etc/shadow"] {
            let err = check_drive_file(bad, true).unwrap_err();
            assert!(err.to_string().contains("descriptor number"), "{err}");
            assert!(check_drive_file_exists(bad).is_err());
        }
        let err = check_drive_file("/proc/self/fd/1073741824", true).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Cannot use the inherited descriptor 1073741824 as a disk image: "),
            "{err}"
        );
    }

    #[test]
    fn entropy_devices_round_trip_and_refuse_bad_limits() {
        let plain: EntropyDeviceConfig = round_trip("{}");
        assert_eq!(plain, EntropyDeviceConfig::default());
        plain.validate().unwrap();
        let limited: EntropyDeviceConfig =
            round_trip(r#"{"rate_limiter":{"bandwidth":{"size":131072,"refill_time":1000}}}"#);
        limited.validate().unwrap();
        assert!(error_of::<EntropyDeviceConfig>(r#"{"rate":1}"#).contains("unknown field `rate`"));
        assert!(
            error_of::<EntropyDeviceConfig>(r#"{"rate_limiter":{"bandwidth":{"size":1}}}"#)
                .contains("missing field `refill_time`")
        );
        let huge: EntropyDeviceConfig = serde_json::from_str(&format!(
            r#"{{"rate_limiter":{{"ops":{{"size":1,"refill_time":{}}}}}}}"#,
            u64::MAX
        ))
        .unwrap();
        assert_eq!(huge.validate(), Err(ModelError::RefillTime(u64::MAX)));
    }

    #[test]
    fn full_configurations_carry_the_entropy_device() {
        let config: FullVmConfiguration = serde_json::from_str(
            r#"{"entropy": {"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}}"#,
        )
        .unwrap();
        config.validate().unwrap();
        let entropy = config.entropy.unwrap();
        assert_eq!(entropy.rate_limiter.unwrap().ops.unwrap().size, 10);
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"drives":[],"network-interfaces":[],"entropy":{"rate_limiter":{"ops":{"size":10,"refill_time":100}}}}"#
        );
        let bad: FullVmConfiguration = serde_json::from_str(&format!(
            r#"{{"entropy": {{"rate_limiter": {{"ops": {{"size": 1, "refill_time": {}}}}}}}}}"#,
            u64::MAX
        ))
        .unwrap();
        assert!(bad.validate().is_err());
        assert!(error_of::<FullVmConfiguration>(r#"{"entropy": true}"#).contains("invalid type"));
    }

    #[test]
    fn vsock_devices_round_trip_and_refuse_reserved_cids_and_bad_paths() {
        let vsock: VsockConfig = round_trip(r#"{"guest_cid":3,"uds_path":"/v.sock"}"#);
        assert_eq!(vsock, VsockConfig::new(3, "/v.sock"));
        vsock.validate().unwrap();
        let old: VsockConfig = round_trip(r#"{"vsock_id":"vsock0","guest_cid":4,"uds_path":"v"}"#);
        assert_eq!(old.vsock_id.as_deref(), Some("vsock0"));
        old.validate().unwrap();
        VsockConfig::new(MAX_GUEST_CID, "v").validate().unwrap();

        for cid in [0, 1, 2, u32::MAX] {
            assert_eq!(
                VsockConfig::new(cid, "v").validate(),
                Err(ModelError::GuestCid(cid))
            );
        }
        let longest = "p".repeat(MAX_UDS_PATH_LEN);
        VsockConfig::new(3, longest.clone()).validate().unwrap();
        for path in [String::new(), format!("{longest}p"), "a\0b".to_string()] {
            assert_eq!(
                VsockConfig::new(3, path).validate(),
                Err(ModelError::UdsPath)
            );
        }
        assert!(error_of::<VsockConfig>(r#"{"guest_cid":3}"#).contains("missing field `uds_path`"));
        assert!(
            error_of::<VsockConfig>(r#"{"uds_path":"v"}"#).contains("missing field `guest_cid`")
        );
        assert!(
            error_of::<VsockConfig>(r#"{"guest_cid":-3,"uds_path":"v"}"#).contains("invalid value")
        );
        assert!(
            error_of::<VsockConfig>(r#"{"guest_cid":4294967296,"uds_path":"v"}"#)
                .contains("invalid value")
        );
        assert!(
            error_of::<VsockConfig>(r#"{"guest_cid":3,"uds_path":"v","port":1}"#)
                .contains("unknown field `port`")
        );
    }

    #[test]
    fn a_vsock_path_that_exists_is_refused() {
        let dir = std::env::temp_dir().join(format!("ember-model-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock").to_str().unwrap().to_string();
        let _ = std::fs::remove_file(&path);
        VsockConfig::new(3, path.clone())
            .check_uds_path_free()
            .unwrap();
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            VsockConfig::new(3, path.clone()).check_uds_path_free(),
            Err(ModelError::UdsPathExists(path.clone()))
        );
        // A dangling symbolic link is in the way too.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), &path).unwrap();
        assert!(
            VsockConfig::new(3, path.clone())
                .check_uds_path_free()
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_configurations_carry_the_vsock_device() {
        let config: FullVmConfiguration =
            serde_json::from_str(r#"{"vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#)
                .unwrap();
        config.validate().unwrap();
        assert_eq!(config.vsock, Some(VsockConfig::new(3, "/tmp/v.sock")));
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"drives":[],"network-interfaces":[],"vsock":{"guest_cid":3,"uds_path":"/tmp/v.sock"}}"#
        );
        let bad: FullVmConfiguration =
            serde_json::from_str(r#"{"vsock": {"guest_cid": 2, "uds_path": "v"}}"#).unwrap();
        assert_eq!(bad.validate(), Err(ModelError::GuestCid(2)));
        assert!(error_of::<FullVmConfiguration>(r#"{"vsock": 3}"#).contains("invalid type"));
    }
}
