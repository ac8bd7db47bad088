//! Tests of parsing, validation and substitution.

use super::*;
use capstan_proto::pipeline::v1 as pb;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const FULL: &str = r#"version: 1                # required, must be 1
name: go-sampleapp        # required, [a-z0-9][a-z0-9_.-]*
params:                   # optional map name -> default string value (scalars are stringified)
  image: 127.0.0.1:5000/demo-ns/go-sampleapp
  replicas: 3
tasks:                    # required, non-empty map; order of keys = file order (keep it)
  unit-test:
    image: capstan-test/golang     # optional default image for run steps
    runs-on: [os=linux, arch=amd64] # optional; a list of "k=v" strings OR a map {os: linux}
    env: {GOFLAGS: -mod=vendor}     # optional map string->string
    needs: [other-task]             # optional list of task names
    timeout: 10m                    # optional; "30s", "5m", "1h30m", or an integer = seconds
    retries: 2                      # optional, script-failure retries, 0..=10, default 0
    steps:                          # required, non-empty list
      - run: go test ./...          # run step; `script` is the value; may be multi-line
        name: test                  # optional on every step
        env: {X: y}                 # optional on every step
        timeout: 30s                # optional on every step
        image: other-image          # optional, run steps only
      - build: { context: ., dockerfile: Dockerfile, tag: "${{ params.image }}:${{ git.sha }}" }   # context default ".", dockerfile default "Dockerfile", tag required
      - push: { image: "${{ params.image }}:${{ git.sha }}", credentials: harbor }            # image required, credentials optional
      - set-image: { repo: "${{ git.repo }}", files: [k8s/pod.yaml], image: "x:${{run.id}}" }  # all required, files non-empty
      - git-push: { message: "deploy ${{ git.sha }}", credentials: gitops }     # message required, credentials optional
  other-task:
    runs-on: {os: linux}
    timeout: 90
    steps:
      - run: |
          echo one
          echo two
      - build: { tag: t }
      - push: { image: i }
      - git-push: { message: m }
"#;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn step(kind: StepKind) -> StepDef {
    StepDef {
        name: None,
        env: BTreeMap::new(),
        timeout: None,
        kind,
    }
}

fn s(x: &str) -> String {
    x.to_owned()
}

fn expected_full() -> Pipeline {
    Pipeline {
        name: s("go-sampleapp"),
        params: map(&[
            ("image", "127.0.0.1:5000/demo-ns/go-sampleapp"),
            ("replicas", "3"),
        ]),
        tasks: vec![
            TaskDef {
                name: s("unit-test"),
                image: Some(s("capstan-test/golang")),
                runs_on: map(&[("os", "linux"), ("arch", "amd64")]),
                env: map(&[("GOFLAGS", "-mod=vendor")]),
                needs: vec![s("other-task")],
                timeout: Some(Duration::from_secs(600)),
                retries: 2,
                capabilities: vec![],
                cpus: None,
                memory_bytes: None,
                steps: vec![
                    StepDef {
                        name: Some(s("test")),
                        env: map(&[("X", "y")]),
                        timeout: Some(Duration::from_secs(30)),
                        kind: StepKind::Run {
                            script: s("go test ./..."),
                            image: Some(s("other-image")),
                        },
                    },
                    step(StepKind::Build {
                        context: s("."),
                        dockerfile: s("Dockerfile"),
                        tag: s("${{ params.image }}:${{ git.sha }}"),
                        skip_if_exists: None,
                        credentials: None,
                        args: BTreeMap::new(),
                    }),
                    step(StepKind::Push {
                        image: s("${{ params.image }}:${{ git.sha }}"),
                        credentials: Some(s("harbor")),
                        skip_if_exists: None,
                    }),
                    step(StepKind::SetImage {
                        repo: s("${{ git.repo }}"),
                        files: vec![s("k8s/pod.yaml")],
                        image: s("x:${{run.id}}"),
                        allow_no_match: false,
                        pin_digest: false,
                        digest: None,
                        monotonic: false,
                    }),
                    step(StepKind::GitPush {
                        message: s("deploy ${{ git.sha }}"),
                        credentials: Some(s("gitops")),
                        branch: None,
                        pull_request: false,
                    }),
                ],
                matrix: None,
                expanded_from: None,
                matrix_values: BTreeMap::new(),
                approval: None,
                condition: None,
                finally: false,
                services: vec![],
                pull: None,
                pull_credentials: None,
            },
            TaskDef {
                name: s("other-task"),
                runs_on: map(&[("os", "linux")]),
                timeout: Some(Duration::from_secs(90)),
                steps: vec![
                    step(StepKind::Run {
                        script: s("echo one\necho two\n"),
                        image: None,
                    }),
                    step(StepKind::Build {
                        context: s("."),
                        dockerfile: s("Dockerfile"),
                        tag: s("t"),
                        skip_if_exists: None,
                        credentials: None,
                        args: BTreeMap::new(),
                    }),
                    step(StepKind::Push {
                        image: s("i"),
                        credentials: None,
                        skip_if_exists: None,
                    }),
                    step(StepKind::GitPush {
                        message: s("m"),
                        credentials: None,
                        branch: None,
                        pull_request: false,
                    }),
                ],
                ..TaskDef::default()
            },
        ],
        concurrency: None,
        schedules: vec![],
        source_map: SourceMap::default(),
    }
}

/// The errors of a file that must not parse, as (line, column, message).
pub(crate) fn errors(text: &str) -> Vec<(usize, usize, String)> {
    match parse("p.yaml", text) {
        Ok(p) => panic!("expected errors, parsed {p:#?}"),
        Err(e) => {
            assert!(!e.is_empty());
            e.0.into_iter()
                .map(|e| {
                    assert_eq!(e.file, "p.yaml");
                    (e.line, e.column, e.message)
                })
                .collect()
        }
    }
}

/// Asserts that the file has exactly one error, at `line:column`, whose
/// message contains every one of `needles`.
#[track_caller]
pub(crate) fn one_error(text: &str, line: usize, column: usize, needles: &[&str]) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let (l, c, m) = &errs[0];
    assert_eq!((*l, *c), (line, column), "wrong place for {m:?}");
    for n in needles {
        assert!(m.contains(n), "{m:?} does not contain {n:?}");
    }
}

/// A minimal valid file with `task` as the body of the only task `a`
/// (indented by 4), starting at line 5.
pub(crate) fn with_task(task: &str) -> String {
    format!("version: 1\nname: p\ntasks:\n  a:\n{task}")
}

// ---- valid files ----

#[test]
fn full_file_parses_to_the_expected_model() {
    let p = parse("p.yaml", FULL).unwrap();
    assert_eq!(p, expected_full());
    // File order of tasks is kept (not sorted).
    let names: Vec<&str> = p.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["unit-test", "other-task"]);
}

#[test]
fn model_round_trips_through_serde() {
    let p = parse("p.yaml", FULL).unwrap();
    let json = serde_json::to_string(&p).unwrap();
    let back: Pipeline = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
}

#[test]
fn design_example_parses() {
    let text = r#"
version: 1
name: go-sampleapp
params:
  image: 127.0.0.1:5000/demo-ns/go-sampleapp
  manifests: http://127.0.0.1:8418/demo/manifests.git
tasks:
  unit-test:
    image: capstan-test/golang
    steps:
      - run: go test ./...
  lint:
    image: capstan-test/golang
    steps:
      - run: go vet ./...
  image:
    needs: [unit-test, lint]
    steps:
      - build: { context: ., dockerfile: Dockerfile, tag: "${{ params.image }}:${{ git.sha }}" }
      - push: { image: "${{ params.image }}:${{ git.sha }}", credentials: harbor }
  deploy:
    needs: [image]
    steps:
      - set-image: { repo: "${{ params.manifests }}", files: [k8s/pod.yaml], image: "${{ params.image }}:${{ git.sha }}" }
      - git-push: { message: "deploy go-sampleapp ${{ git.sha }}", credentials: gitops }
"#;
    let p = parse("p.yaml", text).unwrap();
    assert_eq!(p.tasks.len(), 4);
    assert_eq!(p.tasks[3].needs, ["image"]);
}

#[test]
fn hello_example_parses() {
    let p = parse(
        "examples/hello.yaml",
        include_str!("../../../examples/hello.yaml"),
    )
    .unwrap();
    assert_eq!(p.name, "hello");
    let names: Vec<&str> = p.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["hello", "goodbye"]);
    assert_eq!(p.tasks[1].needs, ["hello"]);
    for t in &p.tasks {
        for st in &t.steps {
            assert!(
                matches!(&st.kind, StepKind::Run { script, .. } if script.starts_with("echo "))
            );
        }
    }
    let r = resolve("examples/hello.yaml", &p, &Context::default()).unwrap();
    assert_eq!(
        r.tasks[0].steps[0].kind,
        StepKind::Run {
            script: s("echo \"${CAPSTAN_PARAM_greeting} from capstan\""),
            image: None
        }
    );
    assert_eq!(r.tasks[0].steps[0].env["CAPSTAN_PARAM_greeting"], "hello");
}

