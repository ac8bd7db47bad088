//! Credentials in URLs, hidden wherever a URL is shown: logs, trace spans,
//! the run as the API returns it, CLI output, error messages. A URL's
//! password (`http://bob:pw@host/r.git`) becomes `***`
//! (`http://bob:***@host/r.git`); the user name stays, as git and curl
//! show it, so an operator can still tell which account was used.
//!
//! [`redact_url`] is for a value known to be a URL (a run's `repo`);
//! [`redact_urls`] for free text that may quote URLs (git's and the
//! engine's error messages). Both leave text without credentials as it is
//! and never fail.

use std::borrow::Cow;

/// What a password is replaced with.
pub const REDACTED: &str = "***";

/// `url` with the password of its userinfo replaced by [`REDACTED`].
pub fn redact_url(url: &str) -> Cow<'_, str> {
    redact_urls(url)
}

/// `text` with the password of every `scheme://user:password@` in it
/// replaced by [`REDACTED`].
pub fn redact_urls(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut done = 0; // bytes of `text` already in `out`
    let mut from = 0;
    while let Some(at) = text[from..].find("://") {
        let authority_start = from + at + 3;
        from = authority_start;
        let rest = &text[authority_start..];
        // The authority ends at the path, query, fragment or whitespace.
        let end = rest
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        // The last `@` ends the userinfo (a password may hold an unescaped `@`).
        let Some(at_sign) = authority.rfind('@') else {
            continue;
        };
        let Some(colon) = authority[..at_sign].find(':') else {
            continue;
        };
        let password = &authority[colon + 1..at_sign];
        if password.is_empty() || password == REDACTED {
            continue;
        }
        let pw_start = authority_start + colon + 1;
        out.push_str(&text[done..pw_start]);
        out.push_str(REDACTED);
        done = authority_start + at_sign;
        from = done;
    }
    if done == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[done..]);
    Cow::Owned(out)
}

/// Where the password of `url`'s userinfo lies (a byte range of `url`),
/// if it has a non-empty one: for splitting it off to store it apart.
pub fn password_range(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest
        .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    let at_sign = authority.rfind('@')?;
    let colon = authority[..at_sign].find(':')?;
    let range = start + colon + 1..start + at_sign;
    (!range.is_empty()).then_some(range)
}

/// The password in `url`'s userinfo, raw and percent-decoded (both forms
/// may appear in output), for a masker that hides it in logs.
pub fn url_passwords(url: &str) -> Vec<String> {
    let Some(range) = password_range(url) else {
        return Vec::new();
    };
    let raw = &url[range];
    let mut out = vec![raw.to_string()];
    let decoded = percent_decode(raw);
    if decoded != raw {
        out.push(decoded);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && s.is_char_boundary(i + 1)
            && s.is_char_boundary(i + 3)
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden_and_the_rest_is_kept() {
        for (given, want) in [
            ("http://bob:pw@host/r.git", "http://bob:***@host/r.git"),
            ("https://bob:p@ss@host:8443", "https://bob:***@host:8443"),
            (
                "fetch from http://x:s3cret@10.0.0.1/a.git failed; retry http://y:t@h/b",
                "fetch from http://x:***@10.0.0.1/a.git failed; retry http://y:***@h/b",
            ),
            ("ssh://git@host/r.git", "ssh://git@host/r.git"),
            ("http://host/r.git", "http://host/r.git"),
            ("http://bob:@host/", "http://bob:@host/"),
            ("http://bob:***@host/", "http://bob:***@host/"),
            ("no url here: a@b", "no url here: a@b"),
            ("http://host/path?u=a:b@c", "http://host/path?u=a:b@c"),
            ("http://a:%40b@h/x", "http://a:***@h/x"),
        ] {
            assert_eq!(redact_urls(given), want, "{given}");
        }
        assert!(matches!(redact_url("http://host/r"), Cow::Borrowed(_)));
    }

    #[test]
    fn both_forms_of_a_password_are_given_to_the_masker() {
        assert_eq!(url_passwords("http://a:p%40ss@h/x"), ["p%40ss", "p@ss"]);
        assert_eq!(url_passwords("http://a:pw@h/x"), ["pw"]);
        assert!(url_passwords("http://a@h/x").is_empty());
        assert!(url_passwords("/local/path").is_empty());
    }
}
