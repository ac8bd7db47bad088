//! Store commit cost: the redb store the coordinator uses, in this process
//! (`capstan_coordinator::store::redb::RedbStore`, fsync on every commit),
//! timed per `apply` of a batch of B records of 1 KiB (about one single-task
//! run record). The scheduler commits one batch per loop turn, so this is the
//! floor under each turn, and how throughput scales with batching.

use super::{Ctx, Figures, cores};
use capstan_coordinator::store::redb::RedbStore;
use capstan_coordinator::store::{Op, Store};
use std::time::Instant;

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Figures> {
    std::fs::create_dir_all(&ctx.dir)?;
    let store = RedbStore::open(&ctx.dir.join("state.redb"))?;
    let value = vec![b'x'; 1024];
    let mut out = Figures::new();
    let mut line = Vec::new();
    for batch in [1usize, 10, 100, 1000] {
        let commits = if ctx.quick { 20 } else { 200 }.min(20_000 / batch).max(5);
        let start = Instant::now();
        for c in 0..commits {
            let ops = (0..batch)
                .map(|i| Op::Put {
                    key: format!("runs/bench-{:06}", (c * batch + i) % 10_000),
                    value: value.clone(),
                })
                .collect();
            store.apply(ops).await?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / commits as f64;
        line.push(format!(
            "batch {batch}: {ms:.2} ms/commit ({:.0} records/s)",
            batch as f64 / ms * 1e3
        ));
        out.push((format!("store_redb_commit_ms_batch_{batch}"), ms));
    }
    println!(
        "store commit (redb, fsync per commit, 1 KiB records), {} cores: {}",
        cores(),
        line.join("; ")
    );
    Ok(out)
}
