//! virtio-vsock: the guest's packets and host processes, through the Unix-socket backend.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::vsock::virtio_vsock(data);
});
