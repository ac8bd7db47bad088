//! Quantities as users write them, parsed in one place for pipeline files
//! (`timeout: 5m`, `memory: 1.5g`) and daemon flags (`--docker-memory 1.5g`,
//! `--max-step-log 256m`, `--retention 30d`) alike, so the two cannot drift.

use std::time::Duration;

/// Longest task or step timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `30s`, `5m`, `1h30m`, `90` (seconds): whole seconds, 1s to 7 days.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "bad timeout `{s}`: use a duration such as `30s`, `5m` or `1h30m`, or a whole number of seconds"
        )
    };
    let t = s.trim();
    let secs: u64 = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().map_err(|_| bad())?
    } else {
        let mut total: u64 = 0;
        let mut last_unit = u64::MAX;
        let mut rest = t;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit = match rest.as_bytes().first() {
                Some(b'h') => 3600,
                Some(b'm') => 60,
                Some(b's') => 1,
                _ => return Err(bad()),
            };
            rest = &rest[1..];
            // Units in decreasing order, each at most once: `1h30m`, not `30m1h`.
            if unit >= last_unit {
                return Err(bad());
            }
            last_unit = unit;
            total = n
                .checked_mul(unit)
                .and_then(|x| total.checked_add(x))
                .ok_or_else(bad)?;
        }
        total
    };
    let d = Duration::from_secs(secs);
    if secs == 0 {
        Err(format!("timeout `{s}` must be at least 1 second"))
    } else if d > MAX_TIMEOUT {
        Err(format!(
            "timeout `{s}` is longer than the limit of 7 days (168h)"
        ))
    } else {
        Ok(d)
    }
}

/// A lifetime as daemons and the CLI take it (`--retention 30d`,
/// `--expires 90d`): whole days (`30d`), or what [`parse_timeout`] takes
/// (`12h`, `1h30m`, `90s`).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("bad duration `{text}`: use a duration such as `30d`, `12h` or `90m`");
    match t.strip_suffix('d') {
        Some(days) if !days.is_empty() && days.bytes().all(|b| b.is_ascii_digit()) => {
            let days: u64 = days.parse().map_err(|_| bad())?;
            if days == 0 {
                return Err(bad());
            }
            Ok(Duration::from_secs(
                days.checked_mul(24 * 3600).ok_or_else(bad)?,
            ))
        }
        _ => parse_timeout(t).map_err(|_| bad()),
    }
}

/// A memory size: bytes, or a number with `k`, `m` or `g` (powers of 1024).
pub fn parse_memory(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.char_indices().last()? {
        (i, 'k') => (&t[..i], 1u64 << 10),
        (i, 'm') => (&t[..i], 1 << 20),
        (i, 'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n.is_finite() && n > 0.0).then_some((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_days_or_timeouts() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 24 * 3600)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        let bad = "bad duration `a week`: use a duration such as `30d`, `12h` or `90m`";
        assert_eq!(parse_age("a week"), Err(bad.to_string()));
        assert!(parse_age("0d").is_err());
    }

    #[test]
    fn memory_sizes_in_powers_of_1024_with_fractions() {
        assert_eq!(parse_memory("1g"), Some(1 << 30));
        assert_eq!(parse_memory("2g"), Some(2 << 30));
        assert_eq!(parse_memory("lots"), None);
        assert_eq!(parse_memory("100"), Some(100));
        assert_eq!(parse_memory("512M"), Some(512 << 20));
        assert_eq!(parse_memory("1.5g"), Some(3 << 29));
        assert_eq!(parse_memory("64kb"), Some(64 << 10));
        for bad in ["12x", "", "0", "-1m", "g", "nan", "inf"] {
            assert_eq!(parse_memory(bad), None, "{bad}");
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_timeout("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(parse_timeout("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_timeout("168h"), Ok(MAX_TIMEOUT));
        for bad in [
            "",
            "5x",
            "m",
            "1.5h",
            "30m1h",
            "5m5m",
            "-1",
            "0",
            "0s",
            "169h",
            "99999999999999999999h",
        ] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_bad_duration_says_what_to_write() {
        assert!(
            parse_timeout("5x")
                .unwrap_err()
                .contains("`5x`: use a duration")
        );
    }
}
