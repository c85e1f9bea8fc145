//! The VMM's answers to API requests: the microVM's description before it boots, the running
//! [`Vmm`] after, the logger and the metrics.
//!
//! What is refused is refused as Firecracker refuses it, with a 400 and a `fault_message`, and
//! leaves everything as it was: a call that configures the microVM after it booted, one that
//! changes a running device before it booted, `InstanceStart` twice or without a kernel.

use std::path::Path;
use std::time::Duration;

use ember_legacy::ProcessStart;

use log::{LevelFilter, info, warn};

use crate::api::model::{
    self, ActionType, InstanceInfo, InstanceState, LogLevel, VmState, VmmVersion,
};
use crate::api::{ApiRequest, ApiResponse};
use crate::logger;
use crate::metrics::{self, Group, Kind, MetricsWriter, Snapshot};
use crate::resources::VmResources;
use crate::vmm::{self, Vmm};

/// The message of a call that only a microVM not yet started accepts (Firecracker's).
pub const AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

/// The message of a call that only a started microVM accepts (Firecracker's).
pub const BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// The message of a snapshot load on a process where the microVM was already configured
/// (Firecracker's).
pub const LOAD_AFTER_CONFIG: &str =
    "Loading a microVM snapshot not allowed after configuring boot-specific resources.";

/// The application name `GET /` reports.
pub const APP_NAME: &str = "ember";

/// The microVM, configured or running, and what the API changes around it.
#[derive(Debug)]
pub struct Controller {
    id: String,
    resources: VmResources,
    vmm: Option<Vmm>,
    metrics: Option<MetricsWriter>,
    logger_configured: bool,
    requests: u64,
    failed_requests: u64,
    /// Wall-clock and CPU time from the process's start to the API socket listening.
    startup: Option<(Duration, Duration)>,
    /// How long the last snapshot took to create and to restore, step by step.
    snapshots: crate::vmm::snapshot::SnapshotMetrics,
}

impl Controller {
    /// A controller for the microVM `resources` describe, named `id`.
    pub fn new(id: String, resources: VmResources) -> Self {
        Controller {
            id,
            resources,
            vmm: None,
            metrics: None,
            logger_configured: false,
            requests: 0,
            failed_requests: 0,
            startup: None,
            snapshots: crate::vmm::snapshot::SnapshotMetrics::default(),
        }
    }

    /// Records how long the process took, in wall-clock and CPU time, to have its API socket
    /// listening: Firecracker's `process_startup_time_us` and `process_startup_time_cpu_us`.
    pub fn set_startup_time(&mut self, wall: Duration, cpu: Duration) {
        self.startup = Some((wall, cpu));
    }

    /// Applies the `logger` and `metrics` of the description (a configuration file's).
    ///
    /// # Errors
    ///
    /// When the log or metrics file cannot be opened, in words.
    pub fn apply_logging(&mut self) -> Result<(), String> {
        let config = self.resources.vm_config().clone();
        if let Some(logger) = &config.logger {
            configure_logger(logger).map_err(|e| error_chain(&e))?;
            self.logger_configured = true;
        }
        if let Some(metrics) = &config.metrics {
            let writer = MetricsWriter::open(Path::new(&metrics.metrics_path))
                .map_err(|e| error_chain(&e))?;
            self.metrics = Some(writer);
        }
        Ok(())
    }

    /// Whether the microVM was started.
    pub fn is_started(&self) -> bool {
        self.vmm.is_some()
    }

    /// The running microVM.
    pub fn vmm(&self) -> Option<&Vmm> {
        self.vmm.as_ref()
    }

    /// The microVM's description.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// Boots the described microVM.
    ///
    /// # Errors
    ///
    /// When it is started already, has no kernel, or cannot be built.
    pub fn start_instance(&mut self, start: ProcessStart) -> vmm::Result<()> {
        if self.vmm.is_some() {
            return Err(vmm::Error::AlreadyStarted);
        }
        self.vmm = Some(Vmm::boot(&self.resources, start)?);
        Ok(())
    }

