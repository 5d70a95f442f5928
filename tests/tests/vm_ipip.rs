//! The ipip backend in a kernel that has ipip tunnels: the test VM (`scripts/test-vm`; this
//! machine's kernel has none) runs `vm-ipip-lab`, a 3-host lab on two underlay segments. The lab
//! checks that pods ping across hosts (also across the router), that `flannel.ipip` and the routes
//! are upstream's (local address, MTU, the subnet's /32, `via <PublicIP> dev flannel.ipip onlink`),
//! the lease is upstream's, the underlay carries IP-in-IP only, a deleted route and a deleted
//! device are repaired, an old device with other ends is made again, a vxlan lease is ignored, a
//! departed peer's route goes, traffic goes on while flanneld is stopped and the restart takes the
//! device over, that DirectRouting routes the hosts of one segment without the tunnel, and that
//! Kubernetes mode writes upstream's annotations and pods ping; then the demo with `--backend ipip`.

#[test]
fn ipip_backend_in_a_vm() {
    flannel_tests::vm::Vm::run_lab("ipip_backend_in_a_vm", "vm-ipip-lab");
}
