//! The `set-image` edit (`capstan_manifest::edit_text`) on YAML,
//! kustomize and Helm-ish (templated) texts.
//!
//! Input: one byte choosing the new image from `IMAGES` (a byte past the
//! table: the first line is the image), then the text.
//!
//! Invariants: no panic; nothing changed means the text is returned as it
//! was; only lines holding the new tag or digest, or `newTag:`/`digest:`
//! lines, differ; editing the result to the same image again is a no-op
//! with the same references found.
#![no_main]

use capstan_manifest::edit_text;
use capstan_manifest::image_ref::ImageRef;
use libfuzzer_sys::fuzz_target;

const IMAGES: &[&str] = &[
    "127.0.0.1:5000/demo-ns/app:v2",
    "app:v2",
    "nginx:1.27",
    "docker.io/library/nginx:1.27",
    "registry.example/team/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "app:v3@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "app:1.10",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return;
    };
    let (image, text) = match IMAGES.get(usize::from(pick)) {
        Some(image) => (*image, rest),
        None => rest.split_once('\n').unwrap_or((rest, "")),
    };
    let Ok(edit) = edit_text(text, image) else {
        return;
    };
    assert!(edit.changed <= edit.matched);
    if edit.changed == 0 {
        assert_eq!(edit.text, text, "nothing changed, yet the text differs");
        return;
    }
    only_image_lines_differ(text, &edit.text, image);
    let again = edit_text(&edit.text, image)
        .unwrap_or_else(|e| panic!("the edited text no longer edits: {e}\n{}", edit.text));
    assert_eq!(
        again.changed, 0,
        "a second edit changed more:\n{}",
        edit.text
    );
    assert_eq!(again.matched, edit.matched);
    assert_eq!(again.text, edit.text);
});

/// Lines compared without their breaks (a line added after the last one
/// gives that one a break). Outside the first and last differing lines the texts are equal, and
/// every line of the output between them that is not in the input names
/// the new tag or digest, or is a kustomize `newTag:`/`digest:` line.
fn only_image_lines_differ(before: &str, after: &str, image: &str) {
    let new = ImageRef::parse(image).expect("the edit accepted the image");
    let (a, b) = (lines(before), lines(after));
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    for line in &b[head..b.len() - tail] {
        if a[head..a.len() - tail].contains(line) {
            continue;
        }
        let names_new = new.tag.is_some_and(|t| line.contains(t))
            || new.digest.is_some_and(|d| line.contains(d));
        let key = line.trim_start().trim_start_matches("- ");
        let kustomize = key.starts_with("newTag:") || key.starts_with("digest:");
        assert!(
            names_new || kustomize,
            "a line the edit should not touch changed: {line:?}\nbefore:\n{before}\nafter:\n{after}"
        );
    }
}

/// The lines of `text` without their breaks (CRLF, LF or a lone CR, as
/// YAML reads them).
fn lines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(['\n', '\r']) {
        out.push(&rest[..at]);
        let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[at + skip..];
    }
    out.push(rest);
    out
}
