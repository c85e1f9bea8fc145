//! Kernel images: loading, initrd placement and boot setup from an untrusted image.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::load_kernel(data);
});
