//! `ember-snapshot-editor`: works on ember's snapshot files offline, with the commands of
//! Firecracker's `snapshot-editor` that apply to them.
//!
//! ```text
//! ember-snapshot-editor edit-memory rebase --memory-path BASE --diff-path DIFF
//! ember-snapshot-editor info-vmstate version --vmstate-path STATE
//! ```
//!
//! `rebase` copies the pages a diff snapshot's memory file holds onto the memory file of the
//! snapshot it was taken after (a full one, or one rebased already), at their offsets: what is
//! left is a full memory file that restores with the diff's state file. Diffs are applied
//! oldest first. `version` prints the state file's format version (`v1`). Errors print a line
//! and exit 1.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ember_vmm::controller::error_chain;
use ember_vmm::vmm::snapshot;

/// Works on ember's snapshot files.
#[derive(Debug, Parser)]
#[command(name = "ember-snapshot-editor", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Edits memory files.
    #[command(subcommand)]
    EditMemory(EditMemory),
    /// Reads state files.
    #[command(subcommand)]
    InfoVmstate(InfoVmstate),
}

#[derive(Debug, Subcommand)]
enum EditMemory {
    /// Copies the pages of a diff memory file onto its base memory file.
    Rebase {
        /// The base memory file, written in place.
        #[arg(long, value_name = "PATH")]
        memory_path: PathBuf,
        /// The diff snapshot's memory file.
        #[arg(long, value_name = "PATH")]
        diff_path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum InfoVmstate {
    /// Prints the state file's format version.
    Version {
        /// The state file.
        #[arg(long, value_name = "PATH")]
        vmstate_path: PathBuf,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::EditMemory(EditMemory::Rebase {
            memory_path,
            diff_path,
        }) => rebase(&memory_path, &diff_path),
        Command::InfoVmstate(InfoVmstate::Version { vmstate_path }) => {
            snapshot::describe(&vmstate_path)
                .map(|version| println!("{version}"))
                .map_err(|e| {
                    format!(
                        "Cannot read {}: {}",
                        vmstate_path.display(),
                        error_chain(&e)
                    )
                })
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            eprintln!("ember-snapshot-editor: {line}");
            ExitCode::FAILURE
        }
    }
}

fn rebase(memory: &PathBuf, diff: &PathBuf) -> Result<(), String> {
    let open = |path: &PathBuf, write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| format!("Cannot open {}: {e}", path.display()))
    };
    let base: File = open(memory, true)?;
    let diff_file: File = open(diff, false)?;
    let copied = ember_memory::merge_diff(&base, &diff_file).map_err(|e| {
        format!(
            "Cannot rebase {} onto {}: {}",
            diff.display(),
            memory.display(),
            error_chain(&e)
        )
    })?;
    println!("{copied} bytes copied");
    Ok(())
}
