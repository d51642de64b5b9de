//! Any bytes as a manifest: parsing and media-type detection never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerd::oci::ManifestDoc;

fuzz_target!(|data: &[u8]| {
    if let Some(doc) = ManifestDoc::parse(data) {
        let _ = doc.detect_media_type();
        let _ = doc.children().count();
    }
});
