//! Bytes a guest sends to the MMDS on one TCP connection, arriving in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::mmds_http::mmds_request(data);
});
