#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flannel_fuzz::vxlan_peer_data(data));
