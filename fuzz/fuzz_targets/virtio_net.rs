//! virtio-net: frames the guest transmits and the network sends it, through its queues.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::virtio::virtio_net(data);
});
