//! A flanneld that also knows the `peer-log` backend.

use flanneld_peerlog as _; // keep the backend registration in the binary

fn main() -> std::process::ExitCode {
    flanneld::main_with_args(std::env::args_os())
}
