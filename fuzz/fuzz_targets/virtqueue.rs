//! Descriptor chains in a split virtqueue laid out by the guest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::virtio::virtqueue(data);
});
