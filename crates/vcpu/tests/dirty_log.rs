//! Dirty page tracking: KVM logs the pages the guest writes, and a read of the log resets it.

mod common;

use std::sync::Arc;

use common::{CODE_ADDR, RAM_SIZE, TestVm, enter_real_mode};
use ember_vcpu::VcpuEvent;
use ember_vcpu::vm::{Error, VmOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `mov byte [0x3000], 1; mov byte [0x5004], 2; out 0x80, al; mov byte [0x7ff0], 3;
/// out 0x80, al; cli; hlt`
const WRITER: [u8; 21] = [
    0xc6, 0x06, 0x00, 0x30, 0x01, // mov byte [0x3000], 1
    0xc6, 0x06, 0x04, 0x50, 0x02, // mov byte [0x5004], 2
    0xe6, 0x80, // out 0x80, al
    0xc6, 0x06, 0xf0, 0x7f, 0x03, // mov byte [0x7ff0], 3
    0xe6, 0x80, // out 0x80, al
    0xfa, 0xf4, // cli; hlt
];

/// The numbers of the pages whose bits are set in `bitmap`.
fn pages(bitmap: &[u64]) -> Vec<usize> {
    (0..bitmap.len() * 64)
        .filter(|page| bitmap[page / 64] & (1 << (page % 64)) != 0)
        .collect()
}

fn memory_with_writer() -> Arc<GuestMemoryMmap> {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    memory
        .write_slice(&WRITER, GuestAddress(CODE_ADDR))
        .unwrap();
    Arc::new(memory)
}

#[test]
fn the_dirty_log_holds_exactly_the_pages_the_guest_wrote_and_is_reset_by_a_read() {
    let guest = TestVm::with_options(
        memory_with_writer(),
        VmOptions::new().track_dirty_pages(true),
    );
    assert!(guest.vm.options().track_dirty_pages);
    let mut vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);

    // Nothing written yet; the VMM's own writes (the code) are not logged.
    let log = guest.vm.dirty_log().unwrap();
    assert_eq!(log.len(), 1, "one bitmap per region");
    assert_eq!(log[0].len(), RAM_SIZE / 4096 / 64);
    assert_eq!(pages(&log[0]), [] as [usize; 0]);

    let out = VcpuEvent::IoOut { port: 0x80, len: 1 };
    assert_eq!(vcpu.run_once().unwrap(), out);
    // The two pages written; the code page was only read.
    assert_eq!(pages(&guest.vm.dirty_log().unwrap()[0]), [3, 5]);
    // The read reset the log.
    assert_eq!(pages(&guest.vm.dirty_log().unwrap()[0]), [] as [usize; 0]);

    assert_eq!(vcpu.run_once().unwrap(), out);
    assert_eq!(pages(&guest.vm.dirty_log().unwrap()[0]), [7]);
}

#[test]
fn a_vm_without_tracking_has_no_dirty_log() {
    let guest = TestVm::with_memory(memory_with_writer());
    assert!(!guest.vm.options().track_dirty_pages);
    let err = guest.vm.dirty_log().unwrap_err();
    assert!(matches!(err, Error::DirtyPagesNotTracked), "{err}");
}
