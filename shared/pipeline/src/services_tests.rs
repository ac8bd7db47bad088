//! `services:`, `pull:` and `pull-credentials:` of a task end to end
//! through `parse`, `resolve` and `task_spec`, and each validation error
//! at its place.

use super::*;
use capstan_proto::pipeline::v1 as pb;
use std::collections::BTreeMap;
use std::time::Duration;

const SERVICES: &str = r#"version: 1
name: s
params:
  pg: "16"
tasks:
  test:
    image: capstan-test/busybox:1
    pull: if-not-present
    pull-credentials: registry-ci
    services:
      db:
        image: "127.0.0.1:5000/ci/postgres:${{ params.pg }}"
        command: ["postgres", "-c", "application_name=${{ run.id }}", 5432]
        env: {POSTGRES_PASSWORD: x, EMPTY: }
        ready: pg_isready -h localhost -d ${{ params.pg }}
        ready-timeout: 1m30s
      cache-1:
        image: redis:7
    steps:
      - run: psql -h db
"#;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ctx() -> Context {
    Context {
        run_id: Some("run-7".into()),
        ..Context::default()
    }
}

/// A file whose only task `t` has `body` (indented by 4) from line 5.
fn task(body: &str) -> String {
    format!("version: 1\nname: s\ntasks:\n  t:\n{body}    steps: [run: x]\n")
}

/// `services:` with `services` (indented by 6) from line 6.
fn services(services: &str) -> String {
    task(&format!("    services:\n{services}"))
}

/// Asserts that `text` (as `s.yaml`) has exactly one error and that its
/// `FILE:LINE:COLUMN: MESSAGE` line starts with `want`.
#[track_caller]
fn one(text: &str, want: &str) {
    let errs = match parse("s.yaml", text) {
        Ok(p) => panic!("expected an error, parsed {p:#?}"),
        Err(e) => e,
    };
    assert_eq!(errs.len(), 1, "expected one error, got\n{errs}");
    let line = errs.to_string();
    assert!(
        line.starts_with(want),
        "{line:?}\ndoes not start with\n{want:?}"
    );
}

