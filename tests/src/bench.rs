//! Helpers the lab benchmarks share: fake peers, counting their kernel entries on a host, waiting
//! until they are all there, and reading a process's memory figures.

use std::time::{Duration, Instant};

use crate::lab::Lab;

/// How many fake peers there can be: their public IPs (`172.20.(1 + 100g + i/250).(1 + i%250)`)
/// stay valid addresses up to this many, and their subnets (`10.(100 + i/256).…`) beyond it.
pub const MAX_FAKE_PEERS: usize = 38_500;

/// Fake peer `i` (of up to [`MAX_FAKE_PEERS`]) in "generation" `g` (0 or 1: an update moves every
/// peer to new values). Its subnet is `10.(100 + i/256).(i%256).0/24`.
#[derive(Debug, Clone)]
pub struct FakePeer {
    /// The subnet, `A.B.C.D/24`.
    pub subnet: String,
    /// Its public IP (on the lab's underlay /16, so host-gw accepts it).
    pub public_ip: String,
    /// Its VTEP MAC (`02:00:00:0g:…`).
    pub mac: String,
}

impl FakePeer {
    /// Peer `i` in generation `g`.
    pub fn new(i: usize, g: u8) -> Self {
        let (a, b) = (i / 256, i % 256);
        Self {
            subnet: format!("10.{}.{b}.0/24", 100 + a),
            public_ip: format!(
                "172.20.{}.{}",
                1 + usize::from(g) * 100 + i / 250,
                1 + i % 250
            ),
            mac: format!("02:00:00:0{g}:{a:02x}:{b:02x}"),
        }
    }

    /// The vxlan backend data Go writes: `{"VNI":1,"VtepMAC":"…"}`.
    pub fn vxlan_data(&self) -> String {
        format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, self.mac)
    }

    /// The wireguard backend data upstream writes, `{"PublicKey":"…","Port":51820}`, with a key
    /// of its own (its MAC's bytes in an otherwise fixed key).
    pub fn wireguard_data(&self) -> String {
        let mut key = [0x5au8; 32];
        for (k, part) in key.iter_mut().zip(self.mac.split(':')) {
            *k = u8::from_str_radix(part, 16).unwrap_or(0);
        }
        let key = flannel_backend_wireguard::Key(key);
        format!(r#"{{"PublicKey":"{key}","Port":51820}}"#)
    }
}

/// The lease value a fake peer's host writes for `backend` (`vxlan`, `host-gw` or `wireguard`).
pub fn lease_value(p: &FakePeer, backend: &str) -> String {
    let data = match backend {
        "vxlan" => format!(r#","BackendData":{}"#, p.vxlan_data()),
        "wireguard" => format!(r#","BackendData":{}"#, p.wireguard_data()),
        _ => String::new(),
    };
    format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"{backend}"{data}}}"#,
        p.public_ip
    )
}

/// Entries of fake peers of generation `g` on host `h`: (routes, neighbours, FDB entries). A route
/// counts when it goes into `10.1xx` (and, for host-gw, via a generation-`g` address). For
/// wireguard: (the device's peers with a `10.1xx` subnet at a generation-`g` endpoint, 0, 0), as
/// `wg show` reads them.
pub fn counts(lab: &Lab, h: usize, backend: &str, g: u8) -> (usize, usize, usize) {
    let host = &lab.hosts[h];
    // The public IP's third octet tells the generation (1..=100 or 101..=200).
    let lo = 1 + usize::from(g) * 100;
    let generation_after = |l: &str, marker: &str| {
        l.split(marker)
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .and_then(|o| o.parse::<usize>().ok())
            .is_some_and(|o| (lo..lo + 100).contains(&o))
    };
    if backend == "wireguard" {
        let dump = lab
            .wg(h, &["show", "flannel-wg", "dump"])
            .unwrap_or_default();
        let peers = dump
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                f.len() > 3 && f[3].starts_with("10.1") && generation_after(f[2], "172.20.")
            })
            .count();
        return (peers, 0, 0);
    }
    let routes = host
        .ns
        .exec(&["ip", "-4", "route", "show"])
        .unwrap_or_default();
    let via_generation = |l: &str| generation_after(l, " via 172.20.");
    let r = routes
        .lines()
        .filter(|l| l.starts_with("10.1") && (backend == "vxlan" || via_generation(l)))
        .count();
    if backend != "vxlan" {
        return (r, 0, 0);
    }
    let mac = format!("02:00:00:0{g}:");
    let neigh = host
        .ns
        .exec(&["ip", "neigh", "show", "dev", "flannel.1"])
        .unwrap_or_default();
    let fdb = host
        .ns
        .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])
        .unwrap_or_default();
    (
        r,
        neigh
            .lines()
            .filter(|l| l.starts_with("10.1") && l.contains(&format!("lladdr {mac}")))
            .count(),
        fdb.lines().filter(|l| l.starts_with(&mac)).count(),
    )
}

fn complete(c: (usize, usize, usize), n: usize, backend: &str) -> bool {
    if backend == "vxlan" {
        c == (n, n, n)
    } else {
        c.0 == n
    }
}

