//! The environment a host-process step (the `shell` executor) starts from:
//! an allow-list of the runner's own variables, never the runner's whole
//! environment, which holds its credentials (`CAPSTAN_REGISTRATION_TOKEN`,
//! `CAPSTAN_SECRET_*`) and whatever else its service manager put there.
//! The step's variables ([`super::step_env`]) go over it.

use std::collections::BTreeMap;

/// Variables passed through as they are in the runner's environment.
const PASSED: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM",
];

/// Whether a variable of the runner's environment is passed to steps:
/// [`PASSED`] and the locale's `LC_*`.
pub(crate) fn passed(name: &str) -> bool {
    PASSED.contains(&name) || name.starts_with("LC_")
}

/// The allow-listed part of the runner's environment (variables that are
/// not UTF-8 are left out).
pub(crate) fn base() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| passed(k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allow_list_passes() {
        for name in [
            "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM",
        ] {
            assert!(passed(name), "{name}");
        }
        for name in [
            "CAPSTAN_REGISTRATION_TOKEN",
            "CAPSTAN_SECRET_REGISTRY",
            "CAPSTAN_WORK_DIR",
            "AWS_SECRET_ACCESS_KEY",
            "SSH_AUTH_SOCK",
            "LD_PRELOAD",
            "path",
            "LC",
        ] {
            assert!(!passed(name), "{name}");
        }
    }
}
