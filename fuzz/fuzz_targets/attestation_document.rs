#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| silk_fuzz::attestation_document(data));