#[test]
fn a_service_is_parsed_in_file_order_and_lowered_with_every_field() {
    let p = parse("s.yaml", SERVICES).unwrap();
    let t = &p.tasks[0];
    assert_eq!(t.pull.as_deref(), Some("if-not-present"));
    assert_eq!(t.pull_credentials.as_deref(), Some("registry-ci"));
    assert_eq!(
        t.services,
        [
            ServiceDef {
                name: "db".into(),
                image: "127.0.0.1:5000/ci/postgres:${{ params.pg }}".into(),
                command: vec![
                    "postgres".into(),
                    "-c".into(),
                    "application_name=${{ run.id }}".into(),
                    "5432".into()
                ],
                env: map(&[("POSTGRES_PASSWORD", "x"), ("EMPTY", "")]),
                ready: Some("pg_isready -h localhost -d ${{ params.pg }}".into()),
                ready_timeout: Some(Duration::from_secs(90)),
            },
            ServiceDef {
                name: "cache-1".into(),
                image: "redis:7".into(),
                ..ServiceDef::default()
            },
        ]
    );
    // The model survives serde, and an older record without the new
    // fields still reads.
    let json = serde_json::to_string(t).unwrap();
    assert_eq!(&serde_json::from_str::<TaskDef>(&json).unwrap(), t);
    let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in ["services", "pull", "pull_credentials"] {
        old.as_object_mut().unwrap().remove(key);
    }
    let old: TaskDef = serde_json::from_value(old).unwrap();
    assert!(old.services.is_empty() && old.pull.is_none() && old.pull_credentials.is_none());

    let r = resolve("s.yaml", &p, &ctx()).unwrap();
    let spec = task_spec("s", &r.tasks[0]);
    assert_eq!(spec.pull, "if-not-present");
    assert_eq!(spec.pull_credentials, "registry-ci");
    assert_eq!(
        spec.services,
        [
            pb::Service {
                name: "db".into(),
                image: "127.0.0.1:5000/ci/postgres:16".into(),
                command: vec![
                    "postgres".into(),
                    "-c".into(),
                    // An argument is not shell: the value goes in as it is.
                    "application_name=run-7".into(),
                    "5432".into()
                ],
                // `ready` is shell: like a `run` script's, its values come
                // in through the service's environment.
                env: [
                    ("POSTGRES_PASSWORD", "x"),
                    ("EMPTY", ""),
                    ("CAPSTAN_PARAM_pg", "16"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
                ready: "pg_isready -h localhost -d \"${CAPSTAN_PARAM_pg}\"".into(),
                ready_timeout_seconds: 90,
            },
            pb::Service {
                name: "cache-1".into(),
                image: "redis:7".into(),
                ..pb::Service::default()
            },
        ]
    );
}

#[test]
fn a_task_without_the_new_keys_lowers_to_empty_fields() {
    let p = parse(
        "s.yaml",
        &task("    services:\n    pull:\n    pull-credentials:\n"),
    )
    .unwrap();
    let t = &p.tasks[0];
    assert!(t.services.is_empty() && t.pull.is_none() && t.pull_credentials.is_none());
    let spec = task_spec("s", t);
    assert!(spec.services.is_empty());
    assert_eq!(
        (spec.pull.as_str(), spec.pull_credentials.as_str()),
        ("", "")
    );
    // A task with services and nothing that uses them is fine.
    assert!(parse("s.yaml", &services("      db: {image: x}\n")).is_ok());
}

#[test]
fn each_expansion_of_a_matrix_gets_its_own_service_image() {
    let text = r#"version: 1
name: s
tasks:
  test:
    matrix: {db: ["15", "16"]}
    services:
      db:
        image: "127.0.0.1:5000/ci/postgres:${{ matrix.db }}"
        command: [postgres, "-c", "cluster_name=pg${{ matrix.db }}"]
        env: {PGVERSION: "${{ matrix.db }}"}
        ready: pg_isready --version | grep -q " ${{ matrix.db }}"
    steps: [run: echo]
"#;
    let p = parse("s.yaml", text).unwrap();
    let r = resolve("s.yaml", &p, &Context::default()).unwrap();
    let specs: Vec<pb::TaskSpec> = r.tasks.iter().map(|t| task_spec("s", t)).collect();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["test[db=15]", "test[db=16]"]);
    for (spec, v) in specs.iter().zip(["15", "16"]) {
        let db = &spec.services[0];
        assert_eq!(db.image, format!("127.0.0.1:5000/ci/postgres:{v}"));
        assert_eq!(db.command[2], format!("cluster_name=pg{v}"));
        assert_eq!(db.env.get("PGVERSION").map(String::as_str), Some(v));
        assert_eq!(
            db.ready,
            "pg_isready --version | grep -q \" ${CAPSTAN_MATRIX_db}\""
        );
        assert_eq!(db.env.get("CAPSTAN_MATRIX_db").map(String::as_str), Some(v));
    }
}

#[test]
fn matrix_and_resolve_errors_in_a_service_are_at_their_place() {
    let text = |matrix: &str, field: &str| {
        task(&format!(
            "{matrix}    services:\n      db:\n        image: postgres\n        {field}\n"
        ))
    };
    let m = "    matrix: {db: [\"15\"]}\n";
    one(
        &text(m, "ready: \"x ${{ matrix.pg }}\""),
        "s.yaml:9:16: unknown matrix key `pg` in `${{ matrix.pg }}` (task `t` has db)",
    );
    one(
        &text(m, "command: [a, \"${{ matrix.pg }}\"]"),
        "s.yaml:9:22: unknown matrix key `pg`",
    );
    one(
        &text(m, "env: {A: \"${{ matrix.pg }}\"}"),
        "s.yaml:9:18: unknown matrix key `pg`",
    );
    one(
        &task("    services:\n      db: {image: \"pg:${{ matrix.db }}\"}\n"),
        "s.yaml:6:19: `${{ matrix.db }}` in task `t`, which has no `matrix`",
    );
    one(
        &services("      db: {image: \"${{ params.nope }}\"}\n"),
        "s.yaml:6:19: unknown param `nope` in `${{ params.nope }}`: declare it under `params:`",
    );
    // At submit, a missing value is reported where the service uses it.
    let p = parse(
        "s.yaml",
        &services("      db: {image: \"pg:${{ git.sha }}\"}\n"),
    )
    .unwrap();
    let err = resolve("s.yaml", &p, &Context::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("s.yaml:6:19: `${{ git.sha }}` needs a revision"),
        "{err}"
    );
    // `ready` is shell: a quoted here-document would expand nothing.
    let ready = "      db:\n        image: x\n        ready: |\n          sh <<'EOF'\n          ${{ run.id }}\n          EOF\n";
    let p = parse("s.yaml", &services(ready)).unwrap();
    let err = resolve("s.yaml", &p, &ctx()).unwrap_err();
    assert!(
        err.to_string().starts_with(
            "s.yaml:9:11: `${{ run.id }}` inside a here-document with a quoted delimiter"
        ),
        "{err}"
    );
}

#[test]
fn services_errors_say_where_and_what_to_do() {
    one(
        &task("    services: [db]\n"),
        "s.yaml:5:15: `services` of task `t` must be a mapping of service names to services such as `db: {image: postgres:16}`, found a list",
    );
    for bad in ["Db", "db_1", "-db", "db-", "d.b", &"a".repeat(64)] {
        one(
            &services(&format!("      {bad}: {{image: x}}\n")),
            &format!(
                "s.yaml:6:7: bad service name `{bad}` in `services` of task `t`: it is the service's host name, a DNS label of 1 to 63 lower-case letters, digits and `-`, starting and ending with a letter or digit"
            ),
        );
    }
    for good in ["a", "0", "redis-1", &"a".repeat(63)] {
        let text = services(&format!("      {good}: {{image: x}}\n"));
        if let Err(e) = parse("s.yaml", &text) {
            panic!("{good}: {e}");
        }
    }
    let sixteen: String = (0..16)
        .map(|i| format!("      s{i}: {{image: x}}\n"))
        .collect();
    assert_eq!(
        parse("s.yaml", &services(&sixteen)).unwrap().tasks[0]
            .services
            .len(),
        16
    );
    one(
        &services(&format!("{sixteen}      s16: {{image: x}}\n")),
        "s.yaml:22:7: service `s16` is number 17 in `services` of task `t`; at most 16 services per task: drop some or split the task",
    );
    // The YAML layer keeps every pair: a second `db` is reported at its key.
    one(
        &services("      db: {image: x}\n      db: {image: y}\n"),
        "s.yaml:7:7: duplicate key `db` in `services` of task `t` (first defined at line 6, column 7)",
    );
    one(
        &services("      db: postgres\n"),
        "s.yaml:6:11: service `db` of task `t` must be a mapping with at least `image`, such as `{image: postgres:16}`, found a string",
    );
    one(
        &services("      db:\n"),
        "s.yaml:6:7: service `db` of task `t` must be a mapping with at least `image`",
    );
}

#[test]
fn service_field_errors_say_where_and_what_to_do() {
    let db = |fields: &str| services(&format!("      db:\n{fields}"));
    one(
        &db("        env: {A: b}\n"),
        "s.yaml:7:9: missing required key `image` in service `db` of task `t`",
    );
    one(
        &db("        image: \"\"\n"),
        "s.yaml:7:16: `image` of service `db` of task `t` must not be empty",
    );
    one(
        &db("        image: [x]\n"),
        "s.yaml:7:16: `image` of service `db` of task `t` must be a string, found a list",
    );
    one(
        &db("        image: x\n        ready-timout: 5s\n"),
        "s.yaml:8:9: unknown key `ready-timout` in service `db` of task `t` (did you mean `ready-timeout`?); allowed keys: `image`, `command`, `env`, `ready`, `ready-timeout`",
    );
    one(
        &db("        image: x\n        command: postgres -c x\n"),
        "s.yaml:8:18: `command` of service `db` of task `t` must be a list of arguments such as [\"postgres\", \"-c\", \"fsync=off\"], found a string",
    );
    one(
        &db("        image: x\n        command: [postgres, {a: b}]\n"),
        "s.yaml:8:29: an entry of `command` of service `db` of task `t` must be a string, found a mapping",
    );
    one(
        &db("        image: x\n        env: {1A: x}\n"),
        "s.yaml:8:15: bad environment variable name `1A` in `env` of service `db` of task `t`",
    );
    one(
        &db("        image: x\n        env: [A=x]\n"),
        "s.yaml:8:14: `env` of service `db` of task `t` must be a mapping, found a list",
    );
    one(
        &db("        image: x\n        ready: [a]\n"),
        "s.yaml:8:16: `ready` of service `db` of task `t` must be a string, found a list",
    );
    one(
        &db("        image: x\n        ready: \" \"\n"),
        "s.yaml:8:16: `ready` of service `db` of task `t` must not be empty",
    );
    let errs = parse(
        "s.yaml",
        &db("        image: x\n        ready: x\n        ready-timeout: soon\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(errs.starts_with("s.yaml:9:24: "), "{errs}");
    assert!(
        errs.ends_with("(`ready-timeout` of service `db` of task `t`)"),
        "{errs}"
    );
    let p = parse(
        "s.yaml",
        &db("        image: x\n        ready: x\n        ready-timeout: 45\n"),
    )
    .unwrap();
    assert_eq!(
        task_spec("s", &p.tasks[0]).services[0].ready_timeout_seconds,
        45
    );
    one(
        &db("        image: x\n        ready-timeout: 45\n"),
        "s.yaml:8:24: `ready-timeout` of service `db` of task `t` bounds its `ready` command, which it has none of: add `ready:`",
    );
}

#[test]
fn pull_values() {
    for v in ["always", "if-not-present", "never"] {
        let p = parse("s.yaml", &task(&format!("    pull: {v}\n"))).unwrap();
        assert_eq!(p.tasks[0].pull.as_deref(), Some(v));
        assert_eq!(task_spec("s", &p.tasks[0]).pull, v);
    }
    let bad =
        "s.yaml:5:11: `pull` of task `t` must be `always`, `if-not-present` or `never`, found";
    one(
        &task("    pull: sometimes\n"),
        &format!("{bad} `sometimes`"),
    );
    one(&task("    pull: Always\n"), &format!("{bad} `Always`"));
    one(&task("    pull: true\n"), &format!("{bad} a boolean"));
    one(&task("    pull: [always]\n"), &format!("{bad} a list"));
    one(
        &task("    pll: always\n"),
        "s.yaml:5:5: unknown key `pll` in task `t` (did you mean `pull`?)",
    );
}

#[test]
fn pull_credentials_name_a_runner_secret() {
    for name in ["registry-ci", "harbor.robot_1", "X"] {
        let p = parse(
            "s.yaml",
            &task(&format!(
                "    image: r:5000/x:1\n    pull-credentials: {name}\n"
            )),
        )
        .unwrap();
        assert_eq!(p.tasks[0].pull_credentials.as_deref(), Some(name));
        assert_eq!(task_spec("s", &p.tasks[0]).pull_credentials, name);
    }
    one(
        &task("    image: r:5000/x:1\n    pull-credentials: \"registry ci\"\n"),
        "s.yaml:6:23: bad secret name `registry ci` in `pull-credentials` of task `t`: name a runner-side secret with letters, digits, `_`, `.` and `-`",
    );
    one(
        &task("    image: r:5000/x:1\n    pull-credentials: \"\"\n"),
        "s.yaml:6:23: bad secret name `` in `pull-credentials` of task `t`",
    );
    one(
        &task("    image: r:5000/x:1\n    pull-credentials: \"${{ git.sha }}\"\n"),
        "s.yaml:6:23: substitutions are not allowed in `pull-credentials` of task `t`: name a runner-side secret",
    );
    one(
        &task("    image: r:5000/x:1\n    pull-credentials: {name: x}\n"),
        "s.yaml:6:23: `pull-credentials` of task `t` must be a string, found a mapping",
    );
    one(
        &task("    pull-credentials: registry-ci\n"),
        "s.yaml:5:23: `pull-credentials` of task `t` is sent to the registry of the task's `image:`, and it has none: set `image:`",
    );
}
