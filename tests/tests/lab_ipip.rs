//! The ipip backend on the kernel the tests run on. A kernel without ipip tunnels (this machine's)
//! must make flanneld stop with an error that says so and what to do, before it takes a lease. On
//! a kernel with them, pods of two hosts ping each other through `flannel.ipip` (the full lab runs
//! in the test VM: tests/tests/vm_ipip.rs).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_tests::lab::Lab;

const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipip"}}"#;

#[test]
fn ipip_without_kernel_support_fails_clearly_and_takes_no_lease() {
    let test = "ipip_without_kernel_support_fails_clearly_and_takes_no_lease";
    let Some(mut lab) = Lab::for_test(test, vec![2], CONFIG, &[]) else {
        return;
    };
    if lab.hosts[0].has_ipip() {
        println!("{test}: this kernel has ipip tunnels: checking that pods ping through them");
        lab.start_all();
        for i in 0..2 {
            lab.add_pods(i, 1);
        }
        let failures = lab.ping_all(Duration::from_secs(30));
        assert!(failures.is_empty(), "{failures:?}");
        assert!(lab.hosts[0].routes("").contains("dev flannel.ipip onlink"));
        return;
    }
    let (code, log) = lab.run_flanneld_to_exit(0, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("this kernel has no ipip tunnels")
            && log.contains("Operation not supported")
            && log.contains("modprobe ipip")
            && !log.contains("invalid ipip backend options"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        lab.etcd_list("/coreos.com/network/subnets/").is_empty(),
        "a lease was taken: {:?}",
        lab.etcd_list("/coreos.com/network/subnets/")
    );
    assert!(!lab.hosts[0].subnet_file.exists(), "subnet.env was written");
    // The same config with EnableIPv6 is refused for what it is, whatever the kernel.
    let dual = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"ipip"}}"#;
    lab.etcd_put("/coreos.com/network/config", dual);
    let (code, log) = lab.run_flanneld_to_exit(1, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("IPv4 only"), "{log}");
}
