//! tracing setup: human-readable by default, JSON with `--log-format=json`; the level from `-v` unless
//! `RUST_LOG` is set. Colour (ANSI escapes) only when stderr is a terminal and `NO_COLOR` is unset or
//! empty, as `ls` and `cargo` do: a log written to a file or a pipe stays plain text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Whether log lines may carry ANSI colour: only on a terminal, and never with a non-empty
/// `NO_COLOR` (<https://no-color.org>).
pub(crate) fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

pub(crate) fn init(log: LogSettings) -> anyhow::Result<()> {
    let level = match log.verbosity {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = if log.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::use_colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new(""))));
    }
}