fn missing(c: (usize, usize, usize), n: usize, backend: &str) -> usize {
    if backend == "vxlan" {
        3 * n - (c.0 + c.1 + c.2).min(3 * n)
    } else {
        n - c.0.min(n)
    }
}

/// Waits until every host in `hosts` holds exactly `n` fake peers' entries of generation `g`;
/// returns the time taken and the entries still missing at `timeout`.
pub fn wait_for(
    lab: &Lab,
    hosts: &[usize],
    n: usize,
    backend: &str,
    g: u8,
    timeout: Duration,
) -> (Duration, usize) {
    let start = Instant::now();
    loop {
        let poll = Instant::now();
        let all: Vec<_> = hosts.iter().map(|&h| counts(lab, h, backend, g)).collect();
        if all.iter().all(|&c| complete(c, n, backend)) {
            return (start.elapsed(), 0);
        }
        if start.elapsed() > timeout {
            return (
                start.elapsed(),
                all.iter().map(|&c| missing(c, n, backend)).sum(),
            );
        }
        // Poll at most half the time: at 20,000 peers one look (`ip` dumping three tables on each
        // host) takes long enough to starve flanneld of the two cores otherwise.
        let looked = poll.elapsed();
        std::thread::sleep(looked.max(Duration::from_millis(10)));
    }
}

/// A `/proc/<pid>/status` figure in MiB (`VmRSS:`, `VmHWM:`); 0 when unknown.
pub fn status_mib(pid: Option<u32>, field: &str) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A benchmark's command-line arguments (without the program name). `-h` or `--help` prints
/// `usage` and exits 0.
pub fn args(usage: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        std::process::exit(0);
    }
    args
}

/// Refuses the command line: names `problem`, prints `usage` and exits 2.
pub fn bad_args(usage: &str, problem: &str) -> ! {
    eprintln!("{problem}\n{usage}");
    std::process::exit(2);
}

/// `arg` as a number in `range`, or [`bad_args`] naming `what`.
pub fn number_arg(
    usage: &str,
    what: &str,
    arg: &str,
    range: std::ops::RangeInclusive<usize>,
) -> usize {
    match arg.parse::<usize>() {
        Ok(n) if range.contains(&n) => n,
        _ => bad_args(
            usage,
            &format!(
                "{what} must be a number from {} to {}, not {arg:?}",
                range.start(),
                range.end()
            ),
        ),
    }
}

/// The CPUs this process may run on (its affinity mask, which a cpuset or `taskset` narrows), in
/// ascending order; empty if the kernel will not say.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask the kernel fills; its size is passed with it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// `cpu` alone as the kernel writes a CPU mask in sysfs (`rps_cpus`): hexadecimal groups of 32
/// bits, highest first, joined by commas (`1`, `80000000`, `1,00000000`).
pub fn cpu_mask(cpu: usize) -> String {
    let mut groups = vec![0u32; cpu / 32 + 1];
    groups[cpu / 32] = 1 << (cpu % 32);
    groups
        .iter()
        .rev()
        .enumerate()
        .map(|(i, g)| {
            if i == 0 {
                format!("{g:x}")
            } else {
                format!("{g:08x}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The CPUs in a sysfs CPU mask (as [`cpu_mask`] writes one, of any width, with leading zero
/// groups), ascending; `None` if `mask` is not one.
pub fn parse_cpu_mask(mask: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for (i, group) in mask.trim().rsplit(',').enumerate() {
        if group.is_empty() || group.len() > 8 {
            return None;
        }
        let bits = u32::from_str_radix(group, 16).ok()?;
        cpus.extend((0..32).filter(|b| bits & (1 << b) != 0).map(|b| i * 32 + b));
    }
    cpus.sort_unstable();
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_as_sysfs_writes_them() {
        assert_eq!(cpu_mask(0), "1");
        assert_eq!(cpu_mask(1), "2");
        assert_eq!(cpu_mask(31), "80000000");
        assert_eq!(cpu_mask(32), "1,00000000");
        assert_eq!(cpu_mask(70), "40,00000000,00000000");
        for cpu in [0, 1, 5, 31, 32, 63, 64, 100, 1023] {
            assert_eq!(parse_cpu_mask(&cpu_mask(cpu)), Some(vec![cpu]), "cpu {cpu}");
        }
    }

    #[test]
    fn cpu_masks_read_back_from_sysfs() {
        // A machine with more than 64 CPUs pads the mask with zero groups: still CPU 1 alone.
        assert_eq!(
            parse_cpu_mask("00000000,00000000,00000002\n"),
            Some(vec![1])
        );
        assert_eq!(parse_cpu_mask("3"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_mask("0"), Some(vec![]));
        assert_eq!(parse_cpu_mask("1,00000001"), Some(vec![0, 32]));
        for bad in ["", "x", "1,,2", "123456789", ","] {
            assert_eq!(parse_cpu_mask(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_process_may_run_somewhere() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "sched_getaffinity gave no CPU");
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{cpus:?}");
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        assert!(cpus.len() >= n, "{cpus:?} but available_parallelism {n}");
    }
}
