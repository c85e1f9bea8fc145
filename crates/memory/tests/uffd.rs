//! The Uffd memory backend as a VMM and its page-fault handler use it: guest memory registered
//! with a userfaultfd, sent over a Unix socket to a handler (a thread here, a process in
//! production) that serves every first access from a memory file, whether the access comes from
//! the VMM's own code or from KVM running a vCPU.
//!
//! The tests need a kernel that lets this process create a userfaultfd that handles kernel
//! faults (root, `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1` or `/dev/userfaultfd`); they
//! print why and pass without checking anything where it does not.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use ember_memory::uffd::{
    Error, FaultHandler, FaultStats, Stop, Userfault, create_guest_memory_uffd,
};
use ember_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryOptions,
};
use vmm_sys_util::tempdir::TempDir;

const PAGE: usize = 4096;
/// Guest memory size in the tests: 1 MiB, 256 pages.
const MEM_SIZE: usize = 1 << 20;

/// The byte at `offset` of the memory file: each page holds its own pattern.
fn file_byte(offset: usize) -> u8 {
    let page = offset / PAGE;
    (page as u8).wrapping_mul(31) ^ (offset as u8)
}

/// A temporary directory with the memory file `mem` of [`MEM_SIZE`] bytes, page 1 replaced by
/// `code` when given.
fn memory_file(code: Option<(&[u8], &[u8])>) -> (TempDir, PathBuf) {
    let dir = TempDir::new_with_prefix("/tmp/ember-uffd-").unwrap();
    let path = dir.as_path().join("mem");
    let mut bytes: Vec<u8> = (0..MEM_SIZE).map(file_byte).collect();
    if let Some((code, data)) = code {
        bytes[PAGE..2 * PAGE].fill(0);
        bytes[PAGE..PAGE + code.len()].copy_from_slice(code);
        bytes[2 * PAGE..2 * PAGE + data.len()].copy_from_slice(data);
    }
    File::create(&path).unwrap().write_all(&bytes).unwrap();
    (dir, path)
}

/// Uffd-backed guest memory, or `None` (with the reason printed) where this process may not
/// create a userfaultfd.
fn uffd_memory() -> Option<(GuestMemoryMmap, Userfault)> {
    match create_guest_memory_uffd(MEM_SIZE as u64, MemoryOptions::default()) {
        Ok(pair) => Some(pair),
        Err(err @ (Error::Permission(_) | Error::Unsupported(_))) => {
            eprintln!("skipped: {err}");
            None
        }
        Err(err) => panic!("{err:?}"),
    }
}

/// A handler thread listening on `socket` in `dir`, serving the memory file `mem_file`: it
/// returns what it did once the VMM is gone.
fn spawn_handler(socket: &Path, mem_file: &Path) -> JoinHandle<FaultStats> {
    let listener = UnixListener::bind(socket).unwrap();
    let file = File::open(mem_file).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut handler = FaultHandler::from_stream(&stream, &file).unwrap();
        assert_eq!(handler.run(&stream).unwrap(), Stop::VmmGone);
        handler.stats()
    })
}

/// Hands `userfault` to a handler thread serving the memory file `memory_file(code)` makes;
/// returns the file's directory, to keep while the handler serves, and the handler.
fn served(
    userfault: &mut Userfault,
    code: Option<(&[u8], &[u8])>,
) -> (TempDir, JoinHandle<FaultStats>) {
    let (dir, mem_path) = memory_file(code);
    let socket = dir.as_path().join("uffd.sock");
    let handler = spawn_handler(&socket, &mem_path);
    let regions = userfault.regions().to_vec();
    userfault.send_to_handler(&socket, &regions).unwrap();
    (dir, handler)
}

#[test]
fn first_accesses_are_served_from_the_file_one_page_each() {
    let Some((mem, mut userfault)) = uffd_memory() else {
        return;
    };
    let (_dir, handler) = served(&mut userfault, None);
    let regions = userfault.regions();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].size, MEM_SIZE as u64);
    assert_eq!(regions[0].offset, 0);

    // Reads from three pages: each is the file's.
    for page in [0usize, 5, 200] {
        let mut bytes = vec![0u8; PAGE];
        mem.read_slice(&mut bytes, GuestAddress((page * PAGE) as u64))
            .unwrap();
        let expected: Vec<u8> = (page * PAGE..(page + 1) * PAGE).map(file_byte).collect();
        assert_eq!(bytes, expected, "page {page}");
    }
    // A page read again is not faulted again.
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(5 * PAGE as u64 + 7))
            .unwrap(),
        file_byte(5 * PAGE + 7)
    );
    // A first write faults the page in from the file, then writes over it.
    mem.write_obj(0xabu8, GuestAddress(7 * PAGE as u64))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(7 * PAGE as u64)).unwrap(),
        0xab
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(7 * PAGE as u64 + 1))
            .unwrap(),
        file_byte(7 * PAGE + 1)
    );

    // Dropping the VMM's end stops the handler; page 6, never touched, was never served.
    drop(userfault);
    let stats = handler.join().unwrap();
    assert_eq!(stats.faults, 4);
    assert_eq!(stats.bytes, 4 * PAGE as u64);
    assert_eq!(stats.zero_pages, 0);
}

