//! Black-box tests of the `capstan` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `capstan ARGS` run from the crate dir, with no CAPSTAN_* from the caller.
fn capstan(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capstan"));
    cmd.args(args)
        .current_dir(manifest_dir())
        .env_remove("CAPSTAN_SERVER")
        .env_remove("CAPSTAN_OUTPUT")
        .env_remove("CAPSTAN_REPO")
        .env_remove("CAPSTAN_REV")
        .env_remove("CAPSTAN_EXECUTOR")
        .env_remove("CAPSTAN_PRIORITY")
        .env_remove("CAPSTAN_TOKEN")
        .env_remove("CAPSTAN_TOKEN_FILE")
        .env_remove("RUST_LOG");
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run capstan");
    (
        status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A loopback address nobody listens on.
fn dead_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("capstan-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn validate_accepts_a_good_file() {
    let (code, out, err) = run(&mut capstan(&["validate", "tests/fixtures/good.yaml"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "tests/fixtures/good.yaml: ok (2 tasks)\n");
}

#[test]
fn validate_names_file_line_and_column_of_every_error() {
    let (code, out, err) = run(&mut capstan(&["validate", "tests/fixtures/bad.yaml"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with("tests/fixtures/bad.yaml:4:3: "),
        "{err}"
    );
    assert!(
        lines[1].starts_with("tests/fixtures/bad.yaml:5:5: "),
        "{err}"
    );
    assert!(lines[1].contains("stpes"), "{err}");
    assert!(
        lines[2].starts_with("tests/fixtures/bad.yaml:8:13: "),
        "{err}"
    );
    assert!(lines[2].contains("nope"), "{err}");
}

#[test]
fn validate_json_lists_errors() {
    let (code, out, err) = run(&mut capstan(&[
        "validate",
        "tests/fixtures/bad.yaml",
        "-o",
        "json",
    ]));
    assert_eq!(code, 2, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][1]["line"], 5);
    assert_eq!(v["errors"][1]["column"], 5);
    assert_eq!(v["errors"][1]["file"], "tests/fixtures/bad.yaml");
}

#[test]
fn validate_missing_file_says_so() {
    let (code, _, err) = run(&mut capstan(&["validate", "tests/fixtures/absent.yaml"]));
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: cannot read tests/fixtures/absent.yaml: "),
        "{err}"
    );
}

#[test]
fn submit_to_an_unreachable_server_exits_3() {
    let server = dead_server();
    let (code, out, err) = run(&mut capstan(&[
        "--server",
        &server,
        "submit",
        "tests/fixtures/good.yaml",
    ]));
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the coordinator at http://{server}: "
        )),
        "{err}"
    );
    assert!(
        err.contains("is it running? set --server or CAPSTAN_SERVER"),
        "{err}"
    );
}

#[test]
fn server_comes_from_the_environment_too() {
    let a = dead_server();
    let b = dead_server();
    let (code, _, err) = run(capstan(&["runs"]).env("CAPSTAN_SERVER", format!("{a},http://{b}")));
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!("coordinator at http://{a},http://{b}: ")),
        "{err}"
    );
}

#[test]
fn submit_refuses_files_over_1_mib_before_connecting() {
    let dir = scratch("big");
    let big = dir.join("big.yaml");
    let mut text = String::from("version: 1\nname: big\ntasks:\n");
    while text.len() <= 1024 * 1024 {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, text).unwrap();
    // A dead server: the file must be refused before any connection attempt.
    let (code, _, err) = run(&mut capstan(&[
        "--server",
        &dead_server(),
        "submit",
        big.to_str().unwrap(),
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("larger than 1 MiB"), "{err}");
}

#[test]
fn output_flag_is_checked_and_read_from_the_environment() {
    let (code, _, err) = run(&mut capstan(&["-o", "yaml", "validate", "x.yaml"]));
    assert_eq!(code, 2);
    assert!(err.contains("possible values: text, json"), "{err}");

    // After the subcommand, and from CAPSTAN_OUTPUT.
    for cmd in [
        capstan(&["validate", "tests/fixtures/good.yaml", "--output", "json"]),
        {
            let mut c = capstan(&["validate", "tests/fixtures/good.yaml"]);
            c.env("CAPSTAN_OUTPUT", "json");
            c
        },
    ] {
        let mut cmd = cmd;
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["tasks"], serde_json::json!(["build", "test"]));
    }
}

#[test]
fn bad_param_is_a_usage_error() {
    let (code, _, err) = run(&mut capstan(&[
        "submit",
        "tests/fixtures/good.yaml",
        "--param",
        "novalue",
    ]));
    assert_eq!(code, 2);
    assert!(err.contains("expected KEY=VALUE"), "{err}");
}

#[test]
fn dev_runs_the_hello_example() {
    let (code, out, err) =
        run(capstan(&["dev", "examples/hello.yaml"]).current_dir(manifest_dir().parent().unwrap()));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("[hello] hello from capstan\n"), "{out}");
    assert!(out.contains("[goodbye] goodbye, world\n"), "{out}");
    assert!(err.contains("✔ hello succeeded"), "{err}");
    assert!(err.contains(" succeeded in "), "{err}");
}

#[test]
fn dev_passes_params_and_exits_1_on_a_failed_run() {
    let (code, out, err) =
        run(
            capstan(&["dev", "examples/hello.yaml", "--param", "greeting=howdy"])
                .current_dir(manifest_dir().parent().unwrap()),
        );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[hello] howdy from capstan\n"), "{out}");

    let (code, out, err) = run(&mut capstan(&["dev", "tests/fixtures/fails.yaml"]));
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("[build] about to fail\n"), "{out}");
    assert!(err.contains("✘ build failed"), "{err}");
    assert!(err.contains("⊘ deploy skipped"), "{err}");
    assert!(err.contains(" failed in "), "{err}");
}

#[test]
fn dev_json_ends_with_the_run() {
    let (code, out, err) = run(&mut capstan(&[
        "-o",
        "json",
        "dev",
        "tests/fixtures/good.yaml",
    ]));
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "submitted");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "run");
    assert_eq!(last["state"], "succeeded");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "log" && e["task"] == "test" && e["line"] == "testing"),
        "{out}"
    );
}

#[test]
fn dev_rejects_a_bad_file_before_starting() {
    let (code, _, err) = run(&mut capstan(&["dev", "tests/fixtures/bad.yaml"]));
    assert_eq!(code, 2);
    assert!(err.starts_with("tests/fixtures/bad.yaml:4:3: "), "{err}");
}
