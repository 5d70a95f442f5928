//! The userspace WireGuard device's own CPU cost per packet, free of the kernel's work and of the
//! other processes on the machine (which make `bench-throughput`'s figures drift by a fifth from
//! run to run here): packets encrypted by one in-memory device and decrypted by another after a
//! real handshake, on this thread. Prints nanoseconds per packet for each side at two sizes (a
//! full 1420-byte packet and a 52-byte TCP ACK) and what one core would carry at that cost, the
//! best of `ROUNDS` rounds.
//!
//! Usage: `bench-wireguard-cpu [ROUNDS]` (default 7); no root needed. A release build measures
//! what flanneld runs (`cargo build --release -p flannel-tests --bins`).

use flannel_backend_wireguard::userspace::{DatapathFigures, measure_datapath};

const USAGE: &str = "usage: bench-wireguard-cpu [ROUNDS]
  ROUNDS: measurements per packet size, the best one printed, 1 to 100 (default 7)";

fn main() {
    let args = flannel_tests::bench::args(USAGE);
    let rounds = match args.as_slice() {
        [] => 7,
        [a] => flannel_tests::bench::number_arg(USAGE, "ROUNDS", a, 1..=100),
        _ => flannel_tests::bench::bad_args(USAGE, "one argument at most"),
    };
    println!("packet_bytes  encrypt_ns  decrypt_ns  encrypt_Gbit/s/core  decrypt_Gbit/s/core");
    for len in [1420u16, 52] {
        let mut best: Option<DatapathFigures> = None;
        for _ in 0..rounds.max(1) {
            let Some(f) = measure_datapath(len, 64, 400) else {
                eprintln!("bench-wireguard-cpu: packets were lost in memory: a bug");
                std::process::exit(1);
            };
            best = Some(match best {
                Some(b) => DatapathFigures {
                    encrypt_ns: b.encrypt_ns.min(f.encrypt_ns),
                    decrypt_ns: b.decrypt_ns.min(f.decrypt_ns),
                    ..b
                },
                None => f,
            });
        }
        if let Some(b) = best {
            let gbit = |ns: f64| f64::from(len) * 8.0 / ns;
            println!(
                "{len:>12}  {:>10.0}  {:>10.0}  {:>19.2}  {:>19.2}",
                b.encrypt_ns,
                b.decrypt_ns,
                gbit(b.encrypt_ns),
                gbit(b.decrypt_ns)
            );
        }
    }
}