#[test]
fn scalars_keep_their_text() {
    let text = with_task(
        "    env: {VERSION: 1.10, HEX: 0x1f, ON: yes, T: true, EMPTY: , N: 007}\n    steps: [run: 42]\n",
    );
    let p = parse("p.yaml", &text).unwrap();
    assert_eq!(
        p.tasks[0].env,
        map(&[
            ("VERSION", "1.10"),
            ("HEX", "0x1f"),
            ("ON", "yes"),
            ("T", "true"),
            ("EMPTY", ""),
            ("N", "007"),
        ])
    );
    assert_eq!(
        p.tasks[0].steps[0].kind,
        StepKind::Run {
            script: s("42"),
            image: None
        }
    );
}

#[test]
fn needs_may_be_a_single_name_and_optional_fields_may_be_null() {
    let text = "version: 1\nname: p\nparams:\ntasks:\n  a:\n    steps: [run: x]\n  b:\n    needs: a\n    env:\n    image:\n    steps: [run: y]\n";
    let p = parse("p.yaml", text).unwrap();
    assert_eq!(p.tasks[1].needs, ["a"]);
    assert!(p.tasks[1].env.is_empty());
    assert_eq!(p.tasks[1].image, None);
}

#[test]
fn unicode_before_a_number_keeps_its_text() {
    let text = "version: 1\nname: p\n# déjà vu ✓\ntasks:\n  a:\n    env: {V: 1.20, W: \"é✓\", X: 1.30, Y: &y 1.40, Z: *y}\n    steps: [run: x]\n";
    let p = parse("p.yaml", text).unwrap();
    assert_eq!(p.tasks[0].env["V"], "1.20");
    assert_eq!(p.tasks[0].env["W"], "é✓");
    assert_eq!(p.tasks[0].env["X"], "1.30");
    assert_eq!(p.tasks[0].env["Y"], "1.40");
    assert_eq!(p.tasks[0].env["Z"], "1.40");
}

#[test]
fn columns_are_characters_after_non_ascii_text() {
    one_error(
        &with_task("    env: {V: \"é✓\", bad-key: 1}\n    steps: [run: x]\n"),
        5,
        20,
        &["bad environment variable name `bad-key`"],
    );
}

// ---- syntax and hostile input ----

#[test]
fn yaml_syntax_error_has_the_parser_location() {
    let errs = errors("version: 1\nname: p\ntasks:\n  a: [unclosed\n  b: x\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    let (l, c, m) = &errs[0];
    assert!(m.starts_with("invalid YAML"), "{m}");
    assert_eq!((*l, *c), (5, 4), "{errs:?}");

    let errs = errors("version: 1\nname: \"unterminated\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.starts_with("invalid YAML"));
    assert_eq!((errs[0].0, errs[0].1), (3, 1), "{errs:?}");

    one_error("version: 1\n  name: p\n", 2, 7, &["invalid YAML"]);
}

#[test]
fn empty_file_and_non_mapping() {
    one_error("", 1, 1, &["empty"]);
    one_error("# only a comment\n", 1, 1, &["empty"]);
    one_error("- a\n- b\n", 1, 1, &["must be a mapping", "a list"]);
}

#[test]
fn several_documents_are_refused() {
    let errs = errors("version: 1\n---\nversion: 1\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.contains("document"), "{errs:?}");
}

#[test]
fn oversized_file_is_refused_without_parsing() {
    // 10 MB of text that would take a while to parse if we tried.
    let text = "a: [".repeat(10 * 1024 * 1024 / 4);
    let start = Instant::now();
    let err = parse("big.yaml", &text).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(err.len(), 1);
    assert_eq!(
        err.to_string(),
        format!(
            "big.yaml is {} bytes; the limit is 1048576 bytes",
            text.len()
        )
    );
    assert_eq!(err.0[0].line, 0);
}

#[test]
fn file_at_the_limit_is_parsed() {
    let mut text = with_task("    steps: [run: x]\n");
    text.push_str(&"#".repeat(MAX_FILE_BYTES - text.len() - 1));
    text.push('\n');
    assert_eq!(text.len(), MAX_FILE_BYTES);
    parse("p.yaml", &text).unwrap();
}

#[test]
fn billion_laughs_fails_fast() {
    let mut text = String::from(
        "version: 1\nname: p\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let refs: Vec<String> = (0..10).map(|_| format!("*a{}", i - 1)).collect();
        text.push_str(&format!("a{i}: &a{i} [{}]\n", refs.join(", ")));
    }
    text.push_str("tasks:\n  a:\n    steps: [run: x]\n    env: *a9\n");
    let start = Instant::now();
    let errs = errors(&text);
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.contains("alias"), "{errs:?}");
}

#[test]
fn many_aliases_fail_fast() {
    // Wide rather than deep: one anchor, a huge number of references.
    let mut text = String::from("version: 1\nname: p\nx: &x [a, b, c, d, e, f, g, h]\ny: [");
    text.push_str(&"*x, ".repeat(200_000));
    text.push_str("*x]\n");
    assert!(text.len() <= MAX_FILE_BYTES);
    let start = Instant::now();
    let errs = errors(&text);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.contains("alias"), "{errs:?}");
}

#[test]
fn deep_nesting_is_refused_without_overflowing() {
    let flow = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let errs = errors(&flow);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.contains("nesting"), "{errs:?}");

    let mut block = String::new();
    for i in 0..1_000 {
        block.push_str(&" ".repeat(i));
        block.push_str("k:\n");
    }
    let errs = errors(&block);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.contains("nesting"), "{errs:?}");

    let flow_maps = format!("{}{}", "{a: ".repeat(10_000), "}".repeat(10_000));
    let errs = errors(&flow_maps);
    assert_eq!(errs.len(), 1);
}

#[test]
fn many_tasks_in_a_chain() {
    // A long chain of needs (and a cycle closing it) stays iterative.
    let n = 5_000;
    let mut text = String::from("version: 1\nname: p\ntasks:\n");
    for i in 0..n {
        let next = (i + 1) % n;
        text.push_str(&format!("  t{i}: {{needs: [t{next}], steps: [run: x]}}\n"));
    }
    let errs = errors(&text);
    assert_eq!(errs.len(), 1);
    assert_eq!((errs[0].0, errs[0].1), (4, 3));
    assert!(errs[0].2.starts_with("dependency cycle: t0 -> t1 -> t2"));
}

// ---- each validation error, located ----

#[test]
fn unknown_keys_at_every_level() {
    one_error(
        "version: 1\nname: p\nnmae: q\ntasks:\n  a:\n    steps: [run: x]\n",
        3,
        1,
        &["unknown key `nmae`", "`version`, `name`, `params`, `tasks`"],
    );
    one_error(
        &with_task("    imgae: x\n    steps: [run: x]\n"),
        5,
        5,
        &[
            "unknown key `imgae` in task `a`",
            "did you mean `image`?",
            "`runs-on`",
        ],
    );
    one_error(
        &with_task("    steps:\n      - run: x\n        shell: bash\n"),
        7,
        9,
        &["unknown key `shell` in step 1 of task `a`", "allowed keys:"],
    );
    one_error(
        &with_task("    steps:\n      - build: {tag: t, file: D}\n"),
        6,
        25,
        &["unknown key `file`", "`context`, `dockerfile`, `tag`"],
    );
    one_error(
        &with_task("    steps:\n      - push: {image: i, creds: c}\n"),
        6,
        26,
        &["unknown key `creds`", "`image`, `credentials`"],
    );
    one_error(
        &with_task("    steps:\n      - set-image: {repo: r, files: [f], image: i, tag: t}\n"),
        6,
        52,
        &["unknown key `tag`", "`repo`, `files`, `image`"],
    );
    one_error(
        &with_task("    steps:\n      - git-push: {message: m, brnch: main}\n"),
        6,
        32,
        &[
            "unknown key `brnch`",
            "did you mean `branch`?",
            "`message`, `credentials`",
        ],
    );
}

