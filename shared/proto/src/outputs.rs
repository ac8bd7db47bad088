//! The budget of one task's outputs, the same on both sides: the runner
//! keeps to it before it reports them (`TaskFinished.outputs`), and the
//! coordinator keeps no more of what it is reported, so an older or hostile
//! runner cannot grow the run record past the store's record limit.
//! Outputs travel in every later offer of the run, hence the small bounds.

use std::collections::BTreeMap;

/// Most outputs one task keeps, the runner's own included.
pub const MAX_OUTPUTS: usize = 100;
/// Most bytes of keys and values one task's outputs keep in all.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The outputs the runner records itself (its built-in steps' and each
/// container step's image): a task's own file cannot set them, and they
/// come first in the budget (`set-image` pins what a `push` recorded).
pub fn is_runners_own(key: &str) -> bool {
    matches!(
        key,
        "image" | "digest" | "commit" | "repo" | "branch" | "pull-request"
    ) || key.starts_with("steps.")
}

/// What of `outputs` the budget keeps, and the keys beyond it (in the order
/// they were dropped): the runner's own outputs first, then the others,
/// each in key order, until the first that does not fit; none after it is
/// kept.
pub fn within_budget(
    outputs: impl IntoIterator<Item = (String, String)>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut all: Vec<(String, String)> = outputs.into_iter().collect();
    all.sort_by(|a, b| (!is_runners_own(&a.0), &a.0).cmp(&(!is_runners_own(&b.0), &b.0)));
    let mut kept = BTreeMap::new();
    let mut dropped = Vec::new();
    let mut bytes = 0usize;
    for (key, value) in all {
        let size = key.len().saturating_add(value.len());
        let fits = dropped.is_empty()
            && kept.len() < MAX_OUTPUTS
            && bytes.saturating_add(size) <= MAX_OUTPUT_BYTES;
        if fits {
            bytes += size;
            kept.insert(key, value);
        } else {
            dropped.push(key);
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runners_own_first_then_in_key_order_until_one_does_not_fit() {
        let mut outputs: Vec<(String, String)> = (0..MAX_OUTPUTS)
            .map(|i| (format!("k{i:03}"), "v".to_owned()))
            .collect();
        outputs.push(("digest".into(), "sha256:ab".into()));
        let (kept, dropped) = within_budget(outputs);
        assert_eq!(kept.len(), MAX_OUTPUTS);
        assert!(kept.contains_key("digest"));
        assert_eq!(dropped, ["k099"]);

        // Bytes: once one does not fit, none after it is kept, even a
        // smaller one.
        let outputs = [
            ("a", "x".repeat(MAX_OUTPUT_BYTES - 10)),
            ("b", "x".repeat(100)),
            ("c", String::new()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let (kept, dropped) = within_budget(outputs);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(dropped, ["b", "c"]);

        // Exactly the budget is kept whole.
        let exact = [("k".to_owned(), "x".repeat(MAX_OUTPUT_BYTES - 1))];
        assert!(within_budget(exact).1.is_empty());
    }
}
