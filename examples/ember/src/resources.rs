//! What a microVM is made of, before and while it runs: one description, whether it comes from
//! the command line, a configuration file or the API.
//!
//! The description is Firecracker's: [`FullVmConfiguration`], the body of `GET /vm/config`,
//! which is also the format of `--config-file`. The flags `--kernel`, `--disk`, `--net` and the
//! others fill in the same structure, so the VM is built one way whatever described it. What
//! Firecracker's configuration has no place for (the serial console's destination, the boot
//! timer, KSM) comes from the command line only.
//!
//! Drives keep Firecracker's order: the root device first (it is `/dev/vda`), the others in the
//! order they were added; putting a drive that exists replaces it where it is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::api::model::{
    self, BootSource, Drive, FullVmConfiguration, HugePages, MachineConfiguration,
    MachineConfigurationUpdate, ModelError, NetworkInterface,
};
use crate::cli::{Cli, DEFAULT_CMDLINE, DiskSpec, NetSpec, SerialOutput};

/// Why a description of a microVM is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value the API's checks refuse.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Two disks given with `--disk` have the same ID.
    #[error("Two disks have the ID {0}")]
    DuplicateDiskId(String),
    /// A disk other than the first is marked as the root device on the command line.
    #[error("Only the first disk can be the root device (/dev/vda); disk {0} is marked root")]
    RootNotFirst(String),
    /// The configuration file cannot be read.
    #[error("Cannot read the configuration file {}", path.display())]
    ReadConfig {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not a valid configuration.
    #[error("Invalid configuration file {}: {message}", path.display())]
    ParseConfig {
        /// Its path.
        path: PathBuf,
        /// What is wrong, as the JSON parser or the checks say it.
        message: String,
    },
    /// A snapshot's description cannot be taken: it is not valid, or an override does not fit
    /// it.
    #[error("Invalid microVM description in the snapshot: {0}")]
    Snapshot(String),
    /// `--metrics-path` and the configuration file's `metrics` both set the metrics; the
    /// message is Firecracker's.
    #[error("Reinitialization of metrics not allowed.")]
    MetricsTwice,
    /// The `--metadata` file cannot fill the MMDS data store; the text says why.
    #[error("{0}")]
    Metadata(String),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A microVM's description, and the few settings only the command line gives.
#[derive(Debug, Clone)]
pub struct VmResources {
    config: FullVmConfiguration,
    /// Where the guest's serial console goes.
    pub serial: SerialOutput,
    /// The most bytes a serial output file may hold; 0 for no cap.
    pub serial_max_bytes: u64,
    /// Whether the boot-timer device is attached.
    pub boot_timer: bool,
    /// Whether KSM may merge guest pages.
    pub ksm: bool,
    /// Whether guest memory stays in ember's core dumps.
    pub dump_guest_memory: bool,
    /// The seccomp filters the VMM's threads install; `None` runs without (`--no-seccomp`).
    pub seccomp: Option<std::sync::Arc<crate::seccomp::Filters>>,
    /// The MMDS data store, shared by the API and the network devices that serve it.
    mmds: Arc<Mutex<ember_mmds::Mmds>>,
}

impl VmResources {
    /// An empty description with Firecracker's default machine (1 vCPU, 128 MiB) and the
    /// command line's settings, to be filled in through the API.
    pub fn new(cli: &Cli) -> Self {
        let mut config = FullVmConfiguration::default();
        config.machine_config = Some(MachineConfiguration::default());
        VmResources {
            config,
            serial: cli.serial.clone(),
            serial_max_bytes: cli.serial_max_bytes,
            boot_timer: cli.boot_timer,
            ksm: cli.ksm,
            dump_guest_memory: cli.dump_guest_memory,
            seccomp: None,
            mmds: Arc::new(Mutex::new(ember_mmds::Mmds::new(cli.mmds_size_limit()))),
        }
    }

    /// The description the flags give (`--kernel` and the flags after it), or the
    /// configuration file's, or an empty one when the API is to give it.
    ///
    /// # Errors
    ///
    /// When the flags or the file describe a microVM the API would refuse.
    pub fn from_cli(cli: &Cli) -> Result<Self> {
        let mut resources = VmResources::new(cli);
        if let Some(path) = &cli.config_file {
            resources.load_config_file(path)?;
        } else if let Some(kernel) = &cli.kernel {
            resources.config.boot_source = Some(BootSource {
                kernel_image_path: path_string(kernel),
                initrd_path: cli.initrd.as_deref().map(path_string),
                boot_args: cli.cmdline.clone(),
            });
            let machine = MachineConfiguration {
                vcpu_count: cli.vcpus,
                mem_size_mib: cli.memory,
                huge_pages: if cli.hugepages {
                    HugePages::Transparent
                } else {
                    HugePages::None
                },
                ..MachineConfiguration::default()
            };
            resources.config.machine_config = Some(machine);
            resources.config.drives = drives_from_flags(&cli.disks)?;
            resources.config.network_interfaces = nets_from_flags(&cli.nets);
        }
        resources.apply_logging_flags(cli)?;
        if let Some(metadata) = cli.read_metadata().map_err(Error::Metadata)? {
            resources
                .put_mmds(metadata)
                .map_err(|e| Error::Metadata(e.to_string()))?;
        }
        Ok(resources)
    }

    /// The logger and metrics of `--log-path`, `--level`, `--metrics-path` and the like, as
    /// Firecracker applies them: before the configuration file's, whose `logger` fields take
    /// their place and whose `metrics` cannot be given as well.
    fn apply_logging_flags(&mut self, cli: &Cli) -> Result<()> {
        if let Some(mut logger) = cli.logger_config() {
            if let Some(file) = self.config.logger.take() {
                logger.log_path = file.log_path.or(logger.log_path);
                logger.level = file.level.or(logger.level);
                logger.show_level = file.show_level.or(logger.show_level);
                logger.show_log_origin = file.show_log_origin.or(logger.show_log_origin);
                logger.module = file.module.or(logger.module);
            }
            self.config.logger = Some(logger);
        }
        if let Some(metrics) = cli.metrics_config() {
            if self.config.metrics.is_some() {
                return Err(Error::MetricsTwice);
            }
            self.config.metrics = Some(metrics);
        }
        Ok(())
    }

    fn load_config_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |message: String| Error::ParseConfig {
            path: path.to_path_buf(),
            message,
        };
        let mut config: FullVmConfiguration =
            serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        config.validate().map_err(|e| parse_error(e.to_string()))?;
        for drive in &config.drives {
            model::check_drive_file(
                drive.path_on_host.as_deref().unwrap_or_default(),
                drive.read_only(),
            )
            .map_err(|e| parse_error(e.to_string()))?;
        }
        if let Some(vsock) = &mut config.vsock {
            vsock
                .check_uds_path_free()
                .map_err(|e| parse_error(e.to_string()))?;
            vsock.vsock_id = None;
        }
        if config.boot_source.is_none() {
            return Err(parse_error("it has no boot-source".into()));
        }
        if config.machine_config.is_none() {
            config.machine_config = Some(MachineConfiguration::default());
        }
        // The root device first, as when drives are put one by one.
        config.drives.sort_by_key(|drive| !drive.is_root_device);
        self.config = config;
        if let Some(mmds_config) = self.config.mmds_config.take() {
            self.set_mmds_config(mmds_config)?;
        }
        Ok(())
    }

    /// Whether nothing of the microVM was described yet, besides the logger and the metrics:
    /// what a snapshot load requires, as in Firecracker.
    pub fn is_pristine(&self) -> bool {
        let config = &self.config;
        config.boot_source.is_none()
            && config.drives.is_empty()
            && config.network_interfaces.is_empty()
            && config.balloon.is_none()
            && config.entropy.is_none()
            && config.vsock.is_none()
            && config.mmds_config.is_none()
            && config
                .machine_config
                .as_ref()
                .is_none_or(|m| *m == MachineConfiguration::default())
    }

    /// This process's settings (serial console, seccomp, logger, metrics, the MMDS store)
    /// with the microVM `config` a snapshot describes, its interfaces moved to the TAPs of
    /// `nets` and its vsock socket to `vsock_uds`, when given, tracking dirty pages when
    /// `track_dirty_pages`.
    ///
    /// # Errors
    ///
    /// When `config` is not valid, an override names no interface of it, or there is
    /// something at the vsock socket's path.
    pub fn restored(
        &self,
        config: &str,
        nets: &[model::NetworkOverride],
        vsock_uds: Option<&str>,
        track_dirty_pages: bool,
    ) -> Result<VmResources> {
        let invalid = |message: String| Error::Snapshot(message);
        let mut config: FullVmConfiguration =
            serde_json::from_str(config).map_err(|e| invalid(e.to_string()))?;
        for over in nets {
            let net = config
                .network_interfaces
                .iter_mut()
                .find(|net| net.iface_id == over.iface_id)
                .ok_or_else(|| {
                    invalid(format!(
                        "the network override names the interface {:?}, which the snapshot does not have",
                        over.iface_id
                    ))
                })?;
            net.host_dev_name.clone_from(&over.host_dev_name);
        }
        if let Some(path) = vsock_uds {
            let vsock = config.vsock.as_mut().ok_or_else(|| {
                invalid("the vsock override is for a snapshot without a vsock device".into())
            })?;
            vsock.uds_path = path.to_string();
        }
        config
            .machine_config
            .get_or_insert_with(MachineConfiguration::default)
            .track_dirty_pages = track_dirty_pages;
        config.validate().map_err(|e| invalid(e.to_string()))?;
        for drive in &config.drives {
            model::check_drive_file(
                drive.path_on_host.as_deref().unwrap_or_default(),
                drive.read_only(),
            )
            .map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(vsock) = &config.vsock {
            vsock
                .check_uds_path_free()
                .map_err(|e| invalid(e.to_string()))?;
        }
        // This process's logger and metrics, not the snapshotted one's.
        config.logger.clone_from(&self.config.logger);
        config.metrics.clone_from(&self.config.metrics);
        let mmds_config = config.mmds_config.take();
        let mut resources = self.clone();
        resources.config = config;
        if let Some(mmds_config) = mmds_config {
            resources.set_mmds_config(mmds_config)?;
        }
        Ok(resources)
    }

    /// The whole description, as `GET /vm/config` returns it.
    pub fn vm_config(&self) -> &FullVmConfiguration {
        &self.config
    }

    /// Whether there is a kernel to boot.
    pub fn boot_source(&self) -> Option<&BootSource> {
        self.config.boot_source.as_ref()
    }

    /// vCPUs and memory.
    pub fn machine(&self) -> MachineConfiguration {
        self.config.machine_config.clone().unwrap_or_default()
    }

    /// The drives, the root device first.
    pub fn drives(&self) -> &[Drive] {
        &self.config.drives
    }

    /// The network interfaces, in the order they were added.
    pub fn nets(&self) -> &[NetworkInterface] {
        &self.config.network_interfaces
    }

    /// The kernel command line: the boot source's, or ember's default, then `root=` for the
    /// root drive.
    pub fn cmdline(&self) -> (String, Vec<String>) {
        let base = self
            .config
            .boot_source
            .as_ref()
            .and_then(|b| b.boot_args.clone())
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        let mut extra = Vec::new();
        if let Some(root) = self.config.drives.first().filter(|d| d.is_root_device) {
            extra.push(match &root.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            });
            extra.push(if root.read_only() { "ro" } else { "rw" }.to_string());
        }
        (base, extra)
    }

    /// `PUT /boot-source`.
    ///
    /// # Errors
    ///
    /// When a path is empty.
    pub fn set_boot_source(&mut self, boot_source: BootSource) -> Result<()> {
        boot_source.validate()?;
        self.config.boot_source = Some(boot_source);
        Ok(())
    }

    /// `PUT /machine-config`.
    ///
    /// # Errors
    ///
    /// When a value is out of range or asks for what ember cannot do.
    pub fn set_machine(&mut self, machine: MachineConfiguration) -> Result<()> {
        machine.validate()?;
        self.config.machine_config = Some(machine);
        Ok(())
    }

    /// `PATCH /machine-config`: the fields given replace the current ones.
    ///
    /// # Errors
    ///
    /// When the result would be refused by [`set_machine`](Self::set_machine).
    pub fn update_machine(&mut self, update: &MachineConfigurationUpdate) -> Result<()> {
        let machine = self.machine().update(update)?;
        self.config.machine_config = Some(machine);
        Ok(())
    }

    /// `PUT /drives/{id}`: adds the drive, or replaces the one with its ID. Its file must be
    /// there already (a path in a jail that leads out of it is not): it is refused now, as
    /// Firecracker refuses it, rather than at `InstanceStart`.
    ///
    /// # Errors
    ///
    /// When the drive is refused, it is a root device and another drive already is, or its
    /// file cannot be found.
    pub fn put_drive(&mut self, drive: Drive) -> Result<()> {
        drive.validate()?;
        model::check_drive_file(
            drive.path_on_host.as_deref().unwrap_or_default(),
            drive.read_only(),
        )?;
        let drives = &mut self.config.drives;
        let existing = drives.iter().position(|d| d.drive_id == drive.drive_id);
        if drive.is_root_device
            && drives
                .iter()
                .any(|d| d.is_root_device && d.drive_id != drive.drive_id)
        {
            return Err(ModelError::TwoRootDevices.into());
        }
        model::check_drive_file_exists(drive.path_on_host.as_deref().unwrap_or_default())?;
        match existing {
            // A drive that becomes the root device moves to the front.
            Some(index) if drive.is_root_device => {
                drives.remove(index);
                drives.insert(0, drive);
            }
            Some(index) => {
                if let Some(slot) = drives.get_mut(index) {
                    *slot = drive;
                }
            }
            None if drive.is_root_device => drives.insert(0, drive),
            None => drives.push(drive),
        }
        Ok(())
    }

    /// Records what `PATCH /drives/{id}` changed on a running drive.
    pub fn patched_drive(&mut self, update: &model::PartialDrive) {
        if let Some(drive) = self
            .config
            .drives
            .iter_mut()
            .find(|d| d.drive_id == update.drive_id)
        {
            if let Some(path) = &update.path_on_host {
                drive.path_on_host = Some(path.clone());
            }
            if let Some(limiter) = update.rate_limiter {
                drive.rate_limiter = Some(merge_limiter(drive.rate_limiter, limiter));
            }
        }
    }

    /// `PUT /network-interfaces/{id}`: adds the interface, or replaces the one with its ID.
    ///
    /// # Errors
    ///
    /// When the interface is refused.
    pub fn put_net(&mut self, net: NetworkInterface) -> Result<()> {
        net.validate()?;
        let nets = &mut self.config.network_interfaces;
        match nets.iter_mut().find(|n| n.iface_id == net.iface_id) {
            Some(slot) => *slot = net,
            None => nets.push(net),
        }
        Ok(())
    }

    /// Records what `PATCH /network-interfaces/{id}` changed on a running interface.
    pub fn patched_net(&mut self, update: &model::PartialNetworkInterface) {
        if let Some(net) = self
            .config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
        {
            if let Some(limiter) = update.rx_rate_limiter {
                net.rx_rate_limiter = Some(merge_limiter(net.rx_rate_limiter, limiter));
            }
            if let Some(limiter) = update.tx_rate_limiter {
                net.tx_rate_limiter = Some(merge_limiter(net.tx_rate_limiter, limiter));
            }
        }
    }

    /// The entropy device, if there is one.
    pub fn entropy(&self) -> Option<&model::EntropyDeviceConfig> {
        self.config.entropy.as_ref()
    }

    /// `PUT /entropy`: adds the entropy device, or replaces it (a microVM has at most one).
    ///
    /// # Errors
    ///
    /// When its rate limiter is refused.
    pub fn put_entropy(&mut self, entropy: model::EntropyDeviceConfig) -> Result<()> {
        entropy.validate()?;
        self.config.entropy = Some(entropy);
        Ok(())
    }

    /// The vsock device, if there is one.
    pub fn vsock(&self) -> Option<&model::VsockConfig> {
        self.config.vsock.as_ref()
    }

    /// `PUT /vsock`: adds the vsock device, or replaces it (a microVM has at most one). Its
    /// socket is created when the microVM starts; nothing may be at its path now.
    ///
    /// # Errors
    ///
    /// When the CID or the path is refused, or the path exists.
    pub fn put_vsock(&mut self, vsock: model::VsockConfig) -> Result<()> {
        vsock.validate()?;
        vsock.check_uds_path_free()?;
        self.config.vsock = Some(model::VsockConfig {
            vsock_id: None,
            ..vsock
        });
        Ok(())
    }

    /// The balloon device, if one was put.
    pub fn balloon(&self) -> Option<&model::Balloon> {
        self.config.balloon.as_ref()
    }

    /// `PUT /balloon`: creates the balloon or replaces it.
    ///
    /// # Errors
    ///
    /// When the balloon is refused, or its target is more than the guest's memory.
    pub fn put_balloon(&mut self, balloon: model::Balloon) -> Result<()> {
        balloon.validate()?;
        self.check_balloon_amount(balloon.amount_mib)?;
        self.config.balloon = Some(balloon);
        Ok(())
    }

    /// `PATCH /balloon` before boot, and the record of one after: the new target.
    ///
    /// # Errors
    ///
    /// When there is no balloon, or the target is more than the guest's memory.
    pub fn update_balloon(&mut self, update: &model::BalloonUpdate) -> Result<()> {
        update.validate()?;
        self.check_balloon_amount(update.amount_mib)?;
        let balloon = self.config.balloon.as_mut().ok_or(ModelError::NoBalloon)?;
        balloon.amount_mib = update.amount_mib;
        Ok(())
    }

    /// `PATCH /balloon/statistics` before boot, and the record of one after: the new polling
    /// interval.
    ///
    /// # Errors
    ///
    /// When there is no balloon.
    pub fn update_balloon_stats(&mut self, update: &model::BalloonStatsUpdate) -> Result<()> {
        let balloon = self.config.balloon.as_mut().ok_or(ModelError::NoBalloon)?;
        balloon.stats_polling_interval_s = update.stats_polling_interval_s;
        Ok(())
    }

    /// Refuses a balloon target larger than the guest's memory, as Firecracker does.
    fn check_balloon_amount(&self, amount_mib: u32) -> Result<()> {
        if u64::from(amount_mib) > self.machine().mem_size_mib {
            return Err(ModelError::BalloonTooLarge.into());
        }
        Ok(())
    }

    /// The MMDS configuration, once `PUT /mmds/config` (or the configuration file) gave one;
    /// its `ipv4_address` is then always set ([`model::DEFAULT_MMDS_ADDRESS`] when none was
    /// given).
    pub fn mmds_config(&self) -> Option<&model::MmdsConfig> {
        self.config.mmds_config.as_ref()
    }

    /// The MMDS data store, shared by the API and the network devices that serve it.
    pub fn mmds(&self) -> &Arc<Mutex<ember_mmds::Mmds>> {
        &self.mmds
    }

    /// The MMDS data store, locked. Every change to it is whole or not made, so a panic while
    /// it was locked leaves it usable.
    pub fn locked_mmds(&self) -> std::sync::MutexGuard<'_, ember_mmds::Mmds> {
        self.mmds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `PUT /mmds`: replaces the MMDS data store's content.
    ///
    /// # Errors
    ///
    /// When the content is larger than the store's limit; the store is then unchanged.
    pub fn put_mmds(&self, value: serde_json::Value) -> ember_mmds::data_store::Result<()> {
        self.locked_mmds().put(value)
    }

    /// `PUT /mmds/config`: the MMDS version, address and interfaces. The version (and the
    /// IMDS-compatible mode) applies to the data store at once.
    ///
    /// # Errors
    ///
    /// When the configuration is refused, or names an interface that was not put.
    pub fn set_mmds_config(&mut self, mut mmds_config: model::MmdsConfig) -> Result<()> {
        mmds_config.validate()?;
        mmds_config.check_interfaces(&self.config.network_interfaces)?;
        mmds_config
            .ipv4_address
            .get_or_insert(model::DEFAULT_MMDS_ADDRESS);
        {
            let mut mmds = self.locked_mmds();
            mmds.set_version(mmds_config.version);
            mmds.set_imds_compat(mmds_config.imds_compat);
        }
        self.config.mmds_config = Some(mmds_config);
        Ok(())
    }

    /// `PUT /logger`, recorded for `GET /vm/config`.
    pub fn set_logger(&mut self, logger: model::Logger) {
        self.config.logger = Some(logger);
    }

    /// `PUT /metrics`, recorded for `GET /vm/config`.
    pub fn set_metrics(&mut self, metrics: model::Metrics) {
        self.config.metrics = Some(metrics);
    }
}