#[test]
fn missing_required_keys() {
    let errs = errors("params: {}\n");
    let msgs: Vec<&str> = errs.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(errs.len(), 3, "{errs:?}");
    for (e, key) in errs.iter().zip(["version", "name", "tasks"]) {
        assert_eq!((e.0, e.1), (1, 1));
        assert!(
            e.2.contains(&format!("missing required key `{key}`")),
            "{msgs:?}"
        );
    }
    one_error(
        &with_task("    image: x\n"),
        4,
        3,
        &["missing required key `steps` in task `a`"],
    );
    one_error(
        &with_task("    steps:\n      - build: {context: .}\n"),
        6,
        16,
        &[
            "missing required key `tag`",
            "`build` of step 1 of task `a`",
        ],
    );
    one_error(
        &with_task("    steps:\n      - push: {credentials: c}\n"),
        6,
        15,
        &["missing required key `image`"],
    );
    let errs = errors(&with_task("    steps:\n      - set-image: {}\n"));
    assert_eq!(errs.len(), 2, "{errs:?}");
    for (e, key) in errs.iter().zip(["files", "image"]) {
        assert_eq!((e.0, e.1), (6, 20));
        assert!(
            e.2.contains(&format!("missing required key `{key}`")),
            "{errs:?}"
        );
    }
    one_error(
        &with_task("    steps:\n      - git-push: {credentials: c}\n"),
        6,
        19,
        &["missing required key `message`"],
    );
}

#[test]
fn wrong_types() {
    one_error(
        "version: 1\nname: [p]\ntasks:\n  a:\n    steps: [run: x]\n",
        2,
        7,
        &["`name` must be a string, found a list"],
    );
    one_error(
        "version: 1\nname: p\ntasks: [a]\n",
        3,
        8,
        &["`tasks` must be a mapping, found a list"],
    );
    one_error(
        &with_task("    steps: run\n"),
        5,
        12,
        &["must be a non-empty list of steps, found a string"],
    );
    one_error(
        &with_task("    steps:\n      - run\n"),
        6,
        9,
        &["step 1 of task `a` must be a mapping"],
    );
    one_error(
        &with_task("    env: [A=b]\n    steps: [run: x]\n"),
        5,
        10,
        &["`env` of task `a` must be a mapping, found a list"],
    );
    one_error(
        &with_task("    env: {A: [b]}\n    steps: [run: x]\n"),
        5,
        14,
        &["the value of `A`", "must be a string, found a list"],
    );
    one_error(
        &with_task("    image: {x: y}\n    steps: [run: x]\n"),
        5,
        12,
        &["`image` of task `a` must be a string, found a mapping"],
    );
    one_error(
        &with_task("    needs: {b: c}\n    steps: [run: x]\n"),
        5,
        12,
        &["must be a list of task names, found a mapping"],
    );
    one_error(
        &with_task("    needs: [[b]]\n    steps: [run: x]\n"),
        5,
        13,
        &["entries of `needs` of task `a` must be task names, found a list"],
    );
    one_error(
        &with_task("    steps:\n      - run:\n"),
        6,
        9,
        &["(the script) must be a string, found nothing"],
    );
    one_error(
        &with_task("    steps:\n      - run: \"  \"\n"),
        6,
        14,
        &["must not be empty"],
    );
    one_error(
        &with_task("    steps:\n      - build: t\n"),
        6,
        16,
        &["`build` of step 1 of task `a` must be a mapping, found a string"],
    );
    one_error(
        &with_task("    steps:\n      - set-image: {repo: r, files: f, image: i}\n"),
        6,
        37,
        &[
            "`files`",
            "must be a non-empty list of paths, found a string",
        ],
    );
    one_error(
        &with_task("    steps:\n      - set-image: {repo: r, files: [], image: i}\n"),
        6,
        37,
        &["`files`", "is empty"],
    );
    one_error(
        "version: 1\nname: p\nparams: {a: [1]}\ntasks:\n  a:\n    steps: [run: x]\n",
        3,
        13,
        &["the default of param `a` must be a string, found a list"],
    );
    one_error(
        "version: 1\nname: p\n[k]: v\ntasks:\n  a:\n    steps: [run: x]\n",
        3,
        1,
        &["keys in the pipeline file must be strings, found a list"],
    );
}

#[test]
fn version_must_be_one() {
    for (v, found) in [
        ("2", "`2`"),
        ("\"1\"", "`1`"),
        ("1.0", "`1.0`"),
        ("", "nothing"),
    ] {
        one_error(
            &format!("version: {v}\nname: p\ntasks:\n  a:\n    steps: [run: x]\n"),
            1,
            if v.is_empty() { 1 } else { 10 },
            &["`version` must be 1", found],
        );
    }
}

#[test]
fn bad_names() {
    one_error(
        "version: 1\nname: Go_App\ntasks:\n  a:\n    steps: [run: x]\n",
        2,
        7,
        &["bad pipeline name `Go_App`"],
    );
    one_error(
        "version: 1\nname: p\ntasks:\n  -bad:\n    steps: [run: x]\n",
        4,
        3,
        &["bad task name `-bad`"],
    );
    let long = "t".repeat(64);
    one_error(
        &format!("version: 1\nname: p\ntasks:\n  {long}:\n    steps: [run: x]\n"),
        4,
        3,
        &["bad task name", "at most 63 characters"],
    );
    let ok = "T".repeat(63);
    parse(
        "p.yaml",
        &format!("version: 1\nname: p\ntasks:\n  {ok}:\n    steps: [run: x]\n  a.b_c-D9:\n    steps: [run: x]\n"),
    )
    .unwrap();
    one_error(
        "version: 1\nname: p\nparams: {9lives: x}\ntasks:\n  a:\n    steps: [run: x]\n",
        3,
        10,
        &["bad param name `9lives`"],
    );
    one_error(
        &with_task("    env: {BAD-NAME: x}\n    steps: [run: x]\n"),
        5,
        11,
        &["bad environment variable name `BAD-NAME`"],
    );
}

#[test]
fn duplicate_keys() {
    one_error(
        "version: 1\nname: p\ntasks:\n  a:\n    steps: [run: x]\n  a:\n    steps: [run: y]\n",
        6,
        3,
        &["duplicate key `a` in `tasks` (first defined at line 4, column 3)"],
    );
    one_error(
        "version: 1\nname: p\nname: q\ntasks:\n  a:\n    steps: [run: x]\n",
        3,
        1,
        &["duplicate key `name`"],
    );
    one_error(
        &with_task("    env: {A: 1, A: 2}\n    steps: [run: x]\n"),
        5,
        17,
        &["duplicate key `A` in `env` of task `a`"],
    );
    one_error(
        &with_task("    steps:\n      - build: {tag: a, tag: b}\n"),
        6,
        25,
        &["duplicate key `tag`"],
    );
    one_error(
        &with_task("    steps:\n      - run: a\n        run: b\n"),
        7,
        9,
        &["duplicate key `run`"],
    );
}

#[test]
fn empty_tasks_and_steps() {
    one_error(
        "version: 1\nname: p\ntasks: {}\n",
        3,
        8,
        &["`tasks` is empty"],
    );
    one_error("version: 1\nname: p\ntasks:\n", 3, 1, &["`tasks` is empty"]);
    one_error(
        &with_task("    steps: []\n"),
        5,
        12,
        &["`steps` of task `a` is empty"],
    );
}

#[test]
fn needs_problems() {
    one_error(
        "version: 1\nname: p\ntasks:\n  unit-test:\n    steps: [run: x]\n  b:\n    needs: [unit-tst]\n    steps: [run: x]\n",
        7,
        13,
        &[
            "task `b` needs `unit-tst`, which is not a task in this file",
            "did you mean `unit-test`?",
        ],
    );
    let errs = errors(&with_task("    needs: [zzz]\n    steps: [run: x]\n"));
    assert_eq!(errs.len(), 1);
    assert!(!errs[0].2.contains("did you mean"), "{errs:?}");
    one_error(
        &with_task("    needs: [a]\n    steps: [run: x]\n"),
        5,
        13,
        &["task `a` needs itself"],
    );
    one_error(
        "version: 1\nname: p\ntasks:\n  a:\n    needs: [b, b]\n    steps: [run: x]\n  b:\n    steps: [run: x]\n",
        5,
        16,
        &["lists `b` in needs twice"],
    );
}

#[test]
fn three_cycle_is_reported_at_its_first_task() {
    let text = "version: 1\nname: p\ntasks:\n  ok:\n    steps: [run: x]\n  b:\n    needs: [c]\n    steps: [run: x]\n  a:\n    needs: [b, ok]\n    steps: [run: x]\n  c:\n    needs: [a]\n    steps: [run: x]\n";
    // Found from `b` (first in the file), so it starts there.
    one_error(text, 6, 3, &["dependency cycle: b -> c -> a -> b"]);

    let text = "version: 1\nname: p\ntasks:\n  a:\n    needs: [b]\n    steps: [run: x]\n  b:\n    needs: [c]\n    steps: [run: x]\n  c:\n    needs: [a]\n    steps: [run: x]\n";
    one_error(text, 4, 3, &["dependency cycle: a -> b -> c -> a"]);
}

