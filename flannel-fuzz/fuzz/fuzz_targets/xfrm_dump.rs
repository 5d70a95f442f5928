#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flannel_fuzz::xfrm_dump(data));
