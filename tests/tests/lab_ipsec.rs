//! The ipsec backend on the kernel the tests run on. A kernel without ESP (this machine's) must
//! make flanneld stop with an error that says so and what to do, before it starts charon or takes
//! a lease. On a kernel with ESP, pods of two hosts ping each other through the tunnels (the full
//! lab runs in the test VM: tests/tests/vm_ipsec.rs). Bad options are refused whatever the kernel.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use flannel_tests::lab::Lab;

const PSK: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn config(extra: &str) -> String {
    format!(r#"{{"Network":"10.5.0.0/16"{extra},"Backend":{{"Type":"ipsec","PSK":"{PSK}"}}}}"#)
}

#[test]
fn ipsec_needs_esp_and_says_so_before_taking_a_lease() {
    let test = "ipsec_needs_esp_and_says_so_before_taking_a_lease";
    let Some(mut lab) = Lab::for_test(test, vec![2], &config(""), &[]) else {
        return;
    };
    for h in &mut lab.hosts {
        h.private_run = true;
    }
    let subnets = |lab: &Lab| lab.etcd_list("/coreos.com/network/subnets/");
    if lab.hosts[0].has_esp() {
        println!("{test}: this kernel has ESP: checking that pods ping through the tunnels");
        lab.start_all();
        for i in 0..2 {
            lab.add_pods(i, 1);
        }
        let failures = lab.ping_all(Duration::from_secs(60));
        assert!(failures.is_empty(), "{failures:?}");
    } else {
        let (code, log) = lab.run_flanneld_to_exit(0, Duration::from_secs(30));
        assert_eq!(code, Some(1), "{log}");
        assert!(
            log.contains("this kernel has no ESP") && log.contains("modprobe esp4"),
            "{log}"
        );
        assert!(
            !log.contains("started charon") && !log.contains("panicked"),
            "{log}"
        );
        assert!(
            subnets(&lab).is_empty(),
            "a lease was taken: {:?}",
            subnets(&lab)
        );
        assert!(!lab.hosts[0].subnet_file.exists(), "subnet.env was written");
    }

    // Refused whatever the kernel, before anything starts: a short key, IPv6.
    let short = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipsec","PSK":"too-short"}}"#;
    lab.etcd_put("/coreos.com/network/config", short);
    let before = subnets(&lab).len();
    let (code, log) = lab.run_flanneld_to_exit(1, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("PSK is 9 bytes long") && log.contains("96"),
        "{log}"
    );
    lab.etcd_put(
        "/coreos.com/network/config",
        &config(r#","EnableIPv6":true,"IPv6Network":"fd00:5::/48""#),
    );
    let (code, log) = lab.run_flanneld_to_exit(1, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("IPv4 only"), "{log}");
    assert_eq!(subnets(&lab).len(), before, "no lease for a refused config");
}
