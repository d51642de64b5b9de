//! Any request target and Range header: routing and range parsing never panic, every accepted
//! name re-validates, and every accepted range lies inside the blob.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerd::oci::{parse_range, route, validate_name, Route};

fuzz_target!(|input: (&str, &str, u64)| {
    let (target, range, size) = input;
    if let Ok(Route::Blob { name, .. } | Route::Manifest { name, .. }) = route("GET", target) {
        assert!(validate_name(&name).is_ok());
        assert!(!name.contains(".."));
    }
    if let Ok(Some(r)) = parse_range(Some(range), size) {
        assert!(r.start <= r.end && r.end < size);
    }
});
