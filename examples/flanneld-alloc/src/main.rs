//! A flanneld that also knows the `alloc` backend.

use flanneld_alloc as _; // keep the backend registration in the binary

fn main() -> std::process::ExitCode {
    flanneld::main_with_args(std::env::args_os())
}
