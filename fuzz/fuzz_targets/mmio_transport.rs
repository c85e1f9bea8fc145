//! The virtio-mmio register interface, driven by the guest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::virtio::mmio_transport(data);
});
