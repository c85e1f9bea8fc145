//! The guest's accesses to the serial console's registers, and the VMM's input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::serial::serial(data);
});
