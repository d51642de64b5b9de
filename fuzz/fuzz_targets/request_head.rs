//! Any bytes as a request head: parsing never panics, and a parsed head routes without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerd::dataplane::http::parse_head;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = parse_head(data) {
        assert!(used <= data.len());
        let _ = peerd::oci::route(&req.method_name, &req.target);
    }
});