/// A limiter after an update: the buckets the update gives replace the old ones, a bucket that
/// no longer limits (size or refill time 0) goes, the others stay.
pub fn merge_limiter(
    old: Option<model::RateLimiter>,
    update: model::RateLimiter,
) -> model::RateLimiter {
    let merge = |old: Option<model::TokenBucket>, new: Option<model::TokenBucket>| match new {
        Some(bucket) if bucket.limits() => Some(bucket),
        Some(_) => None,
        None => old,
    };
    let old = old.unwrap_or_default();
    model::RateLimiter {
        bandwidth: merge(old.bandwidth, update.bandwidth),
        ops: merge(old.ops, update.ops),
    }
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The `--disk` flags as drives: IDs `diskN` unless given, distinct, and only the first may be
/// the root device (the flags name `/dev/vda` by their order).
fn drives_from_flags(disks: &[DiskSpec]) -> Result<Vec<Drive>> {
    let mut drives: Vec<Drive> = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("disk{index}"));
        if drives.iter().any(|d| d.drive_id == id) {
            return Err(Error::DuplicateDiskId(id));
        }
        if index > 0 && disk.root {
            return Err(Error::RootNotFirst(id));
        }
        model::check_drive_file(&path_string(&disk.path), disk.read_only)?;
        drives.push(Drive {
            drive_id: id,
            partuuid: None,
            is_root_device: disk.root,
            cache_type: model::CacheType::default(),
            is_read_only: Some(disk.read_only),
            path_on_host: Some(path_string(&disk.path)),
            rate_limiter: None,
            io_engine: model::IoEngine::Sync,
            socket: None,
        });
    }
    Ok(drives)
}

