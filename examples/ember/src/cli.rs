//! The command line of `ember`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use ember_legacy::ProcessStart;
use ember_virtio::net::MacAddr;

use crate::api::http::MAX_BODY_LEN;
use crate::api::model;

/// Kernel command line used when `--cmdline` is not given: serial console, reset through the i8042
/// keyboard controller on reboot, reboot one second after a panic, no PCI probing (ember has no
/// PCI bus), and an i8042 keyboard without probing (ember's answers every command with an
/// acknowledgement), through which Ctrl+Alt+Del reaches the guest.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The most bytes `--serial file:PATH` lets the file hold when `--serial-max-bytes` is not given:
/// 64 MiB.
pub const DEFAULT_SERIAL_MAX_BYTES: u64 = 64 << 20;

/// The microVM's ID when `--id` is not given, as in Firecracker.
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";

/// The longest `--id`, as in Firecracker.
pub const MAX_INSTANCE_ID_LEN: usize = 64;

/// What `--version` prints, in Firecracker's shape (`Firecracker v1.7.0` and an empty line).
pub const VERSION_LINE: &str = concat!("ember v", env!("CARGO_PKG_VERSION"), "\n");

/// Where the API is served when the command line names neither ember's own `--kernel` nor a
/// socket (`--api-sock`, `--no-api`): Firecracker's default, which jailer scripts and SDKs
/// that pass no `--api-sock` expect (inside the jail's `/run`). As in Firecracker, a
/// `--config-file` without `--no-api` serves the API there too.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// Boot a Linux guest in a microVM.
///
/// The microVM is described by the flags (`--kernel` and what follows it), by a configuration
/// file (`--config-file`, the JSON of Firecracker's `GET /vm/config`), or through the API
/// socket (`--api-sock`, Firecracker's REST API) before `InstanceStart`. With flags or a
/// configuration file the guest boots at once, and the API, when there is one, serves the
/// running microVM. Without `--kernel`, `--api-sock` or `--no-api` (with a `--config-file` or
/// without), the API is served at /run/firecracker.socket, as Firecracker does.
///
/// Firecracker's flags are accepted with Firecracker's meaning: `--api-sock`, `--id`,
/// `--config-file`, `--no-api`, `--log-path`, `--level`, `--module`, `--show-level`,
/// `--show-log-origin`, `--metrics-path`, `--boot-timer`, `--no-seccomp`, `--seccomp-filter`,
/// `--start-time-us`, `--start-time-cpu-us`, `--parent-cpu-time-us`,
/// `--http-api-max-payload-size`, `--metadata`, `--mmds-size-limit` and `--version`.
#[derive(Debug, Parser)]
#[command(name = "ember", about, disable_version_flag = true)]
#[command(group = clap::ArgGroup::new("described").args(["kernel", "config_file"]).multiple(true))]
#[command(group = clap::ArgGroup::new("vm_flags").args(["initrd", "cmdline", "vcpus", "memory", "disks", "nets", "hugepages"]).multiple(true).requires("kernel").conflicts_with("config_file"))]
pub struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage (the format is detected).
    #[arg(long, value_name = "PATH", conflicts_with = "config_file")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk loaded beside the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Boot the microVM a JSON file describes, in the format of Firecracker's `GET /vm/config`
    /// (`boot-source`, `machine-config`, `drives`, `network-interfaces`, `logger`, `metrics`).
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,

    /// Serve Firecracker's REST API on a Unix socket at PATH (which must not exist, or be a
    /// socket nobody listens on, as a stopped instance leaves it). Without it, and without
    /// `--kernel` or `--no-api`, the API is served at /run/firecracker.socket.
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<PathBuf>,

    /// Serve no API (the default with `--kernel` unless `--api-sock` is given). It needs
    /// `--config-file` (as in Firecracker) or `--kernel`: a microVM nothing describes could
    /// never start.
    #[arg(long, requires = "described")]
    pub no_api: bool,

    /// The microVM's ID, as `GET /` reports it: 1 to 64 letters, digits and hyphens, as in
    /// Firecracker.
    #[arg(long, value_name = "ID", default_value = DEFAULT_INSTANCE_ID, value_parser = parse_id)]
    pub id: String,

    /// When the process was started, in microseconds of the host's monotonic clock
    /// (CLOCK_MONOTONIC): Firecracker's jailer passes the moment it started, so that the boot
    /// time (`Guest-boot-time`) and `process_startup_time_us` count the jail's set-up too.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,

    /// The process's CPU clock (CLOCK_PROCESS_CPUTIME_ID) in microseconds when it was started,
    /// as the jailer passes it: CPU times count from there.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,

    /// CPU time in microseconds that the jailer's parent process spent before it forked the
    /// process that became ember (`--daemonize`, a new PID namespace): added to the CPU times.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub memory: u64,

    /// Where the guest's serial console goes: `stdio`, `file:PATH` or `none`.
    #[arg(long, value_name = "DEST", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialOutput,

    /// The most bytes the file of `--serial file:PATH` may hold, what it held before included;
    /// guest output past it is dropped and counted (`uart.missed_write_count`). 0: no cap. Pipes
    /// and devices have no cap.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SERIAL_MAX_BYTES)]
    pub serial_max_bytes: u64,

    /// Add a virtio block device backed by a raw disk image or a host block device (repeatable).
    /// `ro`: the guest may only read it; `root`: it is the root file system (`root=/dev/vda`,
    /// first disk only); `id=NAME`: its ID, which the guest reads as its serial (default
    /// `diskN`, N counting from 0). A PATH of `/proc/self/fd/N` is the descriptor N that ember
    /// inherited, open for reading (and writing unless `ro`), used without opening any path.
    #[arg(
        long = "disk",
        value_name = "PATH[,ro][,root][,id=NAME]",
        value_parser = parse_disk
    )]
    pub disks: Vec<DiskSpec>,

    /// Add a virtio network device on the TAP interface NAME (repeatable); `mac=MAC` gives it a
    /// MAC address, else the guest picks a random one.
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC]",
        value_parser = parse_net
    )]
    pub nets: Vec<NetSpec>,

    /// Add the boot-timer device: the guest writes 123 to it and ember logs the time since start.
    #[arg(long)]
    pub boot_timer: bool,

    /// Let the host's KSM merge identical guest pages (MADV_MERGEABLE).
    #[arg(long)]
    pub ksm: bool,

    /// Back guest memory with transparent huge pages where the host can (MADV_HUGEPAGE).
    #[arg(long)]
    pub hugepages: bool,

    /// Run without seccomp filters. For debugging only: a guest or API client that takes over
    /// a thread can then make any system call ember's user may make.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Install the seccomp filters of a compiled filter file instead of the built-in ones
    /// (Firecracker's format: one filter for each of vmm, api, vcpu, block, net and console).
    #[arg(long, value_name = "PATH", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,

    /// Keep guest memory in ember's core dumps (it is left out by default, MADV_DONTDUMP). For
    /// debugging only: a core dump then holds everything the guest had in memory.
    #[arg(long)]
    pub dump_guest_memory: bool,

    /// Most verbose level of ember's own log messages, written to stderr.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: LogLevel,

    /// Firecracker's log level: Off, Error, Warning (or Warn), Info, Debug or Trace, spelled so
    /// or in capitals (OFF, WARN, ...), as Firecracker takes them. It replaces `--log-level`.
    #[arg(long, value_name = "LEVEL", value_parser = parse_level, conflicts_with = "log_level")]
    pub level: Option<model::LogLevel>,

    /// Write the log to this file (appended to) or named pipe instead of stderr, from the
    /// start, as `PUT /logger` with `log_path` does.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,

    /// Write only the log messages of this module path (and those below it).
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,

    /// Show each log line's level. ember shows it without the flag too (Firecracker does not);
    /// accepted for Firecracker's command lines.
    #[arg(long)]
    pub show_level: bool,

    /// Show the source file and line each log message comes from.
    #[arg(long)]
    pub show_log_origin: bool,

    /// Write metrics to this file (appended to) or named pipe from the start, as `PUT /metrics`
    /// does.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// The largest API request body in bytes; a request announcing a larger one is answered 400
    /// (Firecracker's message) and its connection closed.
    #[arg(long, value_name = "BYTES", default_value_t = MAX_BODY_LEN, value_parser = parse_payload_size)]
    pub http_api_max_payload_size: usize,

    /// A JSON file whose content fills the microVM metadata service's (MMDS) data store at
    /// start, as a `PUT /mmds` would; it must be JSON within `--mmds-size-limit`.
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,

    /// The most bytes the MMDS data store may hold, serialized; default:
    /// `--http-api-max-payload-size`. A `PUT` or `PATCH /mmds` that would pass it is answered
    /// 413 and changes nothing.
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,

    /// Print ember's version (`ember vX.Y.Z`, in the shape of Firecracker's
    /// `Firecracker vX.Y.Z`) and exit.
    #[arg(long)]
    pub version: bool,

    /// Print the format version of the snapshot state file at PATH (`v1`) and exit.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
}

