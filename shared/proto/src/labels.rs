//! Runner labels as written on command lines and in queries: `k=v,k=v`.
//! One parser for the runner's `--labels`, `capstan runner-token create
//! --labels`, the coordinator's `--runner-pool` and the demand endpoint's
//! `?runner_labels=`.

use std::collections::BTreeMap;

/// Parses `k=v,k=v` (empty string: no labels); blanks around keys, values
/// and pairs are ignored.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not of the form key=value"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("`{pair}` has an empty key"));
        }
        labels.insert(k.to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_malformed_ones_say_why() {
        let labels = parse(" pool=eph , os=linux,").unwrap();
        assert_eq!(labels.get("pool").map(String::as_str), Some("eph"));
        assert_eq!(labels.len(), 2);
        assert!(parse("").unwrap().is_empty());
        assert_eq!(
            parse("a=1,b").unwrap_err(),
            "`b` is not of the form key=value"
        );
        assert_eq!(parse("=1").unwrap_err(), "`=1` has an empty key");
    }
}
