//! The command line of `ember`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Kernel command line used when `--cmdline` is not given: serial console, reset through the i8042
/// keyboard controller on reboot, reboot one second after a panic, and no PCI probing (ember has no
/// PCI bus).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Boot a Linux guest in a microVM.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about)]
pub struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage (the format is detected).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk loaded beside the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub memory: u64,

    /// Where the guest's serial console goes: `stdio`, `file:PATH` or `none`.
    #[arg(long, value_name = "DEST", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialOutput,

    /// Add the boot-timer device: the guest writes 123 to it and ember logs the time since start.
    #[arg(long)]
    pub boot_timer: bool,

    /// Let the host's KSM merge identical guest pages (MADV_MERGEABLE).
    #[arg(long)]
    pub ksm: bool,

    /// Back guest memory with transparent huge pages where the host can (MADV_HUGEPAGE).
    #[arg(long)]
    pub hugepages: bool,

    /// Most verbose level of ember's own log messages, written to stderr.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: LogLevel,
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
        assert_eq!(cli.cmdline, DEFAULT_CMDLINE);
        assert!(!cli.boot_timer && !cli.ksm && !cli.hugepages);
    }

    #[test]
    fn serial_accepts_file_and_none() {
        let cli = parse(&["--serial", "file:/tmp/out"]).unwrap();
        assert_eq!(cli.serial, SerialOutput::File("/tmp/out".into()));
        let cli = parse(&["--serial", "none"]).unwrap();
        assert_eq!(cli.serial, SerialOutput::None);
    }

    #[test]
    fn serial_rejects_unknown_destinations() {
        assert!(parse(&["--serial", "tcp:1234"]).is_err());
        assert!(parse(&["--serial", "file:"]).is_err());
    }

    #[test]
    fn kernel_is_required_and_numbers_are_checked() {
        assert!(Cli::try_parse_from(["ember"]).is_err());
        assert!(parse(&["--vcpus", "256"]).is_err());
        assert!(parse(&["--vcpus", "-1"]).is_err());
        assert!(parse(&["--memory", "lots"]).is_err());
    }
}