impl Cli {
    /// The most verbose level written: `--level` when given, else `--log-level`.
    pub fn log_filter(&self) -> log::LevelFilter {
        match self.level {
            Some(level) => level_filter(level),
            None => self.log_level.into(),
        }
    }

    /// The logger settings of the flags (`--log-path`, `--level`, `--module`, `--show-level`,
    /// `--show-log-origin`), as the body of a `PUT /logger`; `None` when none is given.
    pub fn logger_config(&self) -> Option<model::Logger> {
        let given = self.log_path.is_some()
            || self.level.is_some()
            || self.module.is_some()
            || self.show_level
            || self.show_log_origin;
        given.then(|| model::Logger {
            log_path: self.log_path.as_deref().map(path_string),
            level: self.level,
            show_level: self.show_level.then_some(true),
            show_log_origin: self.show_log_origin.then_some(true),
            module: self.module.clone(),
        })
    }

    /// `--metrics-path` as the body of a `PUT /metrics`.
    pub fn metrics_config(&self) -> Option<model::Metrics> {
        self.metrics_path.as_deref().map(|path| model::Metrics {
            metrics_path: path_string(path),
        })
    }

    /// The MMDS data store's limit: `--mmds-size-limit`, else `--http-api-max-payload-size`,
    /// as in Firecracker.
    pub fn mmds_size_limit(&self) -> usize {
        self.mmds_size_limit
            .unwrap_or(self.http_api_max_payload_size)
    }

