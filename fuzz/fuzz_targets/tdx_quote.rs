#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| silk_fuzz::tdx_quote(data));
