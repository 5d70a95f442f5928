//! The ipsec backend in a kernel that has ESP: the test VM (`scripts/test-vm`; this machine's
//! kernel has no ESP) runs `vm-ipsec-lab`, a 3-host lab on two underlay segments where each
//! flanneld starts its own strongSwan charon. The lab checks upstream's lease, MTU, xfrm policies
//! (three per peer, request id 11) and charon connections (upstream's names), that pods ping across
//! hosts (also across the router), that the underlay carries their packets in ESP only, that a
//! deleted policy is put back, that a charon that died is started again with the key and the
//! connections, that a vxlan lease is ignored and a departed peer's policies and connection go,
//! that the pods' traffic goes on across a flanneld restart, Kubernetes mode (upstream's Node
//! annotations, policies between the pod CIDRs, pods ping), `UDPEncap` (MTU 1415, ESP in UDP 4500
//! on the wire), and the demo with `--backend ipsec`.

#[test]
fn ipsec_backend_in_a_vm() {
    flannel_tests::vm::Vm::run_lab("ipsec_backend_in_a_vm", "vm-ipsec-lab");
}
