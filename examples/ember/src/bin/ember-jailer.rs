//! `ember-jailer`: starts a VMM (normally `ember`) in a jail, with Firecracker's jailer's
//! command line.
//!
//! ```text
//! ember-jailer --id ID --exec-file PATH --uid UID --gid GID [--chroot-base-dir DIR]
//!     [--netns PATH] [--daemonize] [--new-pid-ns] [--cgroup-version 1|2]
//!     [--cgroup FILE=VALUE]... [--parent-cgroup NAME] [--resource-limit RES=N]...
//!     [--keep-fd N]... -- ARGS FOR THE VMM
//! ```
//!
//! A bad command line prints `Arguments parsing error: ...` and exits 1; any other failure prints
//! `Jailer error: ...` and exits 1. On success it becomes the VMM (exec), or, with
//! `--new-pid-ns`, exits 0 once the VMM's pid is written in the jail. The jailer runs without a
//! seccomp filter; the VMM installs its own after exec. See `ember_vmm::jailer`.

use std::process::ExitCode;

use clap::Parser;

use ember_vmm::controller::error_chain;
use ember_vmm::jailer::{self, JailConfig, StartTimes, args::Args};

fn main() -> ExitCode {
    let start = StartTimes::now();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let text = err.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text).trim_end();
            eprintln!("Arguments parsing error: {text}");
            return ExitCode::FAILURE;
        }
    };
    let result = JailConfig::from_args(args)
        .map_err(jailer::Error::from)
        .and_then(|config| jailer::run(&config, start));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Jailer error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
