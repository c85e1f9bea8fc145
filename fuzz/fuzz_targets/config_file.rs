//! A configuration file: parsed, validated and written back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::api::config_file(data);
});
