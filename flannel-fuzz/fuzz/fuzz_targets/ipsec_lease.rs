#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flannel_fuzz::ipsec_lease(data));