    /// Answers one API request.
    pub fn handle(&mut self, request: ApiRequest, start: ProcessStart) -> ApiResponse {
        self.requests = self.requests.saturating_add(1);
        let response = self.answer(request, start);
        if response.status().code() >= 400 {
            self.failed_requests = self.failed_requests.saturating_add(1);
        }
        response
    }

    fn answer(&mut self, request: ApiRequest, start: ProcessStart) -> ApiResponse {
        let started = self.vmm.is_some();
        match request {
            ApiRequest::GetInstanceInfo => ApiResponse::ok_json(&self.instance_info()),
            ApiRequest::GetVersion => ApiResponse::ok_json(&VmmVersion {
                firecracker_version: env!("CARGO_PKG_VERSION").to_string(),
            }),
            ApiRequest::GetMachineConfig => ApiResponse::ok_json(&self.resources.machine()),
            ApiRequest::GetVmConfig => ApiResponse::ok_json(self.resources.vm_config()),
            ApiRequest::GetMetrics => {
                ApiResponse::ok_prometheus(metrics::prometheus(&self.snapshot()))
            }
            ApiRequest::PutBootSource(boot_source) if !started => {
                if let Err(message) = check_boot_files(&boot_source) {
                    return ApiResponse::bad_request(message);
                }
                answer(self.resources.set_boot_source(boot_source))
            }
            ApiRequest::PutMachineConfig(machine) if !started => {
                answer(self.resources.set_machine(machine))
            }
            ApiRequest::PatchMachineConfig(update) if !started => {
                answer(self.resources.update_machine(&update))
            }
            ApiRequest::PutDrive(drive) if !started => answer(self.resources.put_drive(drive)),
            ApiRequest::PutNetworkInterface(net) if !started => answer(self.resources.put_net(net)),
            ApiRequest::PutEntropy(entropy) if !started => {
                answer(self.resources.put_entropy(entropy))
            }
            ApiRequest::PutBalloon(balloon) if !started => {
                answer(self.resources.put_balloon(balloon))
            }
            ApiRequest::PutVsock(vsock) if !started => answer(self.resources.put_vsock(vsock)),
            ApiRequest::GetBalloon => match self.resources.balloon() {
                Some(balloon) => ApiResponse::ok_json(balloon),
                None => ApiResponse::bad_request(model::ModelError::NoBalloon.to_string()),
            },
            ApiRequest::PatchBalloon(update) => self.patch_balloon(&update),
            ApiRequest::GetBalloonStats => self.balloon_stats(),
            ApiRequest::PatchBalloonStats(update) => self.patch_balloon_stats(&update),
            ApiRequest::GetMmds => match self.resources.locked_mmds().value() {
                Some(value) => ApiResponse::ok_json(value),
                // Before any PUT, Firecracker answers an empty object.
                None => ApiResponse::ok_json(&serde_json::json!({})),
            },
            ApiRequest::PutMmds(value) => mmds_answer(self.resources.put_mmds(value)),
            ApiRequest::PatchMmds(patch) => mmds_answer(self.resources.locked_mmds().patch(&patch)),
            ApiRequest::PutMmdsConfig(config) if !started => {
                answer(self.resources.set_mmds_config(config))
            }
            ApiRequest::CreateSnapshot(params) => self.create_snapshot(&params),
            ApiRequest::LoadSnapshot(params) if !started => self.load_snapshot(&params, start),
            ApiRequest::PutLogger(config) if !started => self.put_logger(config),
            ApiRequest::PutMetrics(config) if !started => self.put_metrics(config),
            ApiRequest::Action(ActionType::InstanceStart) if !started => {
                if self.resources.boot_source().is_none() {
                    return ApiResponse::bad_request(
                        "Cannot start microvm without kernel configuration.",
                    );
                }
                match self.start_instance(start) {
                    Ok(()) => ApiResponse::no_content(),
                    Err(err) => ApiResponse::bad_request(error_chain(&err)),
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) => match self.flush_metrics() {
                Ok(()) => ApiResponse::no_content(),
                Err(err) => ApiResponse::bad_request(err),
            },
            ApiRequest::PutBootSource(_)
            | ApiRequest::PutMachineConfig(_)
            | ApiRequest::PatchMachineConfig(_)
            | ApiRequest::PutDrive(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::PutEntropy(_)
            | ApiRequest::PutBalloon(_)
            | ApiRequest::PutMmdsConfig(_)
            | ApiRequest::PutVsock(_)
            | ApiRequest::PutLogger(_)
            | ApiRequest::PutMetrics(_)
            | ApiRequest::LoadSnapshot(_)
            | ApiRequest::Action(ActionType::InstanceStart) => {
                ApiResponse::bad_request(AFTER_START)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.with_vmm(|vmm| vmm.send_ctrl_alt_del())
            }
            ApiRequest::PatchDrive(update) => {
                // Looked at before the device is locked: opening a FIFO would block.
                let path = update.path_on_host.as_deref().unwrap_or_default();
                let read_only = self
                    .resources
                    .drives()
                    .iter()
                    .find(|drive| drive.drive_id == update.drive_id)
                    .is_some_and(|drive| drive.read_only());
                if let Err(err) = model::check_drive_file(path, read_only) {
                    return ApiResponse::bad_request(err.to_string());
                }
                let response = self.with_vmm(|vmm| vmm.update_drive(&update));
                if response.status().code() < 400 {
                    self.resources.patched_drive(&update);
                }
                response
            }
            ApiRequest::PatchNetworkInterface(update) => {
                let response = self.with_vmm(|vmm| vmm.update_net(&update));
                if response.status().code() < 400 {
                    self.resources.patched_net(&update);
                }
                response
            }
            ApiRequest::PatchVm(model::Vm { state }) => self.with_vmm(|vmm| match state {
                VmState::Paused => vmm.pause(),
                VmState::Resumed => vmm.resume(),
            }),
        }
    }

    /// Runs `f` on the running microVM: 204 when it succeeds, 400 with the error when it fails
    /// or the microVM was not started.
    fn with_vmm(&mut self, f: impl FnOnce(&mut Vmm) -> vmm::Result<()>) -> ApiResponse {
        let Some(vmm) = self.vmm.as_mut() else {
            return ApiResponse::bad_request(BEFORE_START);
        };
        match f(vmm) {
            Ok(()) => ApiResponse::no_content(),
            Err(err) => ApiResponse::bad_request(error_chain(&err)),
        }
    }

    /// `PUT /snapshot/create`: the paused microVM's state and memory to files.
    fn create_snapshot(&mut self, params: &model::SnapshotCreateParams) -> ApiResponse {
        let Some(vmm) = self.vmm.as_mut() else {
            return ApiResponse::bad_request(BEFORE_START);
        };
        match vmm.create_snapshot(params, &self.resources) {
            Ok(report) => {
                info!(
                    "Snapshot {} created in {} us ({} bytes of memory written)",
                    params.snapshot_path,
                    report.duration.as_micros(),
                    report.memory_bytes
                );
                self.snapshots.created(&report);
                ApiResponse::no_content()
            }
            Err(err) => ApiResponse::bad_request(error_chain(&err)),
        }
    }

    /// `PUT /snapshot/load`: a microVM restored from a snapshot, on a process where nothing
    /// but the logger and metrics was configured.
    fn load_snapshot(
        &mut self,
        params: &model::SnapshotLoadParams,
        start: ProcessStart,
    ) -> ApiResponse {
        if !self.resources.is_pristine() {
            return ApiResponse::bad_request(LOAD_AFTER_CONFIG);
        }
        match Vmm::restore(params, &self.resources, start) {
            Ok((vmm, resources, timeline)) => {
                info!("Snapshot {} restored: {timeline}", params.snapshot_path);
                self.snapshots.restored(timeline);
                self.resources = resources;
                self.vmm = Some(vmm);
                ApiResponse::no_content()
            }
            Err(err) => ApiResponse::bad_request(error_chain(&err)),
        }
    }

    /// `PATCH /balloon`: the resources' target before boot; the device's, then the
    /// resources', after.
    fn patch_balloon(&mut self, update: &model::BalloonUpdate) -> ApiResponse {
        if self.vmm.is_none() || self.resources.balloon().is_none() {
            return answer(self.resources.update_balloon(update));
        }
        // Checked before the device changes, so that a refusal changes nothing.
        let mut checked = self.resources.clone();
        if let Err(err) = checked.update_balloon(update) {
            return ApiResponse::bad_request(err.to_string());
        }
        let response = self.with_vmm(|vmm| vmm.update_balloon(update.amount_mib));
        if response.status().code() < 400 {
            self.resources = checked;
        }
        response
    }

    /// `PATCH /balloon/statistics`: the resources' interval before boot; the device's, then
    /// the resources', after.
    fn patch_balloon_stats(&mut self, update: &model::BalloonStatsUpdate) -> ApiResponse {
        if self.vmm.is_none() || self.resources.balloon().is_none() {
            return answer(self.resources.update_balloon_stats(update));
        }
        let response =
            self.with_vmm(|vmm| vmm.update_balloon_stats(update.stats_polling_interval_s));
        if response.status().code() < 400 {
            let _ = self.resources.update_balloon_stats(update);
        }
        response
    }

    /// `GET /balloon/statistics`: the running balloon's.
    fn balloon_stats(&self) -> ApiResponse {
        let Some(balloon) = self.resources.balloon() else {
            return ApiResponse::bad_request(model::ModelError::NoBalloon.to_string());
        };
        if balloon.stats_polling_interval_s == 0 {
            return ApiResponse::bad_request(
                ember_virtio::balloon::Error::StatsDisabled.to_string(),
            );
        }
        match &self.vmm {
            None => ApiResponse::bad_request(BEFORE_START),
            Some(vmm) => match vmm.balloon_stats() {
                Ok(stats) => ApiResponse::ok_json(&model::BalloonStats::from(stats)),
                Err(err) => ApiResponse::bad_request(error_chain(&err)),
            },
        }
    }

    fn instance_info(&self) -> InstanceInfo {
        let state = match &self.vmm {
            None => InstanceState::NotStarted,
            Some(vmm) if vmm.is_paused() => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        };
        InstanceInfo {
            app_name: APP_NAME.to_string(),
            id: self.id.clone(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn put_logger(&mut self, config: model::Logger) -> ApiResponse {
        if let Err(err) = configure_logger(&config) {
            return ApiResponse::bad_request(format!(
                "Cannot configure the logger: {}",
                error_chain(&err)
            ));
        }
        self.logger_configured = true;
        self.resources.set_logger(config);
        ApiResponse::no_content()
    }

    fn put_metrics(&mut self, config: model::Metrics) -> ApiResponse {
        if self.metrics.is_some() {
            return ApiResponse::bad_request("Reinitialization of metrics not allowed.");
        }
        match MetricsWriter::open(Path::new(&config.metrics_path)) {
            Ok(writer) => {
                self.metrics = Some(writer);
                self.resources.set_metrics(config);
                ApiResponse::no_content()
            }
            Err(err) => ApiResponse::bad_request(error_chain(&err)),
        }
    }

    /// What every counter reads now.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        if let Some(vmm) = &self.vmm {
            vmm.metrics(&mut snapshot);
        }
        let mut api = Group::counters(
            "api_server",
            None,
            [
                ("requests", self.requests),
                ("failed_requests", self.failed_requests),
            ],
        );
        if let Some((wall, cpu)) = self.startup {
            let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            api.values
                .push(("process_startup_time_us", Kind::Gauge, us(wall)));
            api.values
                .push(("process_startup_time_cpu_us", Kind::Gauge, us(cpu)));
        }
        snapshot.push(api);
        if let Some(group) = self.snapshots.group() {
            snapshot.push(group);
        }
        let log = logger::stats();
        let metrics = self
            .metrics
            .as_ref()
            .map(MetricsWriter::stats)
            .unwrap_or_default();
        snapshot.push(Group::counters(
            "logger",
            None,
            [
                ("missed_metrics_count", metrics.missed_metrics_count),
                ("metrics_fails", metrics.metrics_fails),
                ("missed_log_count", log.missed_log_count),
                ("log_fails", log.log_fails),
                ("rate_limited_log_count", log.rate_limited_log_count),
            ],
        ));
        snapshot.push(Group::counters(
            "seccomp",
            None,
            [("num_faults", crate::seccomp::num_faults())],
        ));
        snapshot
    }

    /// Writes a line of metrics; without a metrics path there is nothing to flush, and that
    /// succeeds, as Firecracker's `FlushMetrics` does.
    ///
    /// # Errors
    ///
    /// When the line cannot be written, in words.
    pub fn flush_metrics(&mut self) -> Result<(), String> {
        if self.metrics.is_none() {
            return Ok(());
        }
        let snapshot = self.snapshot();
        let Some(writer) = self.metrics.as_mut() else {
            return Ok(());
        };
        writer
            .write(&snapshot)
            .map_err(|err| format!("Cannot write the metrics: {err}"))
    }

    /// Writes a line of metrics if there is a metrics path, logging a failure.
    pub fn flush_metrics_quietly(&mut self) {
        if let Err(err) = self.flush_metrics() {
            warn!("{err}");
        }
    }

    /// Writes the last line of metrics and stops the microVM.
    pub fn finish(mut self) {
        self.flush_metrics_quietly();
        if let Some(vmm) = self.vmm.take() {
            vmm.stop();
            info!("Stopped the VM");
        }
    }
}

fn answer(result: crate::resources::Result<()>) -> ApiResponse {
    match result {
        Ok(()) => ApiResponse::no_content(),
        Err(err) => ApiResponse::bad_request(err.to_string()),
    }
}

/// The answer to a `PUT` or `PATCH /mmds`: 413 when the store would pass its limit, as
/// Firecracker answers, 400 for a `PATCH` before any `PUT`.
fn mmds_answer(result: ember_mmds::data_store::Result<()>) -> ApiResponse {
    match result {
        Ok(()) => ApiResponse::no_content(),
        Err(err @ ember_mmds::data_store::Error::DataStoreLimitExceeded) => ApiResponse::fault(
            crate::api::http::StatusCode::PayloadTooLarge,
            err.to_string(),
        ),
        Err(err) => ApiResponse::bad_request(err.to_string()),
    }
}

/// Opens the kernel and the initrd of `PUT /boot-source`, as Firecracker does, so that a path
/// that cannot be opened is refused at once, with Firecracker's messages, rather than at
/// `InstanceStart`. Opened without blocking: a named pipe is no reason to wait.
fn check_boot_files(boot_source: &model::BootSource) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |path: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    };
    open(&boot_source.kernel_image_path)
        .map_err(|err| format!("The kernel file cannot be opened: {err}"))?;
    if let Some(initrd) = &boot_source.initrd_path {
        open(initrd).map_err(|err| {
            format!(
                "The initrd file cannot be opened due to invalid path or invalid permissions. {err}"
            )
        })?;
    }
    Ok(())
}

fn configure_logger(config: &model::Logger) -> logger::Result<()> {
    let level = config.level.map(|level| match level {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
        LogLevel::Off => LevelFilter::Off,
    });
    logger::configure(&logger::Config {
        path: config.log_path.as_deref().map(Path::new),
        level,
        show_level: config.show_level,
        show_origin: config.show_log_origin,
        module: config.module.as_deref(),
    })
}

/// An error and its sources, on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