    /// Reads and checks the `--metadata` file: JSON, at most [`Cli::mmds_size_limit`] bytes.
    /// Returns the value, which fills the MMDS data store at start.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, is not JSON or is larger than the limit, in words.
    pub fn read_metadata(&self) -> Result<Option<serde_json::Value>, String> {
        let Some(path) = &self.metadata else {
            return Ok(None);
        };
        let limit = self.mmds_size_limit();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("Cannot read the metadata file {}: {e}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("Invalid metadata file {}: {e}", path.display()))?;
        // Measured as Firecracker's data store measures it: the JSON as it would be stored.
        let size = value.to_string().len();
        if size > limit {
            return Err(format!(
                "The metadata file {} holds {size} bytes of JSON, more than the MMDS size limit of {limit} bytes",
                path.display()
            ));
        }
        Ok(Some(value))
    }

    /// The command line with the defaults that depend on other flags applied: the API socket
    /// at [`DEFAULT_API_SOCK`] unless `--kernel`, `--api-sock` or `--no-api` is given.
    pub fn with_defaults(mut self) -> Self {
        if self.kernel.is_none() && self.api_sock.is_none() && !self.no_api {
            self.api_sock = Some(PathBuf::from(DEFAULT_API_SOCK));
        }
        self
    }

    /// The process's start: `now`, the moment `main` began, read as `monotonic_now` on the
    /// monotonic clock, unless `--start-time-us` places it earlier (a launcher's start); with
    /// the CPU clock at start and the CPU time spent elsewhere that the jailer's flags give.
    ///
    /// A `--start-time-us` in the future of `monotonic_now` is taken as `now`: time does not
    /// run backwards.
    pub fn process_start(&self, now: Instant, monotonic_now: Duration) -> ProcessStart {
        let wall = self
            .start_time_us
            .map(|us| monotonic_now.saturating_sub(Duration::from_micros(us)))
            .and_then(|before| now.checked_sub(before))
            .unwrap_or(now);
        ProcessStart {
            wall,
            cpu: Duration::from_micros(self.start_time_cpu_us.unwrap_or_default()),
            cpu_elsewhere: Duration::from_micros(self.parent_cpu_time_us.unwrap_or_default()),
        }
    }
}

/// The filter of a Firecracker log level.
pub fn level_filter(level: model::LogLevel) -> log::LevelFilter {
    match level {
        model::LogLevel::Error => log::LevelFilter::Error,
        model::LogLevel::Warning => log::LevelFilter::Warn,
        model::LogLevel::Info => log::LevelFilter::Info,
        model::LogLevel::Debug => log::LevelFilter::Debug,
        model::LogLevel::Trace => log::LevelFilter::Trace,
        model::LogLevel::Off => log::LevelFilter::Off,
    }
}

fn path_string(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Checks an instance ID as Firecracker does: 1 to [`MAX_INSTANCE_ID_LEN`] characters, each a
/// letter, a digit or a hyphen.
fn parse_id(value: &str) -> Result<String, String> {
    let len = value.chars().count();
    if !(1..=MAX_INSTANCE_ID_LEN).contains(&len) {
        return Err(format!(
            "Invalid instance ID: Invalid len ({len}); the length must be between 1 and {MAX_INSTANCE_ID_LEN}"
        ));
    }
    if let Some(c) = value.chars().find(|&c| c != '-' && !c.is_alphanumeric()) {
        return Err(format!(
            "Invalid instance ID: Invalid char ({c}) at position {}",
            value.find(c).unwrap_or_default()
        ));
    }
    Ok(value.to_string())
}

/// Reads a level of `--level` with Firecracker's spellings: the name capitalised or in
/// capitals, `Warning` also as `Warn`.
fn parse_level(value: &str) -> Result<model::LogLevel, String> {
    use model::LogLevel as L;
    Ok(match value {
        "Off" | "OFF" => L::Off,
        "Trace" | "TRACE" => L::Trace,
        "Debug" | "DEBUG" => L::Debug,
        "Info" | "INFO" => L::Info,
        "Warn" | "WARN" | "Warning" | "WARNING" => L::Warning,
        "Error" | "ERROR" => L::Error,
        _ => {
            return Err(format!(
                "expected Off, Error, Warning, Warn, Info, Debug or Trace (or the same in capitals), found `{value}`"
            ));
        }
    })
}

/// Reads `--http-api-max-payload-size`: a number of bytes. 0 is accepted, as Firecracker
/// accepts it: then only requests without a body are served.
fn parse_payload_size(value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("expected a number of bytes, found `{value}`"))
}

/// Destination of the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// No serial console device output; the port still exists so the guest finds its UART.
    None,
}

