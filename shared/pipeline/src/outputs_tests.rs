//! `${{ tasks.NAME.outputs.KEY }}` through `parse`, `resolve` and
//! `task_spec`: kept as a placeholder for the coordinator in plain fields
//! and in the variables of scripts, and each misuse refused at its place.

use super::*;
use capstan_proto::pipeline::v1 as pb;

const FILE: &str = r#"version: 1
name: o
tasks:
  build:
    steps: [ { run: make } ]
  lint:
    needs: [build]
    steps: [ { run: lint } ]
  deploy:
    needs: [lint]
    image: "${{ tasks.build.outputs.image }}"
    env: { DIGEST: "sha=${{ tasks.build.outputs.digest }}" }
    steps:
      - run: echo "${{ tasks.build.outputs.steps.1.image }}" and ${{ tasks.lint.outputs.report-url }}
      - set-image: { repo: "https://git.example/m.git", files: [a.yaml], image: "r/app@${{ tasks.build.outputs.digest }}" }
"#;

fn resolved(text: &str) -> Result<Pipeline, ValidationErrors> {
    let p = parse("o.yaml", text)?;
    resolve("o.yaml", &p, &Context::default())
}

fn spec(p: &Pipeline, name: &str) -> pb::TaskSpec {
    let t = p.tasks.iter().find(|t| t.name == name).unwrap();
    task_spec(&p.name, t)
}

#[test]
fn outputs_of_needed_tasks_stay_placeholders_until_dispatch() {
    let p = resolved(FILE).unwrap();
    let s = spec(&p, "deploy");
    assert_eq!(s.image, "${{ tasks.build.outputs.image }}");
    assert_eq!(s.env["DIGEST"], "sha=${{ tasks.build.outputs.digest }}");
    let pb::step::Kind::Run(run) = s.steps[0].kind.clone().unwrap() else {
        panic!()
    };
    // The script refers to variables; their values are the placeholders.
    assert_eq!(
        run.script,
        "echo \"${CAPSTAN_OUTPUT_build_steps_1_image}\" and \"${CAPSTAN_OUTPUT_lint_report_url}\""
    );
    assert_eq!(
        s.steps[0].env["CAPSTAN_OUTPUT_lint_report_url"],
        "${{ tasks.lint.outputs.report-url }}"
    );
    let refs: Vec<(String, String)> = outputs::references(&s).into_iter().collect();
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        refs,
        [
            pair("build", "digest"),
            pair("build", "image"),
            pair("build", "steps.1.image"),
            pair("lint", "report-url"),
        ]
    );
    let mut filled = s.clone();
    outputs::fill(&mut filled, |t, k| Some(format!("<{t}.{k}>")));
    assert!(outputs::references(&filled).is_empty());
    assert_eq!(filled.image, "<build.image>");
    assert_eq!(
        filled.steps[0].env["CAPSTAN_OUTPUT_build_steps_1_image"],
        "<build.steps.1.image>"
    );
    let pb::step::Kind::SetImage(set) = filled.steps[1].kind.clone().unwrap() else {
        panic!()
    };
    assert_eq!(set.image, "r/app@<build.digest>");
}

