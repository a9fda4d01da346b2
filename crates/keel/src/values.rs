//! Parsers of command-line values shared by every command.

use std::time::Duration;

/// Parses a duration in the config file's grammar (`10ms`, `30s`, `7days`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("bad duration {text:?}: {err}"))
}