#[test]
fn pages_the_vmm_removes_fault_back_in_as_zeroes() {
    let Some((mem, mut userfault)) = uffd_memory() else {
        return;
    };
    let (_dir, handler) = served(&mut userfault, None);

    let addr = GuestAddress(3 * PAGE as u64 + 9);
    assert_eq!(mem.read_obj::<u8>(addr).unwrap(), file_byte(3 * PAGE + 9));
    // A balloon gives the page back to the host: the handler gets a remove event (madvise
    // waits until it has read it), and the next access finds zeroes, not the file.
    let host = mem.get_host_address(GuestAddress(3 * PAGE as u64)).unwrap();
    // SAFETY: `host` is the start of a page of guest memory that `mem` maps; MADV_DONTNEED on a
    // private anonymous mapping only drops the page's contents.
    let ret = unsafe { libc::madvise(host.cast(), PAGE, libc::MADV_DONTNEED) };
    assert_eq!(ret, 0);
    assert_eq!(mem.read_obj::<u8>(addr).unwrap(), 0);
    // Other pages still come from the file.
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(4 * PAGE as u64)).unwrap(),
        file_byte(4 * PAGE)
    );

    drop(userfault);
    let stats = handler.join().unwrap();
    assert_eq!(stats.faults, 3);
    assert_eq!(stats.zero_pages, 1);
    assert_eq!(stats.removes, 1);
    assert_eq!(stats.bytes, 2 * PAGE as u64);
}

#[test]
fn kvm_faults_guest_pages_in_through_the_handler() {
    use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
    use kvm_ioctls::{Kvm, VcpuExit};

    let Ok(kvm) = Kvm::new() else {
        eprintln!("skipped: /dev/kvm cannot be opened");
        return;
    };
    let Some((mem, mut userfault)) = uffd_memory() else {
        return;
    };
    // Real mode at 0x1000: mov al, [0x2000]; out 0x80, al; hlt. The byte at 0x2000 is 0x5a.
    let code = [0xa0, 0x00, 0x20, 0xe6, 0x80, 0xf4];
    let (_dir, handler) = served(&mut userfault, Some((&code, &[0x5a])));

    let vm = kvm.create_vm().unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let slot_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
        // outlives the VM (dropped at the end of the test, after `vm`).
        unsafe { vm.set_user_memory_region(slot_region).unwrap() };
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_regs {
        rip: 0x1000,
        rflags: 0x2,
        ..Default::default()
    })
    .unwrap();

    // The vCPU blocks in the kernel on each first access until the handler copies the page in.
    let mut out = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => out.push((port, data.to_vec())),
            VcpuExit::Hlt => break,
            exit => panic!("unexpected exit {exit:?}"),
        }
    }
    assert_eq!(out, [(0x80, vec![0x5a])]);

    drop(vcpu);
    drop(vm);
    drop(userfault);
    let stats = handler.join().unwrap();
    // The code page and the data page, nothing else.
    assert_eq!(stats.faults, 2);
    assert_eq!(stats.bytes, 2 * PAGE as u64);
}

#[test]
fn no_handler_listening_is_a_clear_error() {
    let Some((_mem, mut userfault)) = uffd_memory() else {
        return;
    };
    let dir = TempDir::new_with_prefix("/tmp/ember-uffd-").unwrap();
    let socket = dir.as_path().join("nobody.sock");
    let regions = userfault.regions().to_vec();
    let err = userfault.send_to_handler(&socket, &regions).unwrap_err();
    assert!(matches!(err, Error::HandlerNotListening { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("No page-fault handler listens on {}", socket.display())
    );

    // A socket file left with nobody behind it reads the same.
    drop(UnixListener::bind(&socket).unwrap());
    let err = userfault.send_to_handler(&socket, &regions).unwrap_err();
    assert!(matches!(err, Error::HandlerNotListening { .. }), "{err:?}");
}

#[test]
fn the_userfaultfd_goes_to_one_handler_only() {
    let Some((_mem, mut userfault)) = uffd_memory() else {
        return;
    };
    let dir = TempDir::new_with_prefix("/tmp/ember-uffd-").unwrap();
    let socket = dir.as_path().join("uffd.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let regions = userfault.regions().to_vec();
    userfault.send_to_handler(&socket, &regions).unwrap();
    assert!(matches!(
        userfault.send_to_handler(&socket, &regions),
        Err(Error::AlreadySent)
    ));
}

#[test]
fn regions_follow_the_memory_file_layout() {
    use ember_memory::layout::MMIO32_START;

    // RAM on both sides of the MMIO gap: the region above it comes after the one below in the
    // file.
    let size = MMIO32_START + 2 * PAGE as u64;
    let (mem, userfault) = match create_guest_memory_uffd(size, MemoryOptions::default()) {
        Ok(pair) => pair,
        Err(err @ (Error::Permission(_) | Error::Unsupported(_))) => {
            eprintln!("skipped: {err}");
            return;
        }
        Err(err) => panic!("{err:?}"),
    };
    let regions = userfault.regions();
    assert_eq!(regions.len(), 2);
    for (region, guest) in regions.iter().zip(mem.iter()) {
        let host = mem.get_host_address(guest.start_addr()).unwrap();
        assert_eq!(region.base_host_virt_addr, host as u64);
        assert_eq!(region.size, guest.len());
        assert_eq!(region.page_size, PAGE as u64);
        assert_eq!(region.page_size_kib, PAGE as u64);
    }
    assert_eq!(regions[0].offset, 0);
    assert_eq!(regions[1].offset, MMIO32_START);
}

#[test]
fn refusals_say_what_to_change() {
    let err = Error::Permission(std::io::Error::from_raw_os_error(libc::EPERM));
    let text = err.to_string();
    assert!(text.contains("vm.unprivileged_userfaultfd"), "{text}");
    assert!(text.contains("CAP_SYS_PTRACE"), "{text}");
    assert!(text.contains("/dev/userfaultfd"), "{text}");
}