fn parse_serial(value: &str) -> Result<SerialOutput, String> {
    match value {
        "stdio" => Ok(SerialOutput::Stdio),
        "none" => Ok(SerialOutput::None),
        _ => match value.strip_prefix("file:") {
            Some("") => Err("file: needs a path, as in file:/tmp/console.log".into()),
            Some(path) => Ok(SerialOutput::File(PathBuf::from(path))),
            None => Err(format!(
                "expected stdio, file:PATH or none, found `{value}`"
            )),
        },
    }
}

/// A disk given with `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// Whether it holds the root file system.
    pub root: bool,
    /// Its ID, when one was given.
    pub id: Option<String>,
}

/// A network interface given with `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The TAP interface's name.
    pub tap: String,
    /// The guest's MAC address, when one was given.
    pub mac: Option<MacAddr>,
}

/// Splits `PATH,opt,...`: the first field and the options after it.
fn fields(value: &str) -> (&str, impl Iterator<Item = &str>) {
    let mut parts = value.split(',');
    (parts.next().unwrap_or_default(), parts)
}

fn parse_disk(value: &str) -> Result<DiskSpec, String> {
    let (path, options) = fields(value);
    if path.is_empty() {
        return Err("a disk needs the path of its image first, as in rootfs.ext4,ro".into());
    }
    let mut disk = DiskSpec {
        path: PathBuf::from(path),
        read_only: false,
        root: false,
        id: None,
    };
    for option in options {
        let repeated = match option {
            "ro" => std::mem::replace(&mut disk.read_only, true),
            "root" => std::mem::replace(&mut disk.root, true),
            _ => match option.strip_prefix("id=") {
                Some("") => return Err("id= needs a name, as in id=rootfs".into()),
                Some(id) => disk.id.replace(id.to_string()).is_some(),
                None => {
                    return Err(format!(
                        "unknown disk option `{option}`: expected ro, root or id=NAME"
                    ));
                }
            },
        };
        if repeated {
            return Err(format!("the disk option `{option}` is given twice"));
        }
    }
    Ok(disk)
}

