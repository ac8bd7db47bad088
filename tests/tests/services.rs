//! Service containers (`services:`) end to end on the docker executor: the
//! real binaries and the real Docker Engine of `scripts/testbed up`. A
//! service is reachable by its name from a step, sits only on the task's
//! internal network, logs into its own section of the task's log, and is
//! gone with the task; a service that never gets ready, or dies first,
//! fails its task as an infrastructure error naming it.

use capstan_proto::pipeline::v1::{RunState, TaskState};
use capstan_tests::testbed::{Cleanup, testbed};
use capstan_tests::*;
use std::process::Command;
use std::time::Duration;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_is_reachable_by_name_logs_apart_and_is_gone_afterwards() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("services");
    let label = cleanup.label();
    let c = TestCluster::builder()
        .executor("docker")
        .runner_args(&["--docker-labels", &label])
        .start()
        .await?;
    let yaml = format!(
        r#"
version: 1
name: services
tasks:
  it:
    image: {image}
    services:
      web:
        image: {image}
        command: ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && echo web-starting && exec httpd -f -vv -p 8080 -h /www"]
        env: {{ GREETING: hi }}
        ready: "wget -q -O /dev/null http://127.0.0.1:8080/"
        ready-timeout: 20s
    steps:
      - run: |
          timeout 5 wget -q -O - http://web:8080/
          touch /workspace/.fetched
          sleep 3
"#,
        image = tb.image
    );
    let id = c.submit(&yaml).await?;
    // While the step sleeps: the service sits on one network, the task's,
    // which has no route out.
    let service_filter = format!("label={label}");
    let mut service = String::new();
    for _ in 0..300 {
        service = docker(&[
            "ps",
            "-q",
            "--filter",
            &service_filter,
            "--filter",
            "label=capstan.service=web",
        ]);
        if !service.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !service.is_empty(),
        "no service container ran\n{}",
        c.all_logs()
    );
    let networks = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        &service,
    ]);
    let networks: Vec<&str> = networks.split_whitespace().collect();
    assert_eq!(networks.len(), 1, "{networks:?}");
    let attempt = c
        .get_run(&id)
        .await?
        .tasks
        .into_iter()
        .find(|t| t.name == "it")
        .map(|t| t.attempt_id)
        .unwrap_or_default();
    assert_eq!(
        networks[0],
        format!("capstan-{attempt}"),
        "the task's own network"
    );
    assert_eq!(
        docker(&["network", "inspect", "-f", "{{.Internal}}", networks[0]]),
        "true"
    );
    let env = docker(&["inspect", "-f", "{{json .Config.Env}}", &service]);
    assert!(env.contains("GREETING=hi"), "{env}");

    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = String::from_utf8(c.task_log(&id, "it").await?)?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    let section = log
        .find("--- service web (")
        .unwrap_or_else(|| panic!("no service section in\n{log}"));
    assert!(
        log[..section].contains("hello-from-web"),
        "the step reached web by name:\n{log}"
    );
    assert!(
        log[section..].contains("web-starting"),
        "the service's own output is in its section:\n{log}"
    );
    assert!(
        !log[..section].contains("web-starting"),
        "the service's output stays out of the step's:\n{log}"
    );
    assert!(
        log[section..].contains(&format!("image {} is ", tb.image)),
        "how its image was got:\n{log}"
    );
    cleanup
        .wait(
            "service, network and volume removed",
            Duration::from_secs(10),
            |c| c.leftovers().is_empty(),
        )
        .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_never_gets_ready_or_dies_fails_its_task_as_infrastructure()
-> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("services-bad");
    let label = cleanup.label();
    let c = TestCluster::builder()
        .executor("docker")
        .coordinator_args(&["--max-infra-retries", "0"])
        .capacity(2)
        .runner_args(&["--docker-labels", &label])
        .start()
        .await?;
    let yaml = format!(
        r#"
version: 1
name: services-bad
tasks:
  slow:
    image: {image}
    services:
      db:
        image: {image}
        command: ["sh", "-c", "echo db-booting; exec sleep 60"]
        ready: "echo probe says $((6*7)); false"
        ready-timeout: 2s
    steps: [ {{ run: "echo step-ran" }} ]
  dies:
    image: {image}
    services:
      cache:
        image: {image}
        command: ["sh", "-c", "echo cache-crashing; exit 3"]
        ready: "true"
    steps: [ {{ run: "echo step-ran" }} ]
"#,
        image = tb.image
    );
    let id = c.submit(&yaml).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    assert_eq!(run_state(&run), RunState::Failed, "{run:#?}");
    let slow = task(&run, "slow");
    assert_eq!(task_state(&run, "slow"), TaskState::Failed, "{run:#?}");
    assert!(
        slow.message
            .contains("service `db` was not ready within 2s")
            && slow.message.contains("last exited 1")
            && slow.message.contains("infrastructure"),
        "{}",
        slow.message
    );
    let dies = task(&run, "dies");
    assert!(
        dies.message
            .contains("service `cache` exited with code 3 before it was ready")
            && dies.message.contains("infrastructure"),
        "{}",
        dies.message
    );
    assert!(
        !slow.message.contains("probe says 42") && !dies.message.contains("cache-crashing"),
        "what a service prints stays in the (masked) log, out of the messages"
    );
    for name in ["slow", "dies"] {
        let log = String::from_utf8(c.task_log(&id, name).await?)?;
        assert!(
            !log.contains("step-ran"),
            "no step runs without its services:\n{log}"
        );
    }
    let log = String::from_utf8(c.task_log(&id, "slow").await?)?;
    assert!(
        log.contains("--- service db (")
            && log.contains("db-booting")
            && log.contains("`ready` last exited 1: probe says 42"),
        "a failed setup still logs its services, and the last probe:\n{log}"
    );
    let log = String::from_utf8(c.task_log(&id, "dies").await?)?;
    assert!(
        log.contains("--- service cache (") && log.contains("cache-crashing"),
        "{log}"
    );
    cleanup
        .wait("nothing left", Duration::from_secs(10), |c| {
            c.leftovers().is_empty()
        })
        .await;

    // A cancel while a service is probed ends the wait at once: cancelled,
    // not an infrastructure failure, and nothing left.
    let waiting = yaml
        .replace("ready-timeout: 2s", "ready-timeout: 120s")
        .split("  dies:")
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        waiting.contains("  slow:") && !waiting.contains("cache"),
        "{waiting}"
    );
    let id = c.submit(&waiting).await?;
    cleanup
        .wait("service probed", Duration::from_secs(30), |c| {
            !c.running().is_empty()
        })
        .await;
    let out = c.cli(&["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    let cancelled = std::time::Instant::now();
    let run = c.wait_done(&id, Duration::from_secs(15)).await?;
    eprintln!("cancel -> run done: {:?}", cancelled.elapsed());
    assert_eq!(task_state(&run, "slow"), TaskState::Cancelled, "{run:#?}");
    assert!(
        cancelled.elapsed() < Duration::from_secs(10),
        "the probe wait ended on the cancel"
    );
    cleanup
        .wait(
            "nothing left after the cancel",
            Duration::from_secs(10),
            |c| c.leftovers().is_empty(),
        )
        .await;
    Ok(())
}

/// With `--docker-network NAME` the steps stay on the operator's network
/// and join the task's network too, where the service is; the service is
/// only on the task's.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_named_network_steps_join_the_tasks_network_for_its_services() -> anyhow::Result<()> {
    let tb = testbed();
    let cleanup = Cleanup::new("services-named");
    let label = cleanup.label();
    let network = format!("capstan-e2e-named-{}", std::process::id());
    let made = Command::new("docker")
        .args([
            "network",
            "create",
            "--internal",
            "--label",
            &label,
            &network,
        ])
        .output()?;
    assert!(made.status.success(), "{made:?}");
    let c = TestCluster::builder()
        .executor("docker")
        .runner_args(&["--docker-labels", &label, "--docker-network", &network])
        .start()
        .await?;
    let yaml = format!(
        r#"
version: 1
name: services-named
tasks:
  it:
    image: {image}
    services:
      web:
        image: {image}
        command: ["sh", "-c", "mkdir -p /www && echo hello-over-two-networks > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ready: "wget -q -O /dev/null http://127.0.0.1:8080/"
    steps:
      - run: |
          timeout 5 wget -q -O - http://web:8080/
          ls /sys/class/net | grep -v '^lo$' | wc -l | sed 's/^/interfaces=/'
"#,
        image = tb.image
    );
    let id = c.submit(&yaml).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let log = String::from_utf8(c.task_log(&id, "it").await?)?;
    assert_eq!(run_state(&run), RunState::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("hello-over-two-networks"), "{log}");
    assert!(
        log.contains("interfaces=2"),
        "the named network and the task's:\n{log}"
    );
    cleanup
        .wait("the task's objects removed", Duration::from_secs(10), |c| {
            // The operator's network is the test's own; it stays until the
            // cleanup drops it.
            c.list(&["ps", "-a"]).is_empty() && c.list(&["volume", "ls"]).is_empty()
        })
        .await;
    let networks = cleanup.list(&["network", "ls"]);
    assert_eq!(
        networks.split_whitespace().count(),
        1,
        "only the operator's network is left: {networks}"
    );
    Ok(())
}
