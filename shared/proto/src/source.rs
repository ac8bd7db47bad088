//! What a run's source may be: its `--repo` and `--rev`. The CLI checks them
//! before it sends a submit, the coordinator at submit, and the runner
//! again before its checkout hands them to git.

/// Longest `--rev` (a ref name; git itself has no limit, but no real one
/// is longer).
pub const MAX_REV_LEN: usize = 255;
/// Longest `--repo`.
pub const MAX_REPO_LEN: usize = 2048;

/// A commit id (7 to 64 hex digits: abbreviated, SHA-1 or SHA-256) or a
/// ref name by `git check-ref-format --allow-onelevel`'s rules, not
/// starting with `-` (option-like). Revision expressions (`HEAD~1`,
/// `main^{tree}`, `@{-1}`) are not refs and are refused. `Err` says why.
pub fn check_rev(rev: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "--rev `{}` is not a commit SHA or a valid ref name: {why}",
            rev.escape_debug()
        ))
    };
    if rev.is_empty() {
        return refuse("it is empty");
    }
    if rev.len() > MAX_REV_LEN {
        return refuse(&format!("it is longer than {MAX_REV_LEN} bytes"));
    }
    let hex = rev.chars().all(|c| c.is_ascii_hexdigit());
    if hex && (7..=64).contains(&rev.len()) {
        return Ok(());
    }
    if rev.starts_with('-') {
        return refuse("it starts with `-`");
    }
    if let Some(c) = rev
        .chars()
        .find(|&c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return refuse(&format!(
            "it contains {}",
            if c.is_control() || c == ' ' {
                format!("{:?}", c)
            } else {
                format!("`{c}`")
            }
        ));
    }
    for (bad, why) in [
        ("..", "it contains `..`"),
        // `\u{7b}` is an open brace, spelled so that braces balance here.
        ("@\u{7b}", "it contains `@\u{7b}`"),
        ("//", "it contains `//`"),
    ] {
        if rev.contains(bad) {
            return refuse(why);
        }
    }
    if rev == "@" {
        return refuse("`@` alone is not a ref");
    }
    if rev.starts_with('/') || rev.ends_with('/') {
        return refuse("it starts or ends with `/`");
    }
    if rev.ends_with('.') {
        return refuse("it ends with `.`");
    }
    if rev
        .split('/')
        .any(|part| part.starts_with('.') || part.ends_with(".lock"))
    {
        return refuse("a part of it starts with `.` or ends with `.lock`");
    }
    Ok(())
}

/// A repository URL or path: no control characters and not option-like.
pub fn check_repo(repo: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "--repo `{}` is not a repository URL: {why}",
            crate::redact::redact_urls(repo).escape_debug()
        ))
    };
    if repo.is_empty() {
        return refuse("it is empty");
    }
    if repo.len() > MAX_REPO_LEN {
        return refuse(&format!("it is longer than {MAX_REPO_LEN} bytes"));
    }
    if repo.starts_with('-') {
        return refuse("it starts with `-`");
    }
    if repo.chars().any(char::is_control) {
        return refuse("it contains a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shas_and_ref_names_pass() {
        for rev in [
            "abc1234",
            "0123456789abcdef0123456789abcdef01234567",
            &"a".repeat(64),
            "main",
            "HEAD",
            "release/1.2",
            "refs/tags/v1.0.0",
            "feature/x-y_z",
            "main;touch",
            "a.b",
            "@x",
        ] {
            assert_eq!(check_rev(rev), Ok(()), "{rev}");
        }
    }

    #[test]
    fn everything_else_is_refused_with_the_reason() {
        for (rev, why) in [
            ("", "it is empty"),
            ("-n", "it starts with `-`"),
            ("--upload-pack=x", "it starts with `-`"),
            ("main two", "it contains ' '"),
            ("main\nx", "it contains '\\n'"),
            ("a\u{7f}", "it contains '\\u{7f}'"),
            ("HEAD~1", "it contains `~`"),
            ("main^{tree}", "it contains `^`"),
            ("a:b", "it contains `:`"),
            ("a?", "it contains `?`"),
            ("a*", "it contains `*`"),
            ("a[b", "it contains `[`"),
            ("a\\b", "it contains `\\`"),
            ("a..b", "it contains `..`"),
            ("a@{1}", "it contains `@{`"),
            ("a//b", "it contains `//`"),
            ("@", "`@` alone is not a ref"),
            ("/main", "it starts or ends with `/`"),
            ("main/", "it starts or ends with `/`"),
            ("main.", "it ends with `.`"),
            (
                ".hidden",
                "a part of it starts with `.` or ends with `.lock`",
            ),
            ("a/.b", "a part of it starts with `.` or ends with `.lock`"),
            (
                "main.lock",
                "a part of it starts with `.` or ends with `.lock`",
            ),
        ] {
            assert_eq!(
                check_rev(rev),
                Err(format!(
                    "--rev `{}` is not a commit SHA or a valid ref name: {why}",
                    rev.escape_debug()
                )),
                "{rev:?}"
            );
        }
        let long = "a/".repeat(200);
        assert_eq!(
            check_rev(&long),
            Err(format!(
                "--rev `{long}` is not a commit SHA or a valid ref name: it is longer than 255 bytes"
            ))
        );
    }

    #[test]
    fn repos_must_not_look_like_options() {
        for repo in [
            "https://git.example.com/org/app.git",
            "git@host:org/app.git",
            "/srv/git/app",
        ] {
            assert_eq!(check_repo(repo), Ok(()));
        }
        for (repo, why) in [
            ("", "it is empty"),
            ("--upload-pack=touch f", "it starts with `-`"),
            ("https://x/\na", "it contains a control character"),
        ] {
            assert_eq!(
                check_repo(repo),
                Err(format!(
                    "--repo `{}` is not a repository URL: {why}",
                    repo.escape_debug()
                ))
            );
        }
    }
}