fn parse_net(value: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    for option in value.split(',') {
        let repeated = if let Some(name) = option.strip_prefix("tap=") {
            if name.is_empty() {
                return Err("tap= needs an interface name, as in tap=tap0".into());
            }
            tap.replace(name.to_string()).is_some()
        } else if let Some(text) = option.strip_prefix("mac=") {
            let parsed: MacAddr = text.parse().map_err(|e| format!("{e}"))?;
            mac.replace(parsed).is_some()
        } else {
            return Err(format!(
                "unknown network option `{option}`: expected tap=NAME or mac=MAC"
            ));
        };
        if repeated {
            return Err(format!("the network option `{option}` is given twice"));
        }
    }
    let tap =
        tap.ok_or("a network interface needs tap=NAME, as in tap=tap0,mac=06:00:00:00:00:01")?;
    Ok(NetSpec { tap, mac })
}

/// Levels of `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing but errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// Also the VM's lifecycle (start, boot time, exit).
    Info,
    /// Also configuration details and unhandled guest accesses.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["ember", "--kernel", "vmlinux"].iter().chain(args))
    }

    #[test]
    fn defaults_are_one_vcpu_128_mib_and_stdio() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.vcpus, 1);
        assert_eq!(cli.memory, 128);
        assert_eq!(cli.serial, SerialOutput::Stdio);
        assert_eq!(cli.serial_max_bytes, 64 * 1024 * 1024);
        assert_eq!(cli.cmdline, None);
        assert_eq!(cli.id, DEFAULT_INSTANCE_ID);
        assert!(!cli.boot_timer && !cli.ksm && !cli.hugepages);
        assert!(!cli.no_seccomp && cli.seccomp_filter.is_none() && !cli.dump_guest_memory);
    }

    #[test]
    fn seccomp_is_off_only_when_asked_and_a_custom_filter_needs_it_on() {
        let cli = parse(&["--seccomp-filter", "filters.bpf", "--dump-guest-memory"]).unwrap();
        assert_eq!(cli.seccomp_filter, Some("filters.bpf".into()));
        assert!(cli.dump_guest_memory && !cli.no_seccomp);
        assert!(parse(&["--no-seccomp"]).unwrap().no_seccomp);
        assert!(parse(&["--no-seccomp", "--seccomp-filter", "filters.bpf"]).is_err());
    }

    #[test]
    fn serial_accepts_file_and_none() {
        let cli = parse(&["--serial", "file:/tmp/out"]).unwrap();
        assert_eq!(cli.serial, SerialOutput::File("/tmp/out".into()));
        let cli = parse(&["--serial", "none"]).unwrap();
        assert_eq!(cli.serial, SerialOutput::None);
        let cli = parse(&["--serial-max-bytes", "0"]).unwrap();
        assert_eq!(cli.serial_max_bytes, 0);
        assert!(parse(&["--serial-max-bytes", "-1"]).is_err());
    }

    #[test]
    fn serial_rejects_unknown_destinations() {
        assert!(parse(&["--serial", "tcp:1234"]).is_err());
        assert!(parse(&["--serial", "file:"]).is_err());
    }

    #[test]
    fn disks_take_ro_root_and_id_in_any_order() {
        let cli = parse(&[
            "--disk",
            "rootfs.ext4,root",
            "--disk",
            "data.img,id=data,ro",
        ])
        .unwrap();
        assert_eq!(
            cli.disks,
            [
                DiskSpec {
                    path: "rootfs.ext4".into(),
                    read_only: false,
                    root: true,
                    id: None
                },
                DiskSpec {
                    path: "data.img".into(),
                    read_only: true,
                    root: false,
                    id: Some("data".into())
                },
            ]
        );
    }

    #[test]
    fn disks_reject_unknown_repeated_and_empty_options() {
        for bad in [
            "",
            ",ro",
            "a.img,rw",
            "a.img,ro,ro",
            "a.img,id=",
            "a.img,id=x,id=y",
        ] {
            assert!(parse(&["--disk", bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nets_take_a_tap_and_a_mac() {
        let cli = parse(&[
            "--net",
            "tap=tap0,mac=06:00:00:00:00:01",
            "--net",
            "tap=tap1",
        ])
        .unwrap();
        assert_eq!(cli.nets[0].tap, "tap0");
        assert_eq!(cli.nets[0].mac.unwrap().to_string(), "06:00:00:00:00:01");
        assert_eq!(cli.nets[1].mac, None);
    }

    #[test]
    fn nets_reject_a_missing_tap_and_a_malformed_mac() {
        for bad in [
            "",
            "mac=06:00:00:00:00:01",
            "tap=",
            "tap=a,tap=b",
            "tap=a,mac=06:00:00:00:00",
            "tap=a,mac=zz:00:00:00:00:01",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,speed=10",
        ] {
            let err = parse(&["--net", bad]).unwrap_err().to_string();
            assert!(err.contains("--net"), "{bad:?}: {err}");
        }
    }

    fn parse_bare(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["ember"].iter().chain(args)).map(Cli::with_defaults)
    }

    #[test]
    fn with_nothing_to_boot_nor_a_socket_the_api_is_at_firecrackers_default() {
        for args in [&[][..], &["--id", "vm1"], &["--log-level", "debug"]] {
            let cli = parse_bare(args).unwrap();
            assert_eq!(cli.api_sock, Some(DEFAULT_API_SOCK.into()), "{args:?}");
        }
        assert_eq!(DEFAULT_API_SOCK, "/run/firecracker.socket");
        // A socket given, or a microVM to boot, keep their meaning.
        let cli = parse_bare(&["--api-sock", "/tmp/api.sock"]).unwrap();
        assert_eq!(cli.api_sock, Some("/tmp/api.sock".into()));
        for args in [
            &["--kernel", "vmlinux"][..],
            &["--config-file", "vm.json", "--no-api"],
        ] {
            assert_eq!(parse_bare(args).unwrap().api_sock, None, "{args:?}");
        }
        // A configuration file without --no-api: the API at the default, as in Firecracker.
        let cli = parse_bare(&["--config-file", "vm.json"]).unwrap();
        assert_eq!(cli.api_sock, Some(DEFAULT_API_SOCK.into()));
    }

    #[test]
    fn a_kernel_a_config_file_or_an_api_socket_is_required_with_no_api() {
        let err = parse_bare(&["--no-api"]).unwrap_err().to_string();
        assert!(
            err.contains("--kernel")
                && err.contains("--config-file")
                && !err.contains("--api-sock"),
            "{err}"
        );
        assert!(parse_bare(&["--config-file", "vm.json"]).is_ok());
        assert!(parse_bare(&["--api-sock", "/tmp/api.sock"]).is_ok());
        let cli = parse_bare(&["--config-file", "vm.json", "--no-api"]).unwrap();
        assert!(cli.no_api && cli.api_sock.is_none());
        // The flags that describe a microVM need the kernel flag; a file describes it whole.
        for flags in [
            &["--config-file", "vm.json", "--kernel", "vmlinux"][..],
            &["--config-file", "vm.json", "--disk", "a.img"],
            &["--api-sock", "s", "--initrd", "initrd"],
            &["--api-sock", "s", "--no-api"],
            &["--initrd", "initrd"],
            &["--no-api", "--id", "vm1"],
        ] {
            assert!(
                Cli::try_parse_from(["ember"].iter().chain(flags)).is_err(),
                "{flags:?}"
            );
        }
    }

    #[test]
    fn the_jailers_start_times_are_accepted() {
        let cli = parse_bare(&[
            "--id",
            "vm1",
            "--start-time-us",
            "5000000",
            "--start-time-cpu-us",
            "300",
            "--parent-cpu-time-us",
            "700",
        ])
        .unwrap();
        assert_eq!(cli.id, "vm1");
        assert_eq!(cli.start_time_us, Some(5_000_000));
        assert_eq!(cli.start_time_cpu_us, Some(300));
        assert_eq!(cli.parent_cpu_time_us, Some(700));
        assert_eq!(cli.api_sock, Some(DEFAULT_API_SOCK.into()));
        for bad in ["-1", "soon", ""] {
            assert!(parse(&["--start-time-us", bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_process_start_is_the_jailers_when_it_gives_one() {
        let now = Instant::now();
        let monotonic = Duration::from_secs(100);
        // No flags: the process starts when main does, with its CPU clock at zero.
        let start = parse(&[]).unwrap().process_start(now, monotonic);
        assert_eq!(start, ProcessStart::at(now));
        // The jailer started 2.5 s before main, on the same monotonic clock.
        let cli = parse(&[
            "--start-time-us",
            "97500000",
            "--start-time-cpu-us",
            "40",
            "--parent-cpu-time-us",
            "900",
        ])
        .unwrap();
        let start = cli.process_start(now, monotonic);
        assert_eq!(now.duration_since(start.wall), Duration::from_millis(2500));
        assert_eq!(start.cpu, Duration::from_micros(40));
        assert_eq!(start.cpu_elsewhere, Duration::from_micros(900));
        // A start in the future is now.
        let cli = parse(&["--start-time-us", "200000000"]).unwrap();
        assert_eq!(cli.process_start(now, monotonic).wall, now);
    }

    #[test]
    fn kernel_flags_and_numbers_are_checked() {
        assert!(parse(&["--vcpus", "256"]).is_err());
        assert!(parse(&["--vcpus", "-1"]).is_err());
        assert!(parse(&["--memory", "lots"]).is_err());
    }

    #[test]
    fn firecrackers_logging_flags_make_a_logger_configuration() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.logger_config(), None);
        assert_eq!(cli.metrics_config(), None);
        assert_eq!(cli.log_filter(), log::LevelFilter::Info);
        let cli = parse(&[
            "--log-path",
            "/tmp/log.fifo",
            "--level",
            "Warning",
            "--module",
            "ember_vmm::api",
            "--show-level",
            "--show-log-origin",
            "--metrics-path",
            "/tmp/metrics.fifo",
        ])
        .unwrap();
        assert_eq!(
            cli.logger_config(),
            Some(model::Logger {
                log_path: Some("/tmp/log.fifo".into()),
                level: Some(model::LogLevel::Warning),
                show_level: Some(true),
                show_log_origin: Some(true),
                module: Some("ember_vmm::api".into()),
            })
        );
        assert_eq!(
            cli.metrics_config(),
            Some(model::Metrics {
                metrics_path: "/tmp/metrics.fifo".into()
            })
        );
        assert_eq!(cli.log_filter(), log::LevelFilter::Warn);
        // One flag alone is enough, and sets only its field.
        let cli = parse(&["--show-log-origin"]).unwrap();
        assert_eq!(
            cli.logger_config(),
            Some(model::Logger {
                show_log_origin: Some(true),
                ..model::Logger::default()
            })
        );
    }

    #[test]
    fn level_takes_firecrackers_spellings_only() {
        for (text, level, filter) in [
            ("Off", model::LogLevel::Off, log::LevelFilter::Off),
            ("OFF", model::LogLevel::Off, log::LevelFilter::Off),
            ("Error", model::LogLevel::Error, log::LevelFilter::Error),
            ("ERROR", model::LogLevel::Error, log::LevelFilter::Error),
            ("Warning", model::LogLevel::Warning, log::LevelFilter::Warn),
            ("WARNING", model::LogLevel::Warning, log::LevelFilter::Warn),
            ("Warn", model::LogLevel::Warning, log::LevelFilter::Warn),
            ("WARN", model::LogLevel::Warning, log::LevelFilter::Warn),
            ("Info", model::LogLevel::Info, log::LevelFilter::Info),
            ("INFO", model::LogLevel::Info, log::LevelFilter::Info),
            ("Debug", model::LogLevel::Debug, log::LevelFilter::Debug),
            ("DEBUG", model::LogLevel::Debug, log::LevelFilter::Debug),
            ("Trace", model::LogLevel::Trace, log::LevelFilter::Trace),
            ("TRACE", model::LogLevel::Trace, log::LevelFilter::Trace),
        ] {
            let cli = parse(&["--level", text]).unwrap();
            assert_eq!(cli.level, Some(level), "{text}");
            assert_eq!(cli.log_filter(), filter, "{text}");
        }
        // Firecracker refuses these; so does ember.
        for bad in ["info", "warning", "dEbUg", "", "Verbose"] {
            assert!(parse(&["--level", bad]).is_err(), "{bad:?}");
        }
        // ember's own flag keeps its lowercase values, but not beside --level.
        assert!(parse(&["--log-level", "debug", "--level", "Info"]).is_err());
    }

    #[test]
    fn the_payload_and_mmds_limits_default_as_in_firecracker() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.http_api_max_payload_size, 51_200);
        assert_eq!(cli.mmds_size_limit, None);
        assert_eq!(cli.mmds_size_limit(), 51_200);
        let cli = parse(&["--http-api-max-payload-size", "1000"]).unwrap();
        assert_eq!(cli.mmds_size_limit(), 1000);
        let cli = parse(&[
            "--http-api-max-payload-size",
            "1000",
            "--mmds-size-limit",
            "70",
        ])
        .unwrap();
        assert_eq!(
            (cli.http_api_max_payload_size, cli.mmds_size_limit()),
            (1000, 70)
        );
        for bad in ["-1", "big", ""] {
            assert!(
                parse(&["--http-api-max-payload-size", bad]).is_err(),
                "{bad:?}"
            );
            assert!(parse(&["--mmds-size-limit", bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_must_be_json_within_the_mmds_size_limit() {
        let dir = std::env::temp_dir().join(format!("ember-cli-md-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("md.json");
        std::fs::write(&file, br#"{ "a" : [1, 2] }"#).unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(parse(&[]).unwrap().read_metadata(), Ok(None));
        let cli = parse(&["--metadata", path]).unwrap();
        assert_eq!(
            cli.read_metadata(),
            Ok(Some(serde_json::json!({"a": [1, 2]})))
        );
        // Measured as stored, `{"a":[1,2]}`: 11 bytes.
        let cli = parse(&["--metadata", path, "--mmds-size-limit", "11"]).unwrap();
        assert!(cli.read_metadata().is_ok());
        let cli = parse(&["--metadata", path, "--mmds-size-limit", "10"]).unwrap();
        assert!(
            cli.read_metadata()
                .unwrap_err()
                .contains("limit of 10 bytes")
        );
        std::fs::write(&file, b"[1,").unwrap();
        let cli = parse(&["--metadata", path]).unwrap();
        assert!(
            cli.read_metadata()
                .unwrap_err()
                .contains("Invalid metadata file")
        );
        let cli = parse(&["--metadata", "/nonexistent/md.json"]).unwrap();
        assert!(cli.read_metadata().unwrap_err().contains("Cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_id_is_checked_as_firecracker_checks_it() {
        let longest = "a".repeat(MAX_INSTANCE_ID_LEN);
        for good in ["a", "vm-1", "Z9", longest.as_str()] {
            assert_eq!(parse(&["--id", good]).unwrap().id, good);
        }
        let too_long = "a".repeat(MAX_INSTANCE_ID_LEN + 1);
        for bad in ["", "a_b", "a.b", "a/b", "a b", too_long.as_str()] {
            let err = parse(&["--id", bad]).unwrap_err().to_string();
            assert!(err.contains("Invalid instance ID"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn version_is_a_flag_of_its_own_that_needs_nothing_else() {
        let cli = Cli::try_parse_from(["ember", "--version"]).unwrap();
        assert!(cli.version);
        assert!(!parse(&[]).unwrap().version);
        assert_eq!(
            VERSION_LINE,
            format!("ember v{}\n", env!("CARGO_PKG_VERSION"))
        );
        // `-V` is not Firecracker's and is not taken.
        assert!(Cli::try_parse_from(["ember", "-V"]).is_err());
    }

    #[test]
    fn an_unknown_flag_is_an_error_that_names_it() {
        let err = parse(&["--mmds-size"]).unwrap_err().to_string();
        assert!(err.contains("--mmds-size"), "{err}");
        let err = parse(&["--snapshot-version"]).unwrap_err().to_string();
        assert!(err.contains("unexpected argument"), "{err}");
    }
}
