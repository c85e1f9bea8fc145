//! `ember`: an example microVM monitor built from the ember crates.
//!
//! It boots a Linux guest from a kernel (ELF vmlinux, PVH or bzImage) and an optional initrd, with a
//! serial console, an i8042 whose reset line ends the VM, and an optional boot-timer device. It
//! exits 0 when the guest reboots or powers off, and non-zero with a one-line error otherwise.

mod cli;
mod logger;
mod terminal;
mod vmm;

use std::error::Error as _;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = cli::Cli::parse();
    logger::init(start, cli.log_level.into());

    match vmm::run(&cli, start) {
        Ok(exit) => {
            log::info!("{exit}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            // One line: the error and each of its sources.
            let mut line = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                line.push_str(": ");
                line.push_str(&cause.to_string());
                source = cause.source();
            }
            eprintln!("ember: {line}");
            ExitCode::FAILURE
        }
    }
}
