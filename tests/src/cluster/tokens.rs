//! The API tokens of a [`TestCluster`]: the admin token it bootstraps at
//! start (offline, with `capstan-coordinator token create`, the way a user
//! makes the first one), tokens of other scopes for tests, and authenticated
//! channels.

use super::TestCluster;
use crate::bins::bin;
use anyhow::{Context as _, bail};
use capstan_client::{AuthChannel, Bearer};
use std::process::{Command, Stdio};

/// The name of the admin token every cluster starts with.
pub const ADMIN_TOKEN_NAME: &str = "harness-admin";

impl TestCluster {
    /// `capstan-coordinator token create` against the store the
    /// coordinators use (the standalone one's data dir, or etcd), with the
    /// coordinators' flags: the token it prints. A standalone coordinator
    /// must be stopped (its redb file is locked while it runs).
    pub fn create_token_offline(
        &self,
        name: &str,
        scope: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let mut cmd = Command::new(bin("capstan-coordinator"));
        cmd.args(["token", "create", "--name", name, "--scope", scope])
            .args(extra)
            .stdin(Stdio::null());
        match &self.etcd {
            Some(etcd) => cmd.args(["--etcd-endpoints", &etcd.endpoints().join(",")]),
            None => cmd.arg("--data-dir").arg(self.data_dir()),
        };
        let out = cmd
            .output()
            .context("run capstan-coordinator token create")?;
        if !out.status.success() {
            bail!(
                "token create failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8(out.stdout)?.trim().to_string();
        if !token.starts_with("capstan_") {
            bail!("token create printed `{token}`, not a token");
        }
        Ok(token)
    }

    /// A token of `scope` named `name`, made over the API with the admin token.
    pub async fn create_token(&self, name: &str, scope: &str) -> anyhow::Result<String> {
        let scope = match scope {
            "read" => capstan_proto::api::v1::TokenScope::Read,
            "submit" => capstan_proto::api::v1::TokenScope::Submit,
            "admin" => capstan_proto::api::v1::TokenScope::Admin,
            other => bail!("no scope `{other}`"),
        };
        let made = self
            .client_with(Some(&self.api_token.clone()))
            .await?
            .create_token(name, scope, None)
            .await?;
        Ok(made.token)
    }

    /// A leader-following client over every replica that answers, with `token`.
    pub async fn client_with(&self, token: Option<&str>) -> anyhow::Result<capstan_client::Client> {
        let urls: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.answers())
            .map(super::Replica::url)
            .collect();
        let options = capstan_client::ClientOptions {
            tls: self.client_tls(),
            token: Bearer::new(token)?,
            ..Default::default()
        };
        Ok(capstan_client::Client::connect_with(&urls, options).await?)
    }

    /// A channel to `url` (trusting the test CA for `https://`) carrying
    /// `token` (none: no `authorization`).
    pub async fn channel_with(
        &self,
        url: &str,
        token: Option<&str>,
    ) -> anyhow::Result<AuthChannel> {
        let channel = self.channel_to(url).await?;
        Ok(capstan_client::auth::authed(channel, Bearer::new(token)?))
    }

    /// A channel to `url` with the cluster's admin token.
    pub async fn admin_channel(&self, url: &str) -> anyhow::Result<AuthChannel> {
        self.channel_with(url, Some(&self.api_token)).await
    }
}