#[test]
fn step_kinds() {
    one_error(
        &with_task("    steps:\n      - name: nothing\n"),
        6,
        9,
        &[
            "step 1 of task `a` has no kind",
            "`run`, `build`, `push`, `set-image`, `git-push`",
        ],
    );
    one_error(
        &with_task("    steps:\n      - run: x\n        build: {tag: t}\n"),
        7,
        9,
        &["has more than one kind (`run` and `build`)"],
    );
    one_error(
        &with_task("    steps:\n      - push: {image: i}\n        image: j\n"),
        7,
        9,
        &["`image` is only allowed on `run` steps"],
    );
}

#[test]
fn bad_timeouts_and_retries() {
    one_error(
        &with_task("    timeout: 5x\n    steps: [run: x]\n"),
        5,
        14,
        &["bad timeout `5x`", "`timeout` of task `a`"],
    );
    one_error(
        &with_task("    timeout: 0\n    steps: [run: x]\n"),
        5,
        14,
        &["at least 1 second"],
    );
    one_error(
        &with_task("    timeout: [1]\n    steps: [run: x]\n"),
        5,
        14,
        &["must be a duration"],
    );
    one_error(
        &with_task("    steps:\n      - run: x\n        timeout: 1.5m\n"),
        7,
        18,
        &["bad timeout `1.5m`", "step 1 of task `a`"],
    );
    one_error(
        &with_task("    retries: 11\n    steps: [run: x]\n"),
        5,
        14,
        &["`retries` of task `a` must be between 0 and 10, found 11"],
    );
    one_error(
        &with_task("    retries: -1\n    steps: [run: x]\n"),
        5,
        14,
        &["between 0 and 10"],
    );
    one_error(
        &with_task("    retries: two\n    steps: [run: x]\n"),
        5,
        14,
        &["must be a whole number"],
    );
}

#[test]
fn bad_runs_on() {
    one_error(
        &with_task("    runs-on: [linux]\n    steps: [run: x]\n"),
        5,
        15,
        &["bad entry `linux` in `runs-on` of task `a`: use `key=value`"],
    );
    one_error(
        &with_task("    runs-on: [os=linux, =x]\n    steps: [run: x]\n"),
        5,
        25,
        &["bad label `=x`"],
    );
    one_error(
        &with_task("    runs-on: [os=linux, os=mac]\n    steps: [run: x]\n"),
        5,
        25,
        &["label `os` appears twice"],
    );
    one_error(
        &with_task("    runs-on: {os: \"\"}\n    steps: [run: x]\n"),
        5,
        15,
        &["bad label `os=`", "non-empty"],
    );
    one_error(
        &with_task("    runs-on: linux\n    steps: [run: x]\n"),
        5,
        14,
        &["must be a list of `key=value` labels or a mapping"],
    );
    one_error(
        &with_task("    runs-on: [\"os=${{ params.x }}\"]\n    steps: [run: x]\n"),
        5,
        15,
        &["substitutions are not allowed in `runs-on`"],
    );
}

#[test]
fn several_errors_at_once_in_file_order() {
    let text = "version: 2\nname: P\ntasks:\n  a:\n    needs: [nope]\n    timeout: forever\n    retries: 99\n    steps:\n      - bogus: 1\n  b:\n    steps: []\n";
    let err = parse("p.yaml", text).unwrap_err();
    let places: Vec<(usize, usize)> = err.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(
        places,
        [
            (1, 10),
            (2, 7),
            (5, 13),
            (6, 14),
            (7, 14),
            (9, 9),
            (9, 9),
            (11, 12)
        ],
        "{err}"
    );
    let shown = err.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 8);
    assert!(
        lines[0].starts_with("p.yaml:1:10: `version` must be 1"),
        "{shown}"
    );
    assert!(
        lines[7].starts_with("p.yaml:11:12: `steps` of task `b` is empty"),
        "{shown}"
    );
}

// ---- substitutions ----

#[test]
fn substitution_problems_are_found_by_parse() {
    one_error(
        &with_task("    steps:\n      - run: echo ${{ params.nope }}\n"),
        6,
        14,
        &[
            "unknown param `nope` in `${{ params.nope }}`",
            "declare it under `params:`",
        ],
    );
    one_error(
        "version: 1\nname: p\nparams: {image: x}\ntasks:\n  a:\n    steps: [run: \"${{ params.imag }}\"]\n",
        6,
        18,
        &[
            "unknown param `imag`",
            "did you mean `image`?",
            "declared: image",
        ],
    );
    one_error(
        &with_task("    image: \"${{ secrets.token }}\"\n    steps: [run: x]\n"),
        5,
        12,
        &[
            "unknown substitution `${{ secrets.token }}`",
            "`params.NAME`, `matrix.KEY`, `tasks.NAME.outputs.KEY`, `git.sha`, `git.repo`, `git.ref` or `run.id`",
        ],
    );
    one_error(
        &with_task("    env: {A: \"${{ git.sha\"}\n    steps: [run: x]\n"),
        5,
        14,
        &["unterminated `${{`"],
    );
    one_error(
        "version: 1\nname: p\nparams: {a: \"${{ git.sha }}\"}\ntasks:\n  a:\n    steps: [run: x]\n",
        3,
        13,
        &["default of param `a` must not contain `${{`"],
    );
    // Every field substitutions apply to is checked.
    let fields = [
        "      - name: \"${{ x }}\"\n        run: a\n",
        "      - run: a\n        image: \"${{ x }}\"\n",
        "      - run: a\n        env: {A: \"${{ x }}\"}\n",
        "      - build: {context: \"${{ x }}\", tag: t}\n",
        "      - build: {dockerfile: \"${{ x }}\", tag: t}\n",
        "      - build: {tag: \"${{ x }}\"}\n",
        "      - push: {image: \"${{ x }}\"}\n",
        "      - push: {image: i, credentials: \"${{ x }}\"}\n",
        "      - set-image: {repo: \"${{ x }}\", files: [f], image: i}\n",
        "      - set-image: {repo: r, files: [\"${{ x }}\"], image: i}\n",
        "      - set-image: {repo: r, files: [f], image: \"${{ x }}\"}\n",
        "      - git-push: {message: \"${{ x }}\"}\n",
        "      - git-push: {message: m, credentials: \"${{ x }}\"}\n",
    ];
    for f in fields {
        let errs = errors(&with_task(&format!("    steps:\n{f}")));
        assert_eq!(errs.len(), 1, "{f}: {errs:?}");
        assert!(
            errs[0].2.contains("unknown substitution `${{ x }}`"),
            "{errs:?}"
        );
    }
}

fn ctx() -> Context {
    Context {
        params: BTreeMap::new(),
        git_sha: Some(s("abc123")),
        git_repo: Some(s("http://git/demo.git")),
        git_ref: Some(s("refs/heads/main")),
        run_id: Some(s("run-1")),
    }
}

#[test]
fn resolve_substitutes_everything() {
    let p = parse("p.yaml", FULL).unwrap();
    let mut c = ctx();
    c.params.insert(s("image"), s("reg/app"));
    let r = resolve("p.yaml", &p, &c).unwrap();
    let steps = &r.tasks[0].steps;
    assert_eq!(
        steps[1].kind,
        StepKind::Build {
            context: s("."),
            dockerfile: s("Dockerfile"),
            tag: s("reg/app:abc123"),
            skip_if_exists: None,
            credentials: None,
            args: BTreeMap::new(),
        }
    );
    assert_eq!(
        steps[2].kind,
        StepKind::Push {
            image: s("reg/app:abc123"),
            credentials: Some(s("harbor")),
            skip_if_exists: None,
        }
    );
    assert_eq!(
        steps[3].kind,
        StepKind::SetImage {
            repo: s("http://git/demo.git"),
            files: vec![s("k8s/pod.yaml")],
            image: s("x:run-1"),
            allow_no_match: false,
            pin_digest: false,
            digest: None,
            monotonic: false,
        }
    );
    assert_eq!(
        steps[4].kind,
        StepKind::GitPush {
            message: s("deploy abc123"),
            credentials: Some(s("gitops")),
            branch: None,
            pull_request: false,
        }
    );
    let json = serde_json::to_string(&r).unwrap();
    assert!(!json.contains("${{"), "{json}");
    // Defaults apply without overrides.
    let r = resolve("p.yaml", &p, &ctx()).unwrap();
    assert_eq!(
        r.tasks[0].steps[2].kind,
        StepKind::Push {
            image: s("127.0.0.1:5000/demo-ns/go-sampleapp:abc123"),
            credentials: Some(s("harbor")),
            skip_if_exists: None,
        }
    );
}

