//! The wireguard backend's kernel devices, in a kernel that has WireGuard: the test VM
//! (`scripts/test-vm`; this machine's kernel may have none) runs `vm-wireguard-lab`, a 3-host lab
//! where two hosts use the kernel's `flannel-wg` and one userspace WireGuard. The lab checks that
//! pods ping across both kinds, that `wg show` sees the key, port and peers the leases say, that a
//! removed peer, a changed port and a deleted device are repaired, that traffic goes on while
//! flanneld is stopped and the restart takes the device over, that a peer's new key is followed,
//! and, in a dual-stack lab (`Mode: separate`), that `flannel-wg-v6` is a kernel device whose peer
//! is reached at its IPv6 address; in an IPv6-only network (Kubernetes mode), that pods ping over
//! the kernel's `flannel-wg-v6` (`Mode: separate`) or `flannel-wg` (`Mode: auto`) alone, each peer
//! at its IPv6 address.

#[test]
fn kernel_wireguard_devices_in_a_vm() {
    flannel_tests::vm::Vm::run_lab("kernel_wireguard_devices_in_a_vm", "vm-wireguard-lab");
}