/// The `--net` flags as network interfaces `netN`.
fn nets_from_flags(nets: &[NetSpec]) -> Vec<NetworkInterface> {
    nets.iter()
        .enumerate()
        .map(|(index, net)| NetworkInterface {
            iface_id: format!("net{index}"),
            host_dev_name: net.tap.clone(),
            guest_mac: net.mac.map(|mac| mac.to_string()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(["ember"].iter().chain(args)).unwrap()
    }

    fn drive(id: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            partuuid: None,
            is_root_device: root,
            cache_type: model::CacheType::default(),
            is_read_only: None,
            // A file that is there: a drive's file must be.
            path_on_host: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into()),
            rate_limiter: None,
            io_engine: model::IoEngine::Sync,
            socket: None,
        }
    }

    fn ids(resources: &VmResources) -> Vec<&str> {
        resources
            .drives()
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect()
    }

    #[test]
    fn flags_describe_the_same_vm_as_the_api_would() {
        let resources = VmResources::from_cli(&cli(&[
            "--kernel",
            "vmlinux",
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--disk",
            "root.ext4,root,ro",
            "--disk",
            "data.img,id=data",
            "--net",
            "tap=tap0,mac=06:00:00:00:00:01",
        ]))
        .unwrap();
        let config = resources.vm_config();
        let boot = config.boot_source.as_ref().unwrap();
        assert_eq!(boot.kernel_image_path, "vmlinux");
        assert_eq!(boot.boot_args, None);
        let machine = resources.machine();
        assert_eq!((machine.vcpu_count, machine.mem_size_mib), (2, 256));
        assert_eq!(ids(&resources), ["disk0", "data"]);
        assert!(resources.drives()[0].is_root_device && resources.drives()[0].read_only());
        assert_eq!(resources.nets()[0].iface_id, "net0");
        assert_eq!(resources.nets()[0].host_dev_name, "tap0");
        assert_eq!(
            resources.nets()[0].guest_mac.as_deref(),
            Some("06:00:00:00:00:01")
        );
        assert_eq!(
            resources.cmdline(),
            (
                DEFAULT_CMDLINE.to_string(),
                vec!["root=/dev/vda".into(), "ro".into()]
            )
        );
    }

    #[test]
    fn disk_flags_keep_their_rules() {
        let err = VmResources::from_cli(&cli(&[
            "--kernel", "k", "--disk", "a,id=x", "--disk", "b,id=x",
        ]))
        .unwrap_err();
        assert!(matches!(err, Error::DuplicateDiskId(id) if id == "x"));
        // A default name counts too.
        let err = VmResources::from_cli(&cli(&[
            "--kernel",
            "k",
            "--disk",
            "a,id=disk1",
            "--disk",
            "b",
        ]))
        .unwrap_err();
        assert!(matches!(err, Error::DuplicateDiskId(id) if id == "disk1"));
        let err =
            VmResources::from_cli(&cli(&["--kernel", "k", "--disk", "a", "--disk", "b,root"]))
                .unwrap_err();
        assert!(matches!(err, Error::RootNotFirst(id) if id == "disk1"));
    }

    #[test]
    fn the_root_drive_goes_first_and_a_put_replaces_in_place() {
        let mut resources = VmResources::new(&cli(&["--api-sock", "s"]));
        resources.put_drive(drive("data", false)).unwrap();
        resources.put_drive(drive("scratch", false)).unwrap();
        resources.put_drive(drive("rootfs", true)).unwrap();
        assert_eq!(ids(&resources), ["rootfs", "data", "scratch"]);
        let mut replaced = drive("data", false);
        replaced.is_read_only = Some(true);
        resources.put_drive(replaced).unwrap();
        assert_eq!(ids(&resources), ["rootfs", "data", "scratch"]);
        assert!(resources.drives()[1].read_only());
        // A second root device is refused, and nothing changes.
        let before = resources.vm_config().clone();
        let err = resources.put_drive(drive("other", true)).unwrap_err();
        assert!(matches!(err, Error::Model(ModelError::TwoRootDevices)));
        assert_eq!(resources.vm_config(), &before);
        // The root device itself may be put again.
        resources.put_drive(drive("rootfs", true)).unwrap();
        assert_eq!(ids(&resources), ["rootfs", "data", "scratch"]);
    }

    #[test]
    fn a_partuuid_names_the_root_partition() {
        let mut resources = VmResources::new(&cli(&["--api-sock", "s"]));
        let mut root = drive("rootfs", true);
        root.partuuid = Some("0eaa91a0-01".into());
        resources.put_drive(root).unwrap();
        assert_eq!(resources.cmdline().1, ["root=PARTUUID=0eaa91a0-01", "rw"]);
    }

    #[test]
    fn a_limiter_update_replaces_only_the_buckets_it_gives() {
        let bucket = |size| model::TokenBucket {
            size,
            one_time_burst: None,
            refill_time: 1000,
        };
        let old = model::RateLimiter {
            bandwidth: Some(bucket(1)),
            ops: Some(bucket(2)),
        };
        let merged = merge_limiter(
            Some(old),
            model::RateLimiter {
                bandwidth: Some(bucket(3)),
                ops: None,
            },
        );
        assert_eq!(merged.bandwidth, Some(bucket(3)));
        assert_eq!(merged.ops, Some(bucket(2)));
        let disabled = merge_limiter(
            Some(old),
            model::RateLimiter {
                bandwidth: Some(bucket(0)),
                ops: None,
            },
        );
        assert_eq!(disabled.bandwidth, None);
        assert_eq!(disabled.ops, Some(bucket(2)));
    }

    #[test]
    fn a_config_file_loads_with_the_root_drive_first() {
        let dir = std::env::temp_dir().join(format!("ember-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.json");
        std::fs::write(
            &path,
            r#"{
                "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0"},
                "drives": [
                    {"drive_id": "data", "path_on_host": "d.img", "is_root_device": false},
                    {"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": true}
                ],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 512}
            }"#,
        )
        .unwrap();
        let path_arg = path.to_str().unwrap();
        let resources = VmResources::from_cli(&cli(&["--config-file", path_arg])).unwrap();
        assert_eq!(ids(&resources), ["rootfs", "data"]);
        assert_eq!(resources.machine().vcpu_count, 2);
        assert_eq!(resources.cmdline().0, "console=ttyS0");

        std::fs::write(
            &path,
            r#"{"boot-source": {"kernel_image_path": "k"}, "drivez": []}"#,
        )
        .unwrap();
        let err = VmResources::from_cli(&cli(&["--config-file", path_arg])).unwrap_err();
        assert!(err.to_string().contains("drivez"), "{err}");
        std::fs::write(&path, r#"{"drives": []}"#).unwrap();
        let err = VmResources::from_cli(&cli(&["--config-file", path_arg])).unwrap_err();
        assert!(err.to_string().contains("no boot-source"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_config_file_or_a_disk_flag_may_name_an_inherited_descriptor() {
        let dir = std::env::temp_dir().join(format!("ember-config-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let read_only = std::fs::File::open(&image).unwrap();
        let fd_path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&read_only)
        );
        let path = dir.join("vm.json");
        let config = |read_only: bool| {
            let text = serde_json::json!({
                "boot-source": {"kernel_image_path": "vmlinux"},
                "drives": [{"drive_id": "data", "path_on_host": fd_path,
                            "is_root_device": false, "is_read_only": read_only}],
            });
            std::fs::write(&path, text.to_string()).unwrap();
            VmResources::from_cli(&cli(&["--config-file", path.to_str().unwrap()]))
        };
        let resources = config(true).unwrap();
        assert_eq!(
            resources.drives()[0].path_on_host.as_deref(),
            Some(&*fd_path)
        );
        let err = config(false).unwrap_err().to_string();
        assert!(err.contains("not open for reading and writing"), "{err}");
        let flags = |disk: &str| VmResources::from_cli(&cli(&["--kernel", "k", "--disk", disk]));
        assert!(flags(&format!("{fd_path},ro")).is_ok());
        let err = flags(&fd_path).unwrap_err().to_string();
        assert!(err.contains("not open for reading and writing"), "{err}");
        let err = flags("/proc/self/fd/x").unwrap_err().to_string();
        assert!(err.contains("names no descriptor"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mmds_config_needs_interfaces_that_were_put_and_sets_the_store_s_version() {
        let mut resources = VmResources::new(&cli(&[]));
        assert!(resources.mmds_config().is_none());
        let config = |ifaces: &[&str], version| model::MmdsConfig {
            version,
            network_interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            ipv4_address: None,
            imds_compat: true,
        };
        let err = resources
            .set_mmds_config(config(&["eth0"], ember_mmds::MmdsVersion::V2))
            .unwrap_err();
        assert!(err.to_string().contains("does not correspond"), "{err}");
        assert!(resources.mmds_config().is_none());
        assert_eq!(
            resources.locked_mmds().version(),
            ember_mmds::MmdsVersion::V1
        );

        resources
            .put_net(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                mtu: None,
            })
            .unwrap();
        resources
            .set_mmds_config(config(&["eth0"], ember_mmds::MmdsVersion::V2))
            .unwrap();
        let stored = resources.mmds_config().unwrap();
        assert_eq!(stored.ipv4_address, Some(model::DEFAULT_MMDS_ADDRESS));
        assert_eq!(stored.network_interfaces, ["eth0"]);
        assert_eq!(
            resources.locked_mmds().version(),
            ember_mmds::MmdsVersion::V2
        );
        assert!(resources.locked_mmds().imds_compat());
        // A clone shares the store: the network devices see what the API puts.
        let clone = resources.clone();
        clone.put_mmds(serde_json::json!({"a": "b"})).unwrap();
        assert_eq!(
            resources.locked_mmds().value(),
            Some(&serde_json::json!({"a": "b"}))
        );
    }

    #[test]
    fn metadata_fills_the_store_within_its_limit() {
        let dir = std::env::temp_dir().join(format!("ember-metadata-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("md.json");
        std::fs::write(&path, r#"{"latest": {"meta-data": {"ami-id": "ami-1"}}}"#).unwrap();
        let path_arg = path.to_str().unwrap();
        let resources = VmResources::from_cli(&cli(&["--metadata", path_arg])).unwrap();
        assert_eq!(
            resources.locked_mmds().value(),
            Some(&serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}))
        );
        assert_eq!(resources.locked_mmds().size_limit(), 51200);
        let resources =
            VmResources::from_cli(&cli(&["--metadata", path_arg, "--mmds-size-limit", "100"]))
                .unwrap();
        assert_eq!(resources.locked_mmds().size_limit(), 100);
        let err = VmResources::from_cli(&cli(&["--metadata", path_arg, "--mmds-size-limit", "10"]))
            .unwrap_err();
        assert!(
            err.to_string().contains("MMDS size limit of 10 bytes"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vsock_put_replaces_the_last_and_is_refused_where_its_path_exists() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-res-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let free = dir.join("v.sock").to_str().unwrap().to_string();
        let taken = dir.join("taken").to_str().unwrap().to_string();
        std::fs::write(&taken, b"").unwrap();
        let mut resources = VmResources::new(&cli(&[]));
        assert!(resources.vsock().is_none());
        let mut first = model::VsockConfig::new(3, free.clone());
        first.vsock_id = Some("vsock0".into());
        resources.put_vsock(first).unwrap();
        // The deprecated ID is dropped, as Firecracker drops it.
        assert_eq!(
            resources.vsock(),
            Some(&model::VsockConfig::new(3, free.clone()))
        );
        resources
            .put_vsock(model::VsockConfig::new(9, free.clone()))
            .unwrap();
        assert_eq!(resources.vsock().unwrap().guest_cid, 9);

        let err = resources
            .put_vsock(model::VsockConfig::new(3, taken.clone()))
            .unwrap_err();
        assert!(
            matches!(err, Error::Model(ModelError::UdsPathExists(_))),
            "{err}"
        );
        let err = resources
            .put_vsock(model::VsockConfig::new(1, free.clone()))
            .unwrap_err();
        assert!(
            matches!(err, Error::Model(ModelError::GuestCid(1))),
            "{err}"
        );
        assert_eq!(resources.vsock(), Some(&model::VsockConfig::new(9, free)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_config_file_with_a_vsock_whose_path_exists_is_refused() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let path = dir.join("vm.json");
        let text = serde_json::json!({
            "boot-source": {"kernel_image_path": "vmlinux"},
            "vsock": {"vsock_id": "v", "guest_cid": 3, "uds_path": uds},
        });
        std::fs::write(&path, text.to_string()).unwrap();
        let load = || VmResources::from_cli(&cli(&["--config-file", path.to_str().unwrap()]));
        let resources = load().unwrap();
        assert_eq!(
            resources.vsock(),
            Some(&model::VsockConfig::new(3, uds.to_str().unwrap()))
        );
        std::fs::write(&uds, b"").unwrap();
        let err = load().unwrap_err().to_string();
        assert!(
            err.contains("the uds_path") && err.contains("exists"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_config_file_s_mmds_config_applies_to_the_store() {
        let dir = std::env::temp_dir().join(format!("ember-config-mmds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.json");
        let file = r#"{
            "boot-source": {"kernel_image_path": "vmlinux"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "mmds-config": {"version": "V2", "network_interfaces": ["eth0"],
                            "ipv4_address": "169.254.170.2"}
        }"#;
        std::fs::write(&path, file).unwrap();
        let path_arg = path.to_str().unwrap();
        let resources = VmResources::from_cli(&cli(&["--config-file", path_arg])).unwrap();
        let config = resources.mmds_config().unwrap();
        assert_eq!(config.ipv4_address, Some("169.254.170.2".parse().unwrap()));
        assert_eq!(
            resources.locked_mmds().version(),
            ember_mmds::MmdsVersion::V2
        );
        let served = serde_json::to_value(resources.vm_config()).unwrap();
        assert_eq!(served["mmds-config"]["version"], "V2");
        assert_eq!(served["mmds-config"]["network_interfaces"][0], "eth0");

        std::fs::write(&path, file.replace(r#"["eth0"]"#, r#"["eth1"]"#)).unwrap();
        let err = VmResources::from_cli(&cli(&["--config-file", path_arg])).unwrap_err();
        assert!(err.to_string().contains("does not correspond"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