#[test]
fn resolve_covers_task_and_step_strings() {
    let text = "version: 1\nname: p\nparams: {v: V}\ntasks:\n  a:\n    image: \"img:${{params.v}}\"\n    env: {A: \"${{ params.v }}-${{ run.id }}\"}\n    steps:\n      - name: \"s ${{ params.v }}\"\n        env: {B: \"${{git.repo}}\"}\n        run: \"echo ${{ params.v }}${{ params.v }}\"\n        image: \"i:${{ params.v }}\"\n";
    let p = parse("p.yaml", text).unwrap();
    let r = resolve("p.yaml", &p, &ctx()).unwrap();
    let t = &r.tasks[0];
    assert_eq!(t.image.as_deref(), Some("img:V"));
    assert_eq!(t.env["A"], "V-run-1");
    assert_eq!(t.steps[0].name.as_deref(), Some("s V"));
    assert_eq!(t.steps[0].env["B"], "http://git/demo.git");
    assert_eq!(
        t.steps[0].kind,
        StepKind::Run {
            script: s("echo \"${CAPSTAN_PARAM_v}\"\"${CAPSTAN_PARAM_v}\""),
            image: Some(s("i:V"))
        }
    );
    assert_eq!(t.steps[0].env["CAPSTAN_PARAM_v"], "V");
}

