//! The built `ember-uffd-handler` serving a VMM's guest memory: the VMM's side is
//! ember-memory's Uffd backend in this process, the handler a process of its own, as in
//! production. Where this process may not create a userfaultfd (see ember-memory's `uffd`
//! module), the tests that need one print why and pass without checking anything.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ember_memory::uffd::{Error, create_guest_memory_uffd};
use ember_memory::{Bytes, GuestAddress, MemoryOptions};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

const PAGE: usize = 4096;
/// Guest memory size in the tests: 2 MiB.
const MEM_SIZE: usize = 2 << 20;
/// How long a handler gets to start or to finish.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The byte at `offset` of the memory file: each page holds its own pattern.
fn file_byte(offset: usize) -> u8 {
    ((offset / PAGE) as u8).wrapping_mul(7) ^ (offset as u8)
}

/// A temporary directory with the memory file `mem` and the path of the socket `uffd.sock`.
fn setup() -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new_with_prefix("/tmp/ember-uffd-handler-").unwrap();
    let mem = dir.as_path().join("mem");
    let bytes: Vec<u8> = (0..MEM_SIZE).map(file_byte).collect();
    File::create(&mem).unwrap().write_all(&bytes).unwrap();
    let socket = dir.as_path().join("uffd.sock");
    (dir, mem, socket)
}

/// Starts the handler and waits for its socket to appear.
fn start(socket: &Path, mem: &Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_ember-uffd-handler"))
        .arg(socket)
        .arg(mem)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < TIMEOUT, "the handler did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Waits for the handler to exit; its status, stdout and stderr.
fn finish(mut child: Child) -> (ExitStatus, String, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            child.kill().unwrap();
            panic!("the handler did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

#[test]
fn serves_a_vmm_s_pages_from_the_file_and_counts_them() {
    let (mem_and_userfault, reason) =
        match create_guest_memory_uffd(MEM_SIZE as u64, MemoryOptions::default()) {
            Ok(pair) => (Some(pair), None),
            Err(err @ (Error::Permission(_) | Error::Unsupported(_))) => (None, Some(err)),
            Err(err) => panic!("{err:?}"),
        };
    let Some((mem, mut userfault)) = mem_and_userfault else {
        eprintln!("skipped: {}", reason.unwrap());
        return;
    };
    let (_dir, mem_path, socket) = setup();
    let handler = start(&socket, &mem_path);
    let regions = userfault.regions().to_vec();
    userfault.send_to_handler(&socket, &regions).unwrap();

    for page in [0usize, 1, 300, 511] {
        let mut bytes = vec![0u8; PAGE];
        mem.read_slice(&mut bytes, GuestAddress((page * PAGE) as u64))
            .unwrap();
        let expected: Vec<u8> = (page * PAGE..(page + 1) * PAGE).map(file_byte).collect();
        assert_eq!(bytes, expected, "page {page}");
    }
    // Touched again: no new fault.
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(300 * PAGE as u64 + 5))
            .unwrap(),
        file_byte(300 * PAGE + 5)
    );

    // The VMM goes away: the handler reports and cleans up.
    drop(userfault);
    let (status, out, err) = finish(handler);
    assert!(status.success(), "{status}: {err}");
    assert_eq!(out, "faults=4 bytes=16384 zero_pages=0 removes=0\n");
    assert!(!socket.exists());
}

/// Connects to a started handler and sends `message` with a descriptor attached.
fn send_raw(socket: &Path, message: &[u8]) -> UnixStream {
    let stream = UnixStream::connect(socket).unwrap();
    let fd = File::open("/dev/null").unwrap();
    stream.send_with_fd(message, fd.as_raw_fd()).unwrap();
    stream
}

#[test]
fn a_message_that_is_not_json_is_refused() {
    let (_dir, mem_path, socket) = setup();
    let handler = start(&socket, &mem_path);
    // The start of an array: the handler waits for the rest, which never comes.
    drop(send_raw(&socket, b"[{\"base_host_virt_addr\": "));
    let (status, out, err) = finish(handler);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty());
    assert!(err.contains("closed the connection"), "{err}");

    let handler = start(&socket, &mem_path);
    let _vmm = send_raw(&socket, b"regions, please");
    let (status, _, err) = finish(handler);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not a JSON array of guest memory regions"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn regions_past_the_end_of_the_file_are_refused() {
    let (_dir, mem_path, socket) = setup();
    let handler = start(&socket, &mem_path);
    let message = serde_json::json!([{
        "base_host_virt_addr": 0x7f00_0000_0000u64,
        "size": MEM_SIZE,
        "offset": PAGE,
        "page_size": PAGE,
        "page_size_kib": PAGE,
    }]);
    let _vmm = send_raw(&socket, message.to_string().as_bytes());
    let (status, _, err) = finish(handler);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("Guest memory region 0 of the VMM's message is invalid"),
        "{err}"
    );
    assert!(err.contains("pass the end"), "{err}");
}

#[test]
fn a_socket_path_in_use_or_a_missing_file_is_refused() {
    let (_dir, mem_path, socket) = setup();
    File::create(&socket).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ember-uffd-handler"))
        .arg(&socket)
        .arg(&mem_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Cannot listen on"), "{err}");
    // A socket path it did not create is left alone.
    assert!(socket.exists());

    let out = Command::new(env!("CARGO_BIN_EXE_ember-uffd-handler"))
        .arg(&socket)
        .arg(mem_path.with_file_name("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Cannot open the memory file"), "{err}");
}

#[test]
fn wrong_arguments_print_the_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember-uffd-handler"))
        .arg("only-one")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("usage: ember-uffd-handler"));
}
