//! Bytes a client sends on the API socket: HTTP requests, pipelined, and their routes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember_fuzz::api::api_request(data);
});
