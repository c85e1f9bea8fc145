//! The metadata service's network stack: sequences of frames a guest sends it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::mmds::mmds_stack(data);
});
