//! Issue 18, resource bounds: every `--max-*` limit of the coordinator
//! refuses with its own message, a refused submit does not keep memory,
//! and a log past `--max-task-log` is cut without holding the task up.

use capstan_proto::api::v1::SubmitRunRequest;
use capstan_proto::pipeline::v1::RunState;
use capstan_tests::*;
use std::time::Duration;

/// The coordinator's resident memory, from /proc.
fn vm_rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The case, smaller (the was 918 KB; each parse takes
/// seconds in a debug build): 36,000 one-key steps, each wrong.
fn bad_pipeline() -> String {
    let mut yaml = String::from("version: 1\nname: big\ntasks:\n  t:\n    steps:\n");
    for _ in 0..36_000 {
        yaml.push_str("      - bogus: x\n");
    }
    yaml
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_submits_do_not_keep_memory() -> anyhow::Result<()> {
    let c = TestCluster::builder().runners(0).start().await?;
    let pid = c.replicas[0].pid().unwrap();
    let yaml = bad_pipeline();
    assert!(yaml.len() > 600_000, "{}", yaml.len());
    let submit = || async {
        c.client()
            .await
            .unwrap()
            .submit_run(SubmitRunRequest {
                pipeline_yaml: yaml.clone(),
                file_name: "big.yaml".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
    };
    let first = submit().await;
    assert_eq!(first.code(), tonic::Code::InvalidArgument);
    // Whole problems up to 8 KiB, then how many more: a status is a header.
    assert!(
        first.message().len() <= 8 * 1024,
        "{}",
        first.message().len()
    );
    assert!(
        first
            .message()
            .starts_with("big.yaml:6:9: unknown key `bogus` in step 1 of task `t`; allowed keys: "),
        "{}",
        &first.message()[..200]
    );
    assert!(
        first
            .message()
            .ends_with(" more problems (`capstan validate FILE` lists them all)"),
        "{}",
        first.message()
    );
    let after_one = vm_rss_kb(pid);
    for _ in 0..4 {
        assert_eq!(submit().await.code(), tonic::Code::InvalidArgument);
    }
    let after_five = vm_rss_kb(pid);
    // Before: each one could keep ~20 MB more (one malloc arena after
    // another, as the runtime's workers took turns).
    assert!(
        after_five < after_one + 8 * 1024,
        "RSS grew from {after_one} kB to {after_five} kB over 4 more rejected submits"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_limit_has_a_flag_and_its_own_error() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .runners(0)
        .coordinator_args(&[
            "--max-pipeline",
            "2k",
            "--max-tasks",
            "2",
            "--max-params",
            "1",
            "--max-param-value",
            "8",
            "--max-request",
            "64k",
        ])
        .start()
        .await?;
    let c = &c;
    let submit = |yaml: String, params: &[(&str, &str)]| {
        let params = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        async move {
            c.client()
                .await
                .unwrap()
                .submit_run(SubmitRunRequest {
                    pipeline_yaml: yaml,
                    file_name: "p.yaml".into(),
                    params,
                    ..Default::default()
                })
                .await
        }
    };
    let tasks = |n: usize, pad: usize| {
        let mut y = String::from("version: 1\nname: p\nparams: { a: x, b: y }\ntasks:\n");
        for i in 0..n {
            y.push_str(&format!("  t{i}:\n    steps: [ {{ run: echo }} ]\n"));
        }
        y.push_str(&"#".repeat(pad));
        y.push('\n');
        y
    };
    let message = |r: Result<tonic::Response<_>, tonic::Status>| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        e.message().to_owned()
    };
    assert_eq!(
        message(submit(tasks(1, 3000), &[]).await),
        format!(
            "the pipeline file is {} bytes; the limit is 2048 (--max-pipeline on the coordinator)",
            tasks(1, 3000).len()
        )
    );
    assert_eq!(
        message(submit(tasks(3, 0), &[]).await),
        "p.yaml has 3 tasks; the limit is 2 (--max-tasks on the coordinator)"
    );
    assert_eq!(
        message(submit(tasks(1, 0), &[("a", "1"), ("b", "2")]).await),
        "2 params given; the limit is 1 (--max-params on the coordinator)"
    );
    assert_eq!(
        message(submit(tasks(1, 0), &[("a", "123456789")]).await),
        "the value of param `a` is 9 bytes; the limit is 8 (--max-param-value on the coordinator)"
    );
    let big = submit(tasks(1, 70 * 1024), &[]).await.unwrap_err();
    assert_eq!(big.code(), tonic::Code::OutOfRange, "{big:?}");
    assert!(
        big.message().contains("message length too large"),
        "{big:?}"
    );
    assert!(submit(tasks(2, 0), &[("a", "12345678")]).await.is_ok());

    // A bad value of a flag stops the coordinator at start, naming it.
    let out = std::process::Command::new(bin("capstan-coordinator"))
        .args(["--registration-token", "t", "--max-pipeline", "2m"])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        stderr.contains("--max-pipeline may be at most 1m (1048576 bytes), the parser's own limit"),
        "{stderr}"
    );
    let out = std::process::Command::new(bin("capstan-coordinator"))
        .args(["--registration-token", "t", "--max-request", "lots"])
        .output()?;
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        stderr.contains("bad --max-request `lots`: use a size such as `512k`, `4m` or `1g`"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_over_the_task_limit_is_cut_and_the_task_still_ends() -> anyhow::Result<()> {
    let c = TestCluster::builder()
        .coordinator_args(&["--max-task-log", "64k"])
        .start()
        .await?;
    let id = c
        .submit(
            "version: 1\nname: loud\ntasks:\n  t:\n    steps:\n      - run: head -c 1000000 /dev/zero | tr '\\0' x\n",
        )
        .await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}");
    let log = c.task_log(&id, "t").await?;
    assert!(log.len() <= 64 * 1024, "{} bytes stored", log.len());
    assert!(
        c.process_log("runner-0")
            .contains("(--max-task-log on the coordinator): the rest is not stored"),
        "{}",
        c.process_log("runner-0")
    );
    Ok(())
}
