//! Logs compressed at rest: once a run has ended, its attempts' logs are
//! sealed into zstd frames (`DATA_DIR/logs/<attempt>.logz`, the plain file
//! removed), read back byte-exact from any offset through the API and the
//! CLI, also after a kill -9 and restart of the coordinator; `/metrics`
//! says the ratio.

use capstan_tests::*;
use std::path::Path;
use std::time::Duration;

async fn wait_sealed(logs: &Path, attempt: &str) -> anyhow::Result<()> {
    let sealed = logs.join(format!("{attempt}.logz"));
    let plain = logs.join(format!("{attempt}.log"));
    for _ in 0..200 {
        if sealed.exists() && !plain.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{} was not sealed in 10 s", plain.display())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_runs_logs_are_compressed_and_read_back_byte_exact() -> anyhow::Result<()> {
    let mut c = TestCluster::builder().runners(1).start().await?;
    let yaml = "version: 1\nname: numbered\ntasks:\n  t:\n    steps: [ { run: 'seq -f \"%08g a numbered line of the build\" 1 80000' } ]\n";
    let id = c.submit(yaml).await?;
    let run = c.wait_done(&id, Duration::from_secs(60)).await?;
    let attempt = task(&run, "t").attempt_id.clone();
    // Read while still plain (the seal waits a moment after the run's end).
    let before = c.task_log(&id, "t").await?;
    assert!(before.len() > 2_500_000, "{} bytes", before.len());

    let logs = c.data_dir().join("logs");
    wait_sealed(&logs, &attempt).await?;
    let on_disk = std::fs::metadata(logs.join(format!("{attempt}.logz")))?.len();
    assert!(
        on_disk * 4 <= before.len() as u64,
        "{on_disk} bytes on disk for {} of log: more than a quarter",
        before.len()
    );
    assert_eq!(
        c.task_log(&id, "t").await?,
        before,
        "the API reads it back byte-exact"
    );
    let (code, text) = c.http_get("/metrics")?;
    assert_eq!(code, 200);
    let ratio = metric(&text, "capstan_log_compression_ratio").expect("the ratio metric");
    assert!(ratio > 0.0 && ratio <= 0.25, "{ratio}");
    assert_eq!(
        metric(&text, "capstan_log_sealed_raw_bytes_total"),
        Some(before.len() as f64)
    );

    // kill -9 and a restart: the next coordinator reads the sealed log.
    c.kill_replica(0);
    c.start_replica(0).await?;
    assert_eq!(c.task_log(&id, "t").await?, before, "after the restart");
    let out = c.cli(&["logs", &id, "--task", "t"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout == before,
        "`capstan logs --task` prints the raw log"
    );
    Ok(())
}
