//! The pipeline parser and substitution: `parse` then `resolve`.
//!
//! Input: the pipeline file, then optionally `\0`-separated context fields:
//! `git.sha`, `git.repo`, `run.id`, then `NAME=VALUE` param overrides.
//! Without them the context has a sha, a repository and a run id.
//!
//! Invariants: no panic, no hang (scripts/fuzz runs with a timeout); every
//! failure is a non-empty `ValidationErrors`; a resolved pipeline holds no
//! `${{` anywhere but in the placeholders of task outputs
//! (`capstan_pipeline::outputs`), filled in at dispatch.
#![no_main]

use capstan_pipeline::{Context, parse, resolve};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let mut fields = input.split('\0');
    let text = fields.next().unwrap_or_default();
    let ctx = context(fields);
    let pipeline = match parse("fuzz.yaml", text) {
        Ok(p) => p,
        Err(errors) => {
            assert!(!errors.is_empty(), "parse failed without an error");
            let _ = errors.to_string();
            return;
        }
    };
    match resolve("fuzz.yaml", &pipeline, &ctx) {
        Ok(resolved) => {
            let shown = capstan_pipeline::outputs::without_placeholders(&format!("{resolved:?}"));
            assert!(
                !shown.contains("${{"),
                "the resolved pipeline holds `${{{{`: {shown}"
            );
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "resolve failed without an error");
            let _ = errors.to_string();
        }
    }
});

fn context<'a>(mut fields: impl Iterator<Item = &'a str>) -> Context {
    let mut ctx = Context::default();
    match fields.next() {
        None => {
            ctx.git_sha = Some("0123456789abcdef0123456789abcdef01234567".to_owned());
            ctx.git_repo = Some("https://git.example/demo.git".to_owned());
            ctx.run_id = Some("run-0".to_owned());
            return ctx;
        }
        Some(sha) => ctx.git_sha = Some(sha.to_owned()),
    }
    ctx.git_repo = fields.next().map(str::to_owned);
    ctx.run_id = fields.next().map(str::to_owned);
    for param in fields {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        ctx.params.insert(name.to_owned(), value.to_owned());
    }
    ctx
}