fn one(text: &str, want: &str) {
    let errs = match resolved(text) {
        Ok(p) => panic!("expected an error, resolved {p:#?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        errs.starts_with(want),
        "{errs:?}\ndoes not start with\n{want:?}"
    );
    assert_eq!(errs.lines().count(), 1, "{errs}");
}

#[test]
fn only_the_outputs_of_needed_tasks_of_no_matrix() {
    one(
        "version: 1\nname: o\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    steps: [ { run: \"echo ${{ tasks.a.outputs.v }}\" } ]\n",
        "o.yaml:7:21: `${{ tasks.a.outputs.v }}`: a task may use the outputs of the tasks it needs (directly or through their needs); add `a` to its `needs`",
    );
    one(
        "version: 1\nname: o\ntasks:\n  a:\n    matrix: { n: [1, 2] }\n    steps: [ { run: x } ]\n  b:\n    needs: [a]\n    image: \"${{ tasks.a.outputs.v }}\"\n    steps: [ { run: x } ]\n",
        "o.yaml:9:12: `${{ tasks.a.outputs.v }}`: task `a` has a `matrix:`",
    );
    one(
        "version: 1\nname: o\nconcurrency: { group: \"g-${{ tasks.a.outputs.v }}\" }\ntasks:\n  a:\n    steps: [ { run: x } ]\n",
        "o.yaml:3:23: `${{ tasks.a.outputs.v }}` has no value here: a task's outputs are known when a task that needs it is dispatched",
    );
    one(
        "version: 1\nname: o\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    needs: [a]\n    image: \"${{ tasks.a.digest }}\"\n    steps: [ { run: x } ]\n",
        "o.yaml:8:12: unknown substitution `${{ tasks.a.digest }}`: expected `params.NAME`, `matrix.KEY`, `tasks.NAME.outputs.KEY`",
    );
}

#[test]
fn a_value_cannot_spell_a_placeholder() {
    let text = "version: 1\nname: o\nparams:\n  p: \"{{ tasks.a.outputs.v }}\"\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    needs: [a]\n    image: \"x$${{ params.p }}\"\n    steps: [ { run: x } ]\n";
    let errs = resolved(text).unwrap_err().to_string();
    assert!(
        errs.contains("after substitution this value contains `${{`"),
        "{errs}"
    );
}

#[test]
fn no_outputs_in_credentials_or_a_prompt() {
    let head = "version: 1\nname: o\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    needs: [a]\n    steps:\n";
    one(
        &format!(
            "{head}      - push: {{ image: r/app, credentials: \"${{{{ tasks.a.outputs.v }}}}\" }}\n"
        ),
        "o.yaml:9:44: `${{ tasks.a.outputs.v }}`: outputs cannot choose a secret: `credentials` names a runner-side secret, and an upstream task's output must never choose which secret a later task gets",
    );
    one(
        &format!(
            "{head}      - build: {{ tag: r/app, credentials: \"reg-${{{{ tasks.a.outputs.v }}}}\" }}\n"
        ),
        "o.yaml:9:43: `${{ tasks.a.outputs.v }}`: outputs cannot choose a secret",
    );
    one(
        &format!(
            "{head}      - git-push: {{ message: m, credentials: \"${{{{ tasks.a.outputs.v }}}}\" }}\n"
        ),
        "o.yaml:9:46: `${{ tasks.a.outputs.v }}`: outputs cannot choose a secret",
    );
    // Refused whoever's output it is: one problem, not also the `needs` one.
    one(
        "version: 1\nname: o\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    steps:\n      - push: { image: r/app, credentials: \"${{ tasks.a.outputs.v }}\" }\n",
        "o.yaml:8:44: `${{ tasks.a.outputs.v }}`: outputs cannot choose a secret",
    );
    one(
        "version: 1\nname: o\ntasks:\n  a:\n    steps: [ { run: x } ]\n  b:\n    needs: [a]\n    approval: { prompt: \"deploy ${{ tasks.a.outputs.v }}?\" }\n    steps: [ { run: x } ]\n",
        "o.yaml:8:25: `${{ tasks.a.outputs.v }}`: outputs cannot be used in an approval prompt",
    );
    // A field named like one is not one: a build arg `credentials`, and
    // the fields of a task whose name has a dot.
    let fine = format!(
        "{head}      - build: {{ tag: r/app, args: {{ credentials: \"${{{{ tasks.a.outputs.v }}}}\" }} }}\n  c.d:\n    needs: [a]\n    env: {{ X: \"${{{{ tasks.a.outputs.v }}}}\" }}\n    steps: [ {{ run: x }} ]\n"
    );
    resolved(&fine).unwrap();
}

#[test]
fn an_output_of_a_task_that_is_not_there_says_so_and_lists_the_tasks() {
    one(
        "version: 1\nname: o\ntasks:\n  build:\n    steps: [ { run: x } ]\n  b:\n    needs: [build]\n    image: \"${{ tasks.biuld.outputs.v }}\"\n    steps: [ { run: x } ]\n",
        "o.yaml:8:12: `${{ tasks.biuld.outputs.v }}`: no task `biuld` in this pipeline (its tasks: `build`, `b`)",
    );
}

#[test]
fn a_task_name_that_would_make_a_reference_ambiguous_is_refused() {
    // `tasks.a.outputs.b.outputs.c`: task `a`'s `b.outputs.c`, or task
    // `a.outputs.b`'s `c`? Neither name may hide `.outputs`.
    for name in ["a.outputs.b", "a.outputs"] {
        let text = format!(
            "version: 1\nname: o\ntasks:\n  a:\n    steps: [ {{ run: x }} ]\n  {name}:\n    steps: [ {{ run: x }} ]\n"
        );
        let errs = parse("o.yaml", &text).unwrap_err().to_string();
        assert!(
            errs.starts_with(&format!(
                "o.yaml:6:3: bad task name `{name}`: a task name may not contain `.outputs.` or end in `.outputs`"
            )),
            "{errs}"
        );
    }
    // Names that only look alike are fine, and the reference is the
    // first `.outputs.`'s.
    let text = "version: 1\nname: o\ntasks:\n  outputs.a:\n    steps: [ { run: x } ]\n  a.outputsx:\n    steps: [ { run: x } ]\n  u:\n    needs: [outputs.a, a.outputsx]\n    image: \"${{ tasks.outputs.a.outputs.k.outputs.v }}\"\n    env: { X: \"${{ tasks.a.outputsx.outputs.k }}\" }\n    steps: [ { run: x } ]\n";
    let p = resolved(text).unwrap();
    let refs: Vec<(String, String)> = outputs::references(&spec(&p, "u")).into_iter().collect();
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        refs,
        [pair("a.outputsx", "k"), pair("outputs.a", "k.outputs.v")]
    );
}
