//! Cron expressions, read by the `cron` crate (no parser of our own).

use std::str::FromStr as _;

/// A cron expression: 5 fields (minute first) or 6-7 (seconds first, then
/// an optional year), as the `cron` crate reads them.
pub(crate) fn parse_cron(text: &str) -> Result<::cron::Schedule, String> {
    let fields = text.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {text}")
    } else {
        text.to_string()
    };
    ::cron::Schedule::from_str(&full).map_err(|e| {
        format!(
            "bad cron expression `{text}`: {e}; write 5 fields (`0 3 * * *`: 03:00 every day) \
             or 6 with seconds first"
        )
    })
}
