//! # flanneld
//!
//! The flannel agent as a library plus a thin `main`. [`main_with_args`] is the whole program: parse
//! flags (Go flanneld's names, also from `FLANNELD_*`), set up logging, connect to etcd, wait for the
//! network config, choose the external interface, register the backend named by `Backend.Type`,
//! write `subnet.env`, then keep the lease and the data plane up until SIGINT/SIGTERM. The data plane
//! and the lease are left in place on exit, so a restart does not disturb pods.
//!
//! A third party builds its own flanneld with an extra backend by linking its backend crate and
//! calling [`main_with_args`]:
//!
//! ```no_run
//! // src/main.rs of a crate that depends on flanneld and on its backend crate `my_backend`,
//! // which calls flannel_core::register_backend!("my-backend", ...) once.
//! // use my_backend as _; // make sure the linker keeps the registration
//! fn main() -> std::process::ExitCode {
//!     flanneld::main_with_args(std::env::args_os())
//! }
//! ```
//!
//! See `examples/flanneld-peerlog` in the repository for a complete one.

mod blackhole;
pub mod cni;
pub mod config;
pub mod docker_opts;
mod health;
pub mod iptables;
mod logging;
pub mod metrics;
pub mod nftables;
mod run;

use std::ffi::OsString;
use std::process::ExitCode;

pub use config::{Cli, Settings};
pub use run::run;

// Name every in-tree backend crate so the linker keeps their registrations.
use flannel_backend_alloc as _;
use flannel_backend_extension as _;
use flannel_backend_hostgw as _;
use flannel_backend_ipip as _;
use flannel_backend_ipsec as _;
use flannel_backend_udp as _;
use flannel_backend_vxlan as _;
use flannel_backend_wireguard as _;

/// The flanneld version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs flanneld with the given command line (including the program name) and returns its exit code:
/// 0 after a signal, `--help` or `--version`; 1 on a fatal error; 2 on a malformed command line.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let cli = match config::parse(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if cli.version == Some(true) {
        eprintln!("{VERSION}");
        return ExitCode::SUCCESS;
    }
    let settings = match config::load(&cli, None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flanneld: {e:#}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = logging::init(settings.log) {
        eprintln!("flanneld: setting up logging: {e:#}");
        return ExitCode::from(1);
    }
    flannel_dataplane::memory::keep_large_blocks_apart();
    // One thread is plenty for an agent, and keeps glibc to one malloc arena (less resident memory).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flanneld: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(run::cancel_on_signals(shutdown.clone()));
        // After a stop signal, a step that is still waiting (a child process, a store that does not
        // answer) is abandoned after a short grace; its child processes are killed on drop.
        let stuck = async {
            shutdown.cancelled().await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        };
        tokio::select! {
            r = run(settings, shutdown.clone()) => r,
            () = stuck => {
                tracing::warn!("a step did not finish within 1 s of the stop signal; exiting anyway");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("flanneld: {e:#}");
            ExitCode::from(1)
        }
    }
}
