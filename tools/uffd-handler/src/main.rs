//! `ember-uffd-handler SOCKET_PATH MEM_FILE`: an example page-fault handler for the `Uffd`
//! memory backend of snapshot restore (ember's and Firecracker's).
//!
//! It listens on the Unix socket `SOCKET_PATH`, accepts one VMM, receives its guest memory
//! regions (a JSON array) with the userfaultfd attached, maps `MEM_FILE` and answers each page
//! fault with a copy of the page from the file (a zero page where the VMM removed the page,
//! as a balloon does), until the VMM goes away. It then prints one line,
//! `faults=N bytes=M zero_pages=Z removes=R`, removes the socket and exits with status 0. A
//! message it cannot use (not JSON, regions past the end of the file, no userfaultfd attached)
//! ends it with a message on stderr and status 1.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ember_memory::uffd::{FaultHandler, FaultStats};

const USAGE: &str = "\
usage: ember-uffd-handler SOCKET_PATH MEM_FILE

Listens on the Unix socket SOCKET_PATH for one VMM restoring a snapshot with the Uffd memory
backend, and serves its guest memory's page faults from MEM_FILE until the VMM goes away.
Prints `faults=N bytes=M zero_pages=Z removes=R` at the end.
";

/// Removes the socket file it names when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, mem_file] = args.as_slice() else {
        if args.iter().any(|a| a == "-h" || a == "--help") {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    match serve(Path::new(socket), Path::new(mem_file)) {
        Ok(stats) => {
            print_summary(&stats);
            ExitCode::SUCCESS
        }
        Err((message, stats)) => {
            if let Some(stats) = stats {
                print_summary(&stats);
            }
            eprintln!("ember-uffd-handler: {message}");
            ExitCode::FAILURE
        }
    }
}

fn print_summary(stats: &FaultStats) {
    println!(
        "faults={} bytes={} zero_pages={} removes={}",
        stats.faults, stats.bytes, stats.zero_pages, stats.removes
    );
}

/// An error's message with its sources.
fn describe(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        message.push_str(": ");
        message.push_str(&err.to_string());
        source = err.source();
    }
    message
}

/// Serves one VMM; the error comes with what was done before it, once serving had begun.
fn serve(socket: &Path, mem_file: &Path) -> Result<FaultStats, (String, Option<FaultStats>)> {
    let file = File::open(mem_file).map_err(|e| {
        let message = format!("Cannot open the memory file {}: {e}", mem_file.display());
        (message, None)
    })?;
    let listener = UnixListener::bind(socket).map_err(|e| {
        let message = format!("Cannot listen on {}: {e}", socket.display());
        (message, None)
    })?;
    let _socket_file = SocketFile(socket.to_path_buf());
    let (stream, _) = listener.accept().map_err(|e| {
        let message = format!("Cannot accept a VMM on {}: {e}", socket.display());
        (message, None)
    })?;
    // One VMM only: nobody else can connect meanwhile.
    drop(listener);
    let mut handler =
        FaultHandler::from_stream(&stream, &file).map_err(|e| (describe(&e), None))?;
    match handler.run(&stream) {
        Ok(_) => Ok(handler.stats()),
        Err(e) => Err((describe(&e), Some(handler.stats()))),
    }
}