/// Runs `script` with `/bin/sh -ec` and `env`, in `dir`: its stdout.
fn sh(dir: &std::path::Path, script: &str, env: &BTreeMap<String, String>) -> String {
    let out = std::process::Command::new("/bin/sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The issue's payloads, in every quoting context a script can put a
/// substitution in: nothing is injected and the value arrives verbatim.
#[test]
fn no_value_can_change_a_scripts_syntax() {
    let payloads = [
        "main\"; echo INJECTED-$(id -un) > f; echo \"",
        "main'; echo INJECTED > f; echo '",
        "x`touch f`$(touch f) ${HOME} $HOME *  two  spaces\\",
        "a\nEOF\ntouch f\ncat <<EOF",
        "-n",
        "",
    ];
    let scripts = [
        // (script, what it prints for value V)
        ("printf '%s\\n' ${{ params.b }}", "V\n"),
        ("printf '%s\\n' \"[${{ params.b }}]\"", "[V]\n"),
        ("printf '%s\\n' '[${{ params.b }}]'", "[V]\n"),
        ("printf '%s\\n' x${{ params.b }}y${{ params.b }}", "xVyV\n"),
        ("printf '%s\\n' \"$(printf '%s' ${{ params.b }})\"", "V\n"),
        (
            "printf '%s\\n' \"$(printf '%s' \"<${{ params.b }}>\")\"",
            "<V>\n",
        ),
        ("cat <<EOF\n${{ params.b }}\nEOF", "V\n"),
        (
            "cat <<-EOF\n\t[${{ params.b }}]\n\tEOF\nprintf '%s\\n' '${{ params.b }}'",
            "[V]\nV\n",
        ),
        (
            "# ${{ params.b }} in a comment\nprintf '%s\\n' ${{ params.b }}",
            "V\n",
        ),
        ("b=${{ params.b }}; printf '%s\\n' \"$b\"", "V\n"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for payload in payloads {
        for (script, want) in scripts {
            let yaml = format!(
                "version: 1\nname: p\nparams: {{ b: x }}\ntasks:\n  t:\n    steps:\n      - run: {}\n",
                serde_json::to_string(script).unwrap()
            );
            let p = parse("p.yaml", &yaml).unwrap();
            let mut c = ctx();
            c.params.insert(s("b"), s(payload));
            let r = resolve("p.yaml", &p, &c).unwrap();
            let step = &r.tasks[0].steps[0];
            let StepKind::Run { script: text, .. } = &step.kind else {
                panic!()
            };
            assert!(!text.contains(payload) || payload.len() < 3, "{text}");
            let env: BTreeMap<String, String> = step.env.clone();
            assert_eq!(env["CAPSTAN_PARAM_b"], payload);
            let got = sh(dir.path(), text, &env);
            assert_eq!(got, want.replace('V', payload), "{script:?} -> {text:?}");
            assert!(
                !dir.path().join("f").exists(),
                "{script:?} with {payload:?} injected"
            );
        }
    }
}

#[test]
fn git_and_run_values_in_scripts_are_variables_too() {
    let yaml = "version: 1\nname: p\nparams: { image-tag: t, image_tag2: u }\ntasks:\n  t:\n    steps:\n      - run: echo ${{ git.sha }} ${{ git.repo }} ${{ run.id }} ${{ params.image-tag }}\n";
    let p = parse("p.yaml", yaml).unwrap();
    let mut c = ctx();
    c.git_sha = Some(s("main;touch f"));
    let r = resolve("p.yaml", &p, &c).unwrap();
    let step = &r.tasks[0].steps[0];
    assert_eq!(
        step.kind,
        StepKind::Run {
            script: s(
                "echo \"${CAPSTAN_GIT_SHA}\" \"${CAPSTAN_GIT_REPO}\" \"${CAPSTAN_RUN_ID}\" \"${CAPSTAN_PARAM_image_tag}\""
            ),
            image: None
        }
    );
    let env: Vec<(&str, &str)> = step
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        [
            ("CAPSTAN_GIT_REPO", "http://git/demo.git"),
            ("CAPSTAN_GIT_SHA", "main;touch f"),
            ("CAPSTAN_PARAM_image_tag", "t"),
            ("CAPSTAN_RUN_ID", "run-1"),
        ]
    );
}

#[test]
fn script_substitutions_that_cannot_be_passed_safely_are_refused() {
    let yaml = "version: 1\nname: p\nparams: { a-b: x, a_b: y }\ntasks:\n  t:\n    steps:\n      - run: echo ${{ params.a-b }} ${{ params.a_b }}\n      - run: \"cat <<'EOF'\\n${{ params.a-b }}\\nEOF\"\n";
    let p = parse("p.yaml", yaml).unwrap();
    let err = resolve("p.yaml", &p, &ctx()).unwrap_err();
    let got: Vec<String> = err
        .iter()
        .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
        .collect();
    assert_eq!(
        got,
        [
            "7:14: `${{ params.a-b }}` and `${{ params.a_b }}` would both be `$CAPSTAN_PARAM_a_b` in this script: rename one of them",
            "8:14: `${{ params.a-b }}` inside a here-document with a quoted delimiter (<<'EOF') cannot expand: unquote the delimiter, or write `$CAPSTAN_PARAM_a_b` where it may expand",
        ]
    );
    // Outside scripts, the same substitutions are plain text.
    let yaml = "version: 1\nname: p\nparams: { a-b: x, a_b: y }\ntasks:\n  t:\n    image: \"${{ params.a-b }}${{ params.a_b }}\"\n    steps:\n      - run: echo\n";
    let r = resolve("p.yaml", &parse("p.yaml", yaml).unwrap(), &ctx()).unwrap();
    assert_eq!(r.tasks[0].image.as_deref(), Some("xy"));
}

#[test]
fn resolve_errors() {
    let p = parse("p.yaml", FULL).unwrap();

    // Unknown override: no place in the file.
    let mut c = ctx();
    c.params.insert(s("imag"), s("x"));
    let err = resolve("p.yaml", &p, &c).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!((err.0[0].line, err.0[0].column), (0, 0));
    assert_eq!(
        err.0[0].message,
        "unknown param `imag`: declare it under `params:` in p.yaml (did you mean `image`?)"
    );
    assert_eq!(
        err.to_string(),
        "p.yaml: unknown param `imag`: declare it under `params:` in p.yaml (did you mean `image`?)"
    );

    // An override may not smuggle in a substitution.
    let mut c = ctx();
    c.params.insert(s("image"), s("${{ git.sha }}"));
    let err = resolve("p.yaml", &p, &c).unwrap_err();
    assert!(err.0[0].message.contains("must not contain"), "{err}");

    // Nor may the run's own values, which reach scripts as environment
    // variables (the `pipeline` fuzz target's CI find).
    for set in [
        (|c: &mut Context| c.git_sha = Some(s("ab ${{ git.sha"))) as fn(&mut Context),
        |c| c.git_repo = Some(s("https://h/${{ x }}")),
        |c| c.run_id = Some(s("${{")),
    ] {
        let mut c = ctx();
        set(&mut c);
        let err = resolve("p.yaml", &p, &c).unwrap_err();
        assert_eq!(err.len(), 1, "{err}");
        assert!(err.0[0].message.contains("must not contain `${{`"), "{err}");
    }
    let script =
        "version: 1\nname: n\ntasks:\n  t:\n    steps:\n      - run: echo ${{ git.sha }}\n";
    let mut c = ctx();
    c.git_sha = Some(s("deadbe [by ${{ git.sha s:"));
    let err = resolve("p.yaml", &parse("p.yaml", script).unwrap(), &c).unwrap_err();
    assert!(
        err.0[0]
            .message
            .contains("`${{ git.sha }}` must not contain"),
        "{err}"
    );

    // Missing git.sha: reported once, at its first use (the build tag).
    let mut c = ctx();
    c.git_sha = None;
    let err = resolve("p.yaml", &p, &c).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    assert_eq!((err.0[0].line, err.0[0].column), (20, 59));
    assert_eq!(
        err.0[0].message,
        "`${{ git.sha }}` needs a revision: submit with --rev"
    );

    // Missing git.repo and run.id.
    let c = Context::default();
    let err = resolve("p.yaml", &p, &c).unwrap_err();
    let got: Vec<(usize, usize, &str)> = err
        .iter()
        .map(|e| (e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                20,
                59,
                "`${{ git.sha }}` needs a revision: submit with --rev"
            ),
            (
                22,
                28,
                "`${{ git.repo }}` needs a repository: submit with --repo"
            ),
            (
                22,
                77,
                "`${{ run.id }}` needs the run's id, which this context lacks"
            ),
        ]
    );
}

#[test]
fn resolve_checks_hand_built_pipelines() {
    let mut p = expected_full();
    p.tasks[1].steps[0].kind = StepKind::Run {
        script: s("${{ params.nope }} ${{ bad }} ${{ open"),
        image: None,
    };
    let err = resolve("p.yaml", &p, &ctx()).unwrap_err();
    // No source map: no location.
    assert!(err.iter().all(|e| e.line == 0), "{err}");
    let text = err.to_string();
    assert!(text.contains("unterminated"), "{text}");
    assert!(text.contains("unknown substitution `${{ bad }}`"), "{text}");
}

#[test]
fn task_spec_conversion() {
    let p = parse("p.yaml", FULL).unwrap();
    let r = resolve("p.yaml", &p, &ctx()).unwrap();
    let spec = crate::task_spec("p", &r.tasks[0]);
    assert_eq!(spec.name, "unit-test");
    assert_eq!(spec.image, "capstan-test/golang");
    assert_eq!(spec.timeout_seconds, 600);
    assert_eq!(
        spec.env.get("GOFLAGS").map(String::as_str),
        Some("-mod=vendor")
    );
    assert_eq!(spec.runs_on.len(), 2);
    assert_eq!(spec.steps.len(), 5);
    assert_eq!(spec.steps[0].name, "test");
    assert_eq!(spec.steps[0].timeout_seconds, 30);
    assert_eq!(
        spec.steps[0].kind,
        Some(pb::step::Kind::Run(pb::RunStep {
            script: s("go test ./..."),
            image: s("other-image")
        }))
    );
    assert_eq!(spec.steps[1].name, "build-2");
    assert_eq!(spec.steps[1].timeout_seconds, 0);
    assert_eq!(
        spec.steps[4].kind,
        Some(pb::step::Kind::GitPush(pb::GitPushStep {
            message: s("deploy abc123"),
            credentials: s("gitops"),
            branch: s(""),
            mode: s("direct"),
            pipeline: s("p"),
        }))
    );
    let other = crate::task_spec("p", &r.tasks[1]);
    assert_eq!(other.image, "");
    assert_eq!(other.timeout_seconds, 90);
    assert_eq!(
        other.steps[2].kind,
        Some(pb::step::Kind::Push(pb::PushStep {
            image: s("i"),
            credentials: s(""),
            // No commit tag: pushed every time.
            force: true,
        }))
    );
}

#[test]
fn capabilities_and_resources() {
    let p = parse(
        "c.yaml",
        "version: 1\nname: c\ntasks:\n  t:\n    capabilities: [net_bind_service, CAP_CHOWN, CHOWN]\n    resources: { cpus: 1.5, memory: 512m }\n    steps: [ { run: x } ]\n",
    )
    .unwrap();
    let t = &p.tasks[0];
    assert_eq!(t.capabilities, vec![s("NET_BIND_SERVICE"), s("CHOWN")]);
    assert_eq!(t.cpus, Some(1.5));
    assert_eq!(t.memory_bytes, Some(512 * 1024 * 1024));
    let spec = crate::task_spec("p", t);
    assert_eq!(spec.capabilities, vec![s("NET_BIND_SERVICE"), s("CHOWN")]);
    assert_eq!(spec.memory_bytes, 512 * 1024 * 1024);

    let errs = parse(
        "c.yaml",
        "version: 1\nname: c\ntasks:\n  t:\n    capabilities: [ALL, \"bad cap\"]\n    resources: { cpus: -1, memory: 1k, disk: 3 }\n    steps: [ { run: x } ]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errs.contains("c.yaml:5:20: `capabilities` of task `t` may not ask for `ALL`"),
        "{errs}"
    );
    assert!(
        errs.contains("c.yaml:5:25: bad capability `bad cap`"),
        "{errs}"
    );
    assert!(errs.contains("c.yaml:6:24: `cpus`"), "{errs}");
    assert!(errs.contains("c.yaml:6:36: `memory`"), "{errs}");
    assert!(errs.contains("disk"), "{errs}");
}

#[test]
fn set_image_allow_no_match() {
    let yaml = |v: &str| {
        format!(
            "version: 1\nname: a\ntasks:\n  t:\n    steps:\n      - set-image: {{ repo: r, files: [f.yaml], image: x, allow-no-match: {v} }}\n"
        )
    };
    let p = parse("a.yaml", &yaml("true")).unwrap();
    assert!(matches!(
        p.tasks[0].steps[0].kind,
        StepKind::SetImage {
            allow_no_match: true,
            pin_digest: false,
            digest: None,
            monotonic: false,
            ..
        }
    ));
    let spec = crate::task_spec("p", &p.tasks[0]);
    let Some(capstan_proto::pipeline::v1::step::Kind::SetImage(si)) = &spec.steps[0].kind else {
        panic!("{spec:?}")
    };
    assert!(si.allow_no_match);
    let err = parse("a.yaml", &yaml("maybe")).unwrap_err().to_string();
    assert!(
        err.contains("a.yaml:6:") && err.contains("`allow-no-match`"),
        "{err}"
    );
}

#[test]
fn set_image_without_repo_edits_the_run_repository() {
    let yaml = "version: 1\nname: a\ntasks:\n  t:\n    steps:\n      - set-image: { files: [k8s/pod.yaml], image: x }\n";
    let p = parse("a.yaml", yaml).unwrap();
    let StepKind::SetImage { repo, files, .. } = &p.tasks[0].steps[0].kind else {
        panic!("{p:?}")
    };
    assert_eq!(repo, "", "empty means the run's own repository");
    assert_eq!(files, &["k8s/pod.yaml"]);
}

#[test]
fn a_file_full_of_problems_lists_the_first_thousand() {
    let mut text = s("version: 1\nname: p\ntasks:\n  t:\n    steps:\n");
    for i in 0..1000 {
        text.push_str(&format!("      - bogus{i}: x\n"));
    }
    let err = parse("p.yaml", &text).unwrap_err();
    assert_eq!(err.len(), MAX_LISTED_ERRORS + 1);
    assert_eq!(
        err.0.last().unwrap().to_string(),
        "p.yaml: ... and 1000 more problems, not listed: fix these first"
    );
    // What travels in a gRPC status: whole lines up to the size, then a count.
    let summary = err.summary(1024);
    assert!(summary.len() <= 1024, "{}", summary.len());
    let lines: Vec<&str> = summary.lines().collect();
    assert!(lines.len() > 2, "{summary}");
    assert_eq!(lines[0], err.0[0].to_string());
    let listed = lines.len() - 1;
    assert_eq!(
        *lines.last().unwrap(),
        format!(
            "... and {} more problems (`capstan validate FILE` lists them all)",
            err.len() - listed
        )
    );
    let one = parse("p.yaml", "version: 1\nname: p\ntasks: {}\nbogus: 1\n").unwrap_err();
    assert_eq!(one.summary(1024), one.to_string(), "what fits is unchanged");
}

/// Found by the `pipeline` fuzz target (fuzz/, issue 18): a `$` before a
/// substitution whose value starts with `{{`, or a value ending in `$`
/// before a literal `{{`, made a `${{` in the resolved pipeline.
#[test]
fn substitution_never_spells_a_new_substitution() {
    let file = |image: &str, a: &str| {
        format!(
            "version: 1\nname: p\nparams: {{a: \"{a}\"}}\ntasks:\n  t:\n    steps:\n      - push: {{image: \"{image}\"}}\n"
        )
    };
    let want = "after substitution this value contains `${{`: a substitution's value and the \
                text beside it spell it (a `$` right before `${{ ... }}`, or a value ending in \
                `$` right before a brace); put a space between them or change the value";
    for (image, a) in [
        ("o $${{ params.a }}", "{{ x }}"),
        ("${{ params.a }}{{ x }}", "$"),
        ("$${{ params.a }}{ x }}", "{"),
    ] {
        let p = parse("p.yaml", &file(image, a)).unwrap();
        let err = resolve("p.yaml", &p, &ctx()).unwrap_err();
        let got: Vec<(usize, usize, &str)> = err
            .iter()
            .map(|e| (e.line, e.column, e.message.as_str()))
            .collect();
        assert_eq!(got, [(7, 23, want)], "{image} with a = {a}");
    }
    // The same characters apart are fine.
    let p = parse("p.yaml", &file("$ ${{ params.a }}", "{{ x }}")).unwrap();
    let r = resolve("p.yaml", &p, &ctx()).unwrap();
    assert_eq!(
        r.tasks[0].steps[0].kind,
        StepKind::Push {
            image: s("$ {{ x }}"),
            credentials: None,
            skip_if_exists: None,
        }
    );
}

/// The `pipeline` fuzz target's crashing input, as it found it
/// (fuzz/corpus/pipeline/crash-389b772703cf97a4: the file, then the
/// context `git.sha` = `deadbeef`, empty `git.repo` and `run.id`, params
/// `branch=$` and `image={{`).
#[test]
fn the_fuzzers_crashing_input_is_an_error() {
    let file = "version: 1\nname: subst\nparams:\n  branch: main\n  image: 127.0.0.1:5000/demo/app\ntasks:\n  build:\n    image: \"${{ params.image }}:${{ git.sha }}\"\n    env: { REPO: \"${{ git.repo }}\", rUN: \"${{ run.id }}\" }\n    steps:\n      - run: echo \u{e}{{ para.s.branch }} $${{ params.branch }}\n      - set-image: { files: [k6s/pod.yaml], image: \"o $${{ params.image }}:${{ git.sha }}\" }\n      - git-push: { message: \"deploy ${{ git.sha }}\" }\n";
    let p = parse("fuzz.yaml", file).unwrap();
    let c = Context {
        params: map(&[("branch", "$"), ("image", "{{")]),
        git_sha: Some(s("deadbeef")),
        git_repo: Some(s("")),
        git_ref: None,
        run_id: Some(s("")),
    };
    let err = resolve("fuzz.yaml", &p, &c).unwrap_err();
    let got: Vec<(usize, usize, bool)> = err
        .iter()
        .map(|e| {
            (
                e.line,
                e.column,
                e.message
                    .starts_with("after substitution this value contains `${{`"),
            )
        })
        .collect();
    assert_eq!(got, [(12, 52, true)], "{err}");
}

#[test]
fn git_ref_substitutes_in_fields_and_scripts() {
    let file = "version: 1\nname: p\ntasks:\n  t:\n    env: { R: \"${{ git.ref }}\" }\n    steps:\n      - run: echo ${{ git.ref }}\n";
    let p = parse("r.yaml", file).unwrap();
    let resolved = resolve("r.yaml", &p, &ctx()).unwrap();
    let task = &resolved.tasks[0];
    assert_eq!(
        task.env.get("R").map(String::as_str),
        Some("refs/heads/main")
    );
    assert_eq!(
        task.steps[0].env.get("CAPSTAN_GIT_REF").map(String::as_str),
        Some("refs/heads/main")
    );
    let mut bare = ctx();
    bare.git_ref = None;
    let err = resolve("r.yaml", &p, &bare).unwrap_err();
    assert!(
        err.to_string()
            .contains("`${{ git.ref }}` needs the pushed ref"),
        "{err}"
    );
}

#[test]
fn concurrency_groups_parse_and_substitute() {
    let file = "version: 1\nname: p\nconcurrency: { group: \"deploy-${{ git.ref }}\", cancel-in-progress: true }\ntasks:\n  t:\n    steps: [run: x]\n";
    let p = parse("c.yaml", file).unwrap();
    let c = p.concurrency.clone().unwrap();
    assert!(c.cancel_in_progress);
    let resolved = resolve("c.yaml", &p, &ctx()).unwrap();
    assert_eq!(
        resolved.concurrency.unwrap().group,
        "deploy-refs/heads/main"
    );
    let mut bare = ctx();
    bare.git_ref = None;
    let err = resolve("c.yaml", &p, &bare).unwrap_err().to_string();
    assert!(
        err.contains("c.yaml:3:") && err.contains("git.ref"),
        "{err}"
    );
    let plain = parse(
        "c.yaml",
        "version: 1\nname: p\nconcurrency:\n  group: deploy\ntasks:\n  t:\n    steps: [run: x]\n",
    )
    .unwrap();
    assert_eq!(
        plain.concurrency.unwrap(),
        Concurrency {
            group: "deploy".into(),
            cancel_in_progress: false
        }
    );
    for (bad, want) in [
        (
            "concurrency: { cancel-in-progress: true }",
            "missing required key `group` in `concurrency`",
        ),
        (
            "concurrency: { group: g, cancel-in-progress: yes-please }",
            "`cancel-in-progress` must be true or false",
        ),
        (
            "concurrency: { group: g, cancel: true }",
            "unknown key `cancel` in `concurrency`",
        ),
        (
            "concurrency: { group: \"\" }",
            "`concurrency.group` must not be empty",
        ),
    ] {
        let text = format!("version: 1\nname: p\n{bad}\ntasks:\n  t:\n    steps: [run: x]\n");
        let err = parse("c.yaml", &text).unwrap_err().to_string();
        assert!(
            err.contains("c.yaml:3:") && err.contains(want),
            "{bad}: {err}"
        );
    }
}

#[test]
fn schedules_parse_with_their_shape_checked() {
    let ok = parse("s.yaml", "version: 1\nname: p\nschedules:\n  - cron: \"0 3 * * *\"\n  - { cron: \"*/2 * * * * *\" }\ntasks:\n  t:\n    steps: [run: x]\n").unwrap();
    assert_eq!(ok.schedules, ["0 3 * * *", "*/2 * * * * *"]);
    for (bad, line, want) in [
        ("schedules: daily", 3, "`schedules` must be a list"),
        (
            "schedules:\n  - cron: every day",
            4,
            "bad cron expression `every day`",
        ),
        (
            "schedules:\n  - { when: x }",
            4,
            "unknown key `when` in a schedule",
        ),
        (
            "schedules:\n  - cron: \"0 3 * * * ; rm\"",
            4,
            "bad cron expression",
        ),
    ] {
        let text = format!("version: 1\nname: p\n{bad}\ntasks:\n  t:\n    steps: [run: x]\n");
        let err = parse("s.yaml", &text).unwrap_err().to_string();
        assert!(
            err.contains(&format!("s.yaml:{line}:")) && err.contains(want),
            "{bad}: {err}"
        );
    }
}

#[test]
fn skip_if_exists_defaults_on_and_the_build_asks_with_the_push_login() {
    use capstan_proto::pipeline::v1::step::Kind;
    let yaml = |build: &str, push: &str| {
        format!(
            "version: 1\nname: a\ntasks:\n  t:\n    steps:\n      - build: {{ tag: reg/app:0123abcd{build} }}\n      - push: {{ image: reg/app:0123abcd, credentials: reg{push} }}\n      - push: {{ image: reg/other:0123abcd, credentials: other }}\n"
        )
    };
    let spec = crate::task_spec("p", &parse("a.yaml", &yaml("", "")).unwrap().tasks[0]);
    let (Some(Kind::Build(b)), Some(Kind::Push(p))) = (&spec.steps[0].kind, &spec.steps[1].kind)
    else {
        panic!("{spec:?}")
    };
    assert!(
        !b.force && !p.force,
        "a commit tag is skipped when the registry has it"
    );
    assert_eq!(b.credentials, "reg", "the push of the same image's login");

    let p = parse(
        "a.yaml",
        &yaml(
            ", skip-if-exists: false, credentials: mine",
            ", skip-if-exists: false",
        ),
    )
    .unwrap();
    let spec = crate::task_spec("p", &p.tasks[0]);
    let (Some(Kind::Build(b)), Some(Kind::Push(p))) = (&spec.steps[0].kind, &spec.steps[1].kind)
    else {
        panic!("{spec:?}")
    };
    assert!(b.force && p.force);
    assert_eq!(b.credentials, "mine");

    let err = parse("a.yaml", &yaml(", skip-if-exists: sometimes", ""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.yaml:6:")
            && err.contains(
                "`skip-if-exists` of `build` of step 1 of task `t` must be true or false"
            ),
        "{err}"
    );
    // A tag that moves (a branch, `latest`, no tag) is built and pushed
    // again unless the step says otherwise.
    let kinds = |yaml: &str| {
        let spec = crate::task_spec("p", &parse("a.yaml", yaml).unwrap().tasks[0]);
        spec.steps
            .iter()
            .map(|s| match &s.kind {
                Some(Kind::Build(b)) => b.force,
                Some(Kind::Push(p)) => p.force,
                other => panic!("{other:?}"),
            })
            .collect::<Vec<bool>>()
    };
    assert_eq!(
        kinds(
            "version: 1\nname: a\ntasks:\n  t:\n    steps:\n      - build: { tag: reg/app:main }\n      - push: { image: reg/app:latest }\n      - push: { image: reg/app }\n      - push: { image: \"127.0.0.1:5000/app\" }\n      - push: { image: reg/app:main, skip-if-exists: true }\n"
        ),
        [true, true, true, true, false]
    );
}

#[test]
fn set_image_pin_digest_and_its_errors() {
    use capstan_proto::pipeline::v1::{TaskSpec, step::Kind};
    let yaml = |extra: &str| {
        format!(
            "version: 1\nname: a\ntasks:\n  t:\n    steps:\n      - set-image: {{ repo: r, files: [f.yaml], image: x:1{extra} }}\n"
        )
    };
    let spec =
        |extra: &str| crate::task_spec("p", &parse("a.yaml", &yaml(extra)).unwrap().tasks[0]);
    let set = |spec: &TaskSpec| match &spec.steps[0].kind {
        Some(Kind::SetImage(si)) => si.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(set(&spec("")).pin, "");
    assert_eq!(set(&spec(", pin: tag")).pin, "");
    let pinned = set(&spec(", pin: digest"));
    assert_eq!(
        (pinned.pin.as_str(), pinned.digest.as_str()),
        ("digest", "")
    );
    let given = set(&spec(", pin: digest, digest: \"sha256:ab\""));
    assert_eq!(given.digest, "sha256:ab");
    let err = parse("a.yaml", &yaml(", pin: sha"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.yaml:6:") && err.contains("must be `tag` or `digest`, found `sha`"),
        "{err}"
    );
    let err = parse("a.yaml", &yaml(", digest: \"sha256:ab\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs `pin: digest`"), "{err}");
    assert_eq!(set(&spec("")).order, "");
    assert_eq!(set(&spec(", order: monotonic")).order, "monotonic");
    assert_eq!(set(&spec(", order: any")).order, "");
    let err = parse("a.yaml", &yaml(", order: sideways"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.yaml:6:") && err.contains("`order` of") && err.contains("found `sideways`"),
        "{err}"
    );
}

#[test]
fn git_push_branch_and_pull_request_mode() {
    use capstan_proto::pipeline::v1::step::Kind;
    let yaml = |extra: &str| {
        format!(
            "version: 1\nname: promote\nparams:\n  n: 2\ntasks:\n  t:\n    steps:\n      - set-image: {{ repo: r, files: [f.yaml], image: x:1 }}\n      - git-push: {{ message: m{extra} }}\n"
        )
    };
    let push = |extra: &str| {
        let p = parse("a.yaml", &yaml(extra)).unwrap();
        let r = resolve("a.yaml", &p, &Context::default()).unwrap();
        match &crate::task_spec(&r.name, &r.tasks[0]).steps[1].kind {
            Some(Kind::GitPush(g)) => g.clone(),
            other => panic!("{other:?}"),
        }
    };
    let plain = push("");
    assert_eq!(
        (
            plain.mode.as_str(),
            plain.branch.as_str(),
            plain.pipeline.as_str()
        ),
        ("direct", "", "promote")
    );
    let pr = push(", mode: pull-request, branch: \"release-${{ params.n }}\"");
    assert_eq!(
        (pr.mode.as_str(), pr.branch.as_str()),
        ("pull-request", "release-2")
    );
    assert_eq!(push(", mode: direct, branch: prod").branch, "prod");
    let err = parse("a.yaml", &yaml(", mode: merge"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.yaml:9:")
            && err.contains("`mode` of")
            && err.contains("must be `direct` or `pull-request`, found `merge`"),
        "{err}"
    );
    let err = parse("a.yaml", &yaml(", brnch: x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("brnch") && err.contains("branch"), "{err}");
}

#[test]
fn approval_gates_and_their_errors() {
    let yaml = |gate: &str| {
        format!(
            "version: 1\nname: a\ntasks:\n  deploy:\n    approval: {gate}\n    steps: [run: x]\n"
        )
    };
    let gate = |g: &str| {
        parse("a.yaml", &yaml(g)).unwrap().tasks[0]
            .approval
            .clone()
            .unwrap()
    };
    let full = gate("{prompt: \"bump it?\", by: [submit, admin], timeout: 10m}");
    assert_eq!(full.prompt, "bump it?");
    assert_eq!(full.by, ["submit", "admin"]);
    assert_eq!(full.timeout, Some(Duration::from_secs(600)));
    let plain = gate("{}");
    assert_eq!(
        (plain.prompt.as_str(), plain.by.as_slice()),
        ("run task `deploy`?", &["admin".to_string()][..])
    );
    assert_eq!(plain.timeout, None);
    one_error(
        &yaml("{by: []}"),
        5,
        20,
        &["no token could approve the task"],
    );
    one_error(
        &yaml("{by: [owner]}"),
        5,
        21,
        &["names scopes: read, submit or admin, found owner"],
    );
    one_error(&yaml("{by: admin}"), 5, 20, &["must be a list of scopes"]);
    one_error(
        &yaml("{timeout: soon}"),
        5,
        25,
        &["`timeout` of `approval` of task `deploy`"],
    );
    one_error(&yaml("{prompt: x, who: y}"), 5, 27, &["unknown key `who`"]);
    // The prompt takes substitutions.
    let p = parse("a.yaml", &yaml("{prompt: \"deploy ${{ git.sha }}?\"}")).unwrap();
    let c = Context {
        git_sha: Some(s("abc")),
        ..Context::default()
    };
    let r = resolve("a.yaml", &p, &c).unwrap();
    assert_eq!(r.tasks[0].approval.as_ref().unwrap().prompt, "deploy abc?");
}

#[test]
fn conditions_and_finally_parse_and_fold() {
    let yaml = |extra: &str| {
        format!(
            "version: 1\nname: a\nparams:\n  env: dev\ntasks:\n  test:\n    steps: [run: x]\n  deploy:\n    needs: [test]\n{extra}    steps: [run: x]\n"
        )
    };
    let p = parse("a.yaml", &yaml("    if: ${{ git.ref == 'refs/heads/main' || tasks.test.state == 'succeeded' }}\n    finally: true\n")).unwrap();
    assert!(p.tasks[1].finally);
    let r = resolve("a.yaml", &p, &Context::default()).unwrap();
    assert_eq!(
        r.tasks[1].condition.as_deref(),
        Some("(tasks.test.state == 'succeeded')")
    );
    one_error(
        &yaml("    if: git.ref = 'x'\n"),
        10,
        9,
        &["`if` of task `deploy` does not parse: unknown operator `=`"],
    );
    one_error(
        &yaml("    if: params.region == 'eu'\n"),
        10,
        9,
        &["no param `region` is declared"],
    );
    one_error(
        &yaml("    if: matrix.db == 'pg'\n"),
        10,
        9,
        &["the task's matrix has no key `db`"],
    );
    one_error(
        &yaml("    if: tasks.other.state == 'failed'\n"),
        10,
        9,
        &["add `other` to its `needs`"],
    );
    one_error(&yaml("    finally: yes\n"), 10, 14, &["`finally`"]);
}

#[test]
fn a_condition_too_complex_once_folded_is_refused_at_submit() {
    let chain: Vec<String> = (0..70)
        .map(|i| format!("tasks.t.state == 's{i}'"))
        .collect();
    let text = format!(
        "version: 1\nname: a\ntasks:\n  t:\n    steps: [run: x]\n  u:\n    needs: [t]\n    if: \"{}\"\n    steps: [run: x]\n",
        chain.join(" || ")
    );
    let p = parse("a.yaml", &text).unwrap();
    let err = resolve("a.yaml", &p, &Context::default()).unwrap_err();
    assert_eq!((err.0[0].line, err.0[0].column), (8, 9), "{err}");
    assert!(
        err.0[0]
            .message
            .contains("too complex once its values are in"),
        "{err}"
    );
}
