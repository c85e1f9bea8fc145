//! `ember`: an example microVM monitor built from the ember crates.
//!
//! It boots a Linux guest from a kernel (ELF vmlinux, PVH or bzImage) and an optional initrd, with
//! a serial console, virtio block and network devices, an i8042 whose reset line ends the VM, and
//! an optional boot-timer device. The microVM is described by flags, by a configuration file, or
//! through Firecracker's REST API on a Unix socket, which also serves the running microVM (pause,
//! resume, rate limits, metrics). It exits 0 when the guest reboots or powers off, and non-zero
//! with a one-line error otherwise. SIGTERM and SIGINT stop it cleanly, before or after boot: the
//! vCPUs stopped, the terminal restored and the final metrics line written, then it exits with
//! status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT) after the line
//! `ember: stopped by SIGTERM` (or `SIGINT`). The API socket file is left, as Firecracker
//! leaves it.
//!
//! Every thread runs under a seccomp filter of its kind (`--no-seccomp` turns them off, for
//! debugging only); a system call a filter refuses ends ember with the status 148 and a line
//! on stderr naming the thread and the call. `PR_SET_NO_NEW_PRIVS` is set before anything else.
//!
//! The VMM itself is the `ember_vmm` library of this package; this binary parses the command line
//! and runs it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use ember_legacy::{ProcessStart, boot_timer};

use ember_vmm::api::ApiServer;
use ember_vmm::api::server::{MonotonicClock, Timeouts};
use ember_vmm::controller::{Controller, error_chain};
use ember_vmm::resources::VmResources;
use ember_vmm::seccomp::{self, Filters, ThreadKind};
use ember_vmm::signals::{self, TerminationSignals};
use ember_vmm::{cli, logger, vmm};

fn main() -> ExitCode {
    let now = Instant::now();
    // Every thread allocates from the main arena. glibc otherwise gives each thread that
    // allocates an arena of its own, and every arena keeps resident pages (4 to 20 KiB each
    // for the API, console and vCPU threads of an idle microVM); ember's threads allocate
    // little, and rarely at once. Before any thread starts, so that none has an arena.
    // SAFETY: mallopt changes a setting of the C library's allocator and takes no pointer.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // Read beside `now`: a launcher's `--start-time-us` is on this clock. Linux does not fail
    // it; a zero only makes a launcher's start count as this one.
    let monotonic = boot_timer::monotonic_time().unwrap_or_default();
    // Before any thread starts, so that every thread has SIGTERM and SIGINT blocked and they wait
    // for the event loop in the signalfd.
    let signals = match TerminationSignals::block() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("ember: {}", error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let cli = cli::Cli::parse();
    if cli.version {
        // Firecracker's shape: the version line, then an empty line.
        println!("{}", cli::VERSION_LINE);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.describe_snapshot {
        return match vmm::snapshot::describe(path) {
            Ok(version) => {
                println!("{version}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!(
                    "ember: Cannot describe the snapshot {}: {}",
                    path.display(),
                    error_chain(&err)
                );
                ExitCode::FAILURE
            }
        };
    }
    let cli = cli.with_defaults();
    let start = cli.process_start(now, monotonic);
    logger::init(start.wall, cli.log_filter());

    match run(&cli, start, &signals) {
        Ok(vmm::GuestExit::Signal(signal)) => {
            eprintln!("ember: stopped by {}", signals::name(signal));
            ExitCode::from(signals::exit_status(signal))
        }
        Ok(exit) => {
            log::info!("{exit}");
            ExitCode::SUCCESS
        }
        Err(line) => {
            eprintln!("ember: {line}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the microVM the command line describes; an error comes back as one line, with each of
/// its sources.
fn run(
    cli: &cli::Cli,
    start: ProcessStart,
    signals: &TerminationSignals,
) -> Result<vmm::GuestExit, String> {
    // Before any thread exists, so that every thread inherits it.
    seccomp::set_no_new_privs().map_err(|e| error_chain(&e))?;
    let filters = seccomp_filters(cli).map_err(|e| error_chain(&e))?;
    if filters.is_some() {
        seccomp::prepare_runtime().map_err(|e| error_chain(&e))?;
    }
    let mut resources = VmResources::from_cli(cli).map_err(|e| error_chain(&e))?;
    resources.seccomp = filters.clone();
    // Flags or a configuration file describe a microVM to boot at once; otherwise the API does.
    let boot = cli.kernel.is_some() || cli.config_file.is_some();
    let mut controller = Controller::new(cli.id.clone(), resources);
    controller
        .apply_logging()
        .map_err(|e| format!("Cannot set up the logger or metrics: {e}"))?;
    let server = match &cli.api_sock {
        Some(path) if !cli.no_api => {
            let hook = filters
                .as_ref()
                .map(|filters| filters.thread_hook(ThreadKind::Api));
            let server = ApiServer::spawn_with_limit(
                path,
                Timeouts::default(),
                Box::new(MonotonicClock),
                hook,
                cli.http_api_max_payload_size,
            )
            .map_err(|e| error_chain(&e))?;
            let elapsed = start.elapsed();
            controller.set_startup_time(elapsed.wall, elapsed.cpu);
            log::info!(
                "API server listening on {} after {} us ({} us of CPU)",
                server.0.socket_path().display(),
                elapsed.wall.as_micros(),
                elapsed.cpu.as_micros()
            );
            Some(server)
        }
        _ => None,
    };
    let api = server.as_ref().map(|(_, requests)| requests);
    let control = vmm::Control {
        api,
        controller: &mut controller,
        signals: Some(signals),
    };
    let outcome = vmm::run(control, boot, start).map_err(|e| error_chain(&e));
    controller.finish();
    drop(server);
    outcome
}

/// The filters the command line asks for, with the `SIGSYS` handler that reports a refused
/// call installed; `None` with `--no-seccomp`.
fn seccomp_filters(cli: &cli::Cli) -> seccomp::Result<Option<Arc<Filters>>> {
    if cli.no_seccomp {
        log::warn!("seccomp filters are off (--no-seccomp): for debugging only");
        return Ok(None);
    }
    seccomp::install_sigsys_handler()?;
    let filters = match &cli.seccomp_filter {
        Some(path) => Filters::from_file(path)?,
        None => Filters::builtin(),
    };
    Ok(Some(Arc::new(filters)))
}
