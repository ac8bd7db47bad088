//! The binary's offline subcommands (`capstan-coordinator token create`,
//! and `health`, the images' health check: see `crate::health`):
//! they open the store the coordinator would use (redb in `--data-dir`, or
//! etcd with `--etcd-endpoints`), act, and exit. This is how the first admin
//! token is made; later ones can be made over the API (`capstan token create`).

use crate::config::{AdminCommand, Args, TokenCommand};
use crate::store::{self, Store};
use crate::tokens::{Scope, Tokens};
use anyhow::Context as _;
use std::sync::Arc;

/// Runs `command` with the store settings of `args` (flags, environment,
/// the TOML file); prints what the user must see on stdout.
pub async fn run(args: Args, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Token(TokenCommand::Create {
            name,
            scope,
            expires,
        }) => create_token(args, name, scope, expires).await,
        AdminCommand::Health => crate::health::run(args.health_target()?).await,
    }
}

async fn create_token(
    args: Args,
    name: String,
    scope: String,
    expires: Option<String>,
) -> anyhow::Result<()> {
    let scope = Scope::parse(&scope)?;
    let expires = expires
        .as_deref()
        .map(capstan_proto::units::parse_age)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    let location = args.store_location()?;
    let store: Arc<dyn Store> = if location.etcd_endpoints.is_empty() {
        std::fs::create_dir_all(&location.data_dir)
            .with_context(|| format!("cannot create data dir {}", location.data_dir.display()))?;
        let redb = store::redb::RedbStore::open_in(&location.data_dir).context(
            "cannot open the coordinator's store (while the coordinator runs, make tokens over \
             the API instead: `capstan token create`)",
        )?;
        Arc::new(redb)
    } else {
        let pool = store::etcd::connect(&location.etcd_endpoints).await?;
        Arc::new(store::etcd::EtcdStore::new(pool, &location.etcd_prefix))
    };
    let tokens = Tokens::new(store);
    let (token, record) = tokens
        .create(&name, scope, expires, crate::model::now_ms())
        .await?;
    let lifetime = match expires {
        Some(_) => format!("expires at {} ms since the epoch", record.expires_at_ms),
        None => "never expires".to_string(),
    };
    eprintln!(
        "created the {scope} token `{name}` ({lifetime}); it is shown only now: keep it secret"
    );
    println!("{token}");
    Ok(())
}
