//! tracing setup: human-readable by default, JSON with `--log-format=json`; the level from `-v` unless
//! `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;

use crate::Config;

pub(crate) fn init(config: &Config) -> anyhow::Result<()> {
    let level = match config.v {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if config.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
