//! Reading a Prometheus text scrape.

use std::collections::BTreeMap;

/// Every sample of a scrape (`name{labels}` -> value), comments skipped.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}
