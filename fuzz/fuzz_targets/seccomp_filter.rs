//! A compiled seccomp filter file (`--seccomp-filter`): parsed, and written back when valid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::seccomp::seccomp_filter(data);
});
