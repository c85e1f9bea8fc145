//! Kernel command lines: building one from untrusted parts and writing it to guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::cmdline(data);
});
