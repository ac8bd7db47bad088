//! `capstan validate FILE`: checks a pipeline file locally (no coordinator).

use std::path::Path;

use capstan_pipeline::parse;
use serde_json::json;

use super::{Context, print_json, read_pipeline};
use crate::exit::{Exit, Failure};
use crate::output::Format;

pub(crate) fn run(ctx: &Context, path: &Path) -> Result<Exit, Failure> {
    let file = path.display().to_string();
    let text = read_pipeline(path)?;
    match (parse(&file, &text), ctx.format) {
        (Ok(pipeline), Format::Text) => {
            let n = pipeline.tasks.len();
            println!("{file}: ok ({n} task{})", if n == 1 { "" } else { "s" });
            Ok(Exit::Success)
        }
        (Ok(pipeline), Format::Json) => {
            print_json(&json!({
                "file": file,
                "ok": true,
                "name": pipeline.name,
                "tasks": pipeline.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            }));
            Ok(Exit::Success)
        }
        (Err(errors), Format::Text) => Err(Failure {
            exit: Exit::Usage,
            message: errors.to_string(),
        }),
        (Err(errors), Format::Json) => {
            print_json(&json!({
                "file": file,
                "ok": false,
                "errors": errors.iter().map(|e| json!({
                    "file": e.file, "line": e.line, "column": e.column, "message": e.message,
                })).collect::<Vec<_>>(),
            }));
            Ok(Exit::Usage)
        }
    }
}
