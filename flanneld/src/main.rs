//! The flanneld binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    flanneld::main_with_args(std::env::args_os())
}
