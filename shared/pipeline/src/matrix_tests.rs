//! `matrix:` end to end through `parse` and `resolve`: names, values in
//! every kind of field, fan-in, and each validation error at its place.

use super::tests::{one_error, with_task};
use super::*;

const MATRIX: &str = "version: 1
name: m
tasks:
  test:
    image: \"db-${{ matrix.db }}\"
    matrix:
      shard: [1, 2, 3]
      db: [pg15, pg16]
      exclude: [{shard: 3, db: pg15}]
      include: [{shard: 9, db: pg16}]
    env: {SHARD: \"${{ matrix.shard }}\"}
    steps:
      - run: ./test --shard ${{ matrix.shard }}
  report:
    needs: [test]
    steps: [run: echo done]
";

#[test]
fn a_matrix_expands_into_named_tasks_that_its_dependents_all_need() {
    let p = parse("m.yaml", MATRIX).unwrap();
    let r = resolve("m.yaml", &p, &Context::default()).unwrap();
    let names: Vec<&str> = r.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "test[db=pg15,shard=1]",
            "test[db=pg15,shard=2]",
            "test[db=pg16,shard=1]",
            "test[db=pg16,shard=2]",
            "test[db=pg16,shard=3]",
            "test[db=pg16,shard=9]",
            "report"
        ]
    );
    assert_eq!(r.tasks[6].needs, names[..6]);
    let t = &r.tasks[3];
    assert_eq!(t.image.as_deref(), Some("db-pg16"));
    assert_eq!(t.env.get("SHARD").map(String::as_str), Some("2"));
    let spec = task_spec("m", t);
    let Some(capstan_proto::pipeline::v1::step::Kind::Run(run)) = &spec.steps[0].kind else {
        panic!("{spec:?}");
    };
    // A script gets the value through the environment, as params do.
    assert_eq!(run.script, "./test --shard \"${CAPSTAN_MATRIX_shard}\"");
    assert_eq!(
        spec.steps[0]
            .env
            .get("CAPSTAN_MATRIX_shard")
            .map(String::as_str),
        Some("2")
    );
}

#[test]
fn matrix_errors_say_where_and_what_to_do() {
    let task = |m: &str, step: &str| {
        with_task(&format!(
            "    matrix:\n{m}    steps:\n      - run: {step}\n"
        ))
    };
    one_error(
        &task("      n: [1]\n", "echo ${{ matrix.m }}"),
        8,
        14,
        &["unknown matrix key `m` in `${{ matrix.m }}`", "has n"],
    );
    one_error(
        &with_task("    steps:\n      - run: echo ${{ matrix.n }}\n"),
        6,
        14,
        &["`${{ matrix.n }}` in task `a`, which has no `matrix`"],
    );
    one_error(&task("      n: []\n", "x"), 6, 10, &["is empty"]);
    one_error(
        &task("      n: 3\n", "x"),
        6,
        10,
        &["must be a list of values"],
    );
    one_error(
        &task("      n: [a b]\n", "x"),
        6,
        11,
        &["bad matrix value `a b`", "a-z A-Z 0-9 . _ -"],
    );
    one_error(
        &task("      n: [1, 1]\n", "x"),
        6,
        14,
        &["value `1` appears twice"],
    );
    one_error(
        &task("      exclude: [{n: 1}]\n", "x"),
        6,
        7,
        &["has no keys"],
    );
    one_error(
        &task("      n: [1, 2]\n      exclude: [{m: 1}]\n", "x"),
        7,
        18,
        &["unknown matrix key `m`", "(the keys: n)"],
    );
    one_error(
        &task("      n: [1]\n      k: [a]\n      include: [{n: 2}]\n", "x"),
        8,
        17,
        &["must name every matrix key; it lacks k"],
    );
    one_error(
        &task("      n: [1]\n      exclude: [{n: 1}]\n", "x"),
        6,
        7,
        &["excludes every combination"],
    );
    let big = "      a: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n      b: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n      c: [1, 2, 3, 4]\n";
    one_error(&task(big, "x"), 6, 7, &["makes 324 tasks; at most 256"]);
    one_error(
        &task("      a-b: [1]\n      a_b: [2]\n", "x"),
        7,
        7,
        &["is another key's environment variable"],
    );
    assert!(parse("p.yaml", &task("      n: [1, 2]\n", "echo ${{ matrix.n }}")).is_ok());
}

#[test]
fn matrix_bounds_and_values_that_could_not_name_a_task() {
    let task = |m: &str| {
        with_task(&format!(
            "    matrix:\n{m}    steps:\n      - run: echo ${{{{ matrix.a }}}}\n"
        ))
    };
    for bad in ["\"${{\"", "a/b", ".hidden", "é"] {
        one_error(
            &task(&format!("      a: [{bad}]\n")),
            6,
            11,
            &["bad matrix value", "a-z A-Z 0-9 . _ -"],
        );
    }
    let keys: String = (0..17).map(|i| format!("      k{i}: [1]\n")).collect();
    one_error(
        &task(&format!("      a: [1]\n{keys}")),
        6,
        7,
        &["has 18 keys; at most 16"],
    );
    // 2^13 combinations are refused before any is built.
    let wide: String = (0..13).map(|i| format!("      k{i}: [x, y]\n")).collect();
    one_error(
        &task(&format!("      a: [1]\n{wide}")),
        6,
        7,
        &["more than 4096 combinations before `exclude`"],
    );
    one_error(
        &task("      a: [1, 2]\n      exclude: [{a: 3}]\n"),
        7,
        21,
        &["`3` in `exclude` of", "is not a value of `a` (1, 2)"],
    );
    one_error(
        &task("      a: [1, 2]\n      exclude: [{}]\n"),
        7,
        17,
        &["is empty: name a key and its value"],
    );
    // A bad matrix does not also make every use of it an error.
    one_error(&task("      a: []\n"), 6, 10, &["is empty"]);
}

#[test]
fn an_expansions_error_is_reported_once_at_the_matrix_tasks_field() {
    let text = "version: 1\nname: m\ntasks:\n  t:\n    matrix: {n: [1, 2, 3]}\n    image: \"x:${{ git.sha }}\"\n    steps: [run: echo]\n";
    let p = parse("m.yaml", text).unwrap();
    let err = resolve("m.yaml", &p, &Context::default()).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!((err.0[0].line, err.0[0].column), (6, 12), "{err}");
    assert!(err.0[0].message.contains("needs a revision"), "{err}");
}
