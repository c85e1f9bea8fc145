//! A snapshot's state file: loaded, written back, and its devices' states restored.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::snapshot::snapshot_state(data);
});
