//! Any request target and Range header: routing and range parsing never panic, every accepted
//! name re-validates, every accepted range lies inside the blob, and a streaming URL that the
//! egress policy accepts is https, to no local or link-local IP, and still carries its digest.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerd::egress::{forbidden, ip_literal, Egress};
use peerd::oci::{parse_range, route, validate_name, Route};

fuzz_target!(|input: (&str, &str, u64)| {
    let (target, range, size) = input;
    if let Ok(Route::Blob { name, .. } | Route::Manifest { name, .. }) = route("GET", target) {
        assert!(validate_name(&name).is_ok());
        assert!(!name.contains(".."));
    }
    if let Ok(Route::StreamBlob { digest, url }) = route("GET", target) {
        if let Ok(u) = Egress::default().check(&url, &digest) {
            assert_eq!(u.scheme(), "https");
            assert!(!ip_literal(&u).is_some_and(forbidden));
            assert!(u.path().contains(digest.hex()));
        }
    }
    if let Ok(Some(r)) = parse_range(Some(range), size) {
        assert!(r.start <= r.end && r.end < size);
    }
});
