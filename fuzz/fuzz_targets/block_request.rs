//! virtio-blk requests a guest lays out in descriptor chains.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::virtio::block_request(data);
});
