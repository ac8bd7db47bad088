//! The client API of a [`TestCluster`]: submit runs, read them and their
//! logs, wait for states, run the `capstan` CLI.
//!
//! A standalone cluster is called directly on its one coordinator. A
//! cluster on etcd is called through the leader-following
//! [`capstan_client::Client`] over every replica that answers, so
//! the calls survive a failover (as the CLI does).

use super::TestCluster;
use crate::bins::bin;
use crate::runs::is_finished;
use crate::wait::{eventually, poll_until};
use anyhow::bail;
use capstan_client::Client;
use capstan_proto::api::v1 as api;
use capstan_proto::ids::RunId;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use api::pipeline_service_client::PipelineServiceClient;

impl TestCluster {
    /// How often the waits poll. A replicated cluster's every poll opens a
    /// leader-following client (it asks every replica), so it polls less often.
    fn poll_every(&self) -> Duration {
        if self.etcd.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(50)
        }
    }

    /// A client over every replica that answers; it follows the leader.
    async fn leader_client(&self) -> anyhow::Result<Client> {
        self.client_with(Some(&self.api_token)).await
    }

    /// A channel to `url`, trusting the test CA for `https://`.
    pub async fn channel_to(&self, url: &str) -> anyhow::Result<tonic::transport::Channel> {
        Ok(crate::net::endpoint(url, &self.client_tls())?
            .connect()
            .await?)
    }

    /// The raw pipeline API, with the admin token: on the standalone
    /// coordinator, or on the replica that leads now.
    pub async fn client(
        &self,
    ) -> anyhow::Result<PipelineServiceClient<capstan_client::AuthChannel>> {
        if self.etcd.is_some() {
            return Ok(self.leader_client().await?.pipeline());
        }
        Ok(PipelineServiceClient::new(
            self.admin_channel(&self.url()).await?,
        ))
    }

    /// Runs the `capstan` CLI against this cluster (every replica), with
    /// the admin token (in `CAPSTAN_TOKEN`).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_token(Some(&self.api_token), args)
    }

    /// Runs the `capstan` CLI with `token` (None: no token at all).
    pub fn cli_with_token(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("capstan"));
        cmd.args(["--server", &self.urls().join(",")]);
        if let Some(pki) = self.pki() {
            cmd.arg("--ca-cert").arg(pki.ca_cert());
        }
        cmd.args(args)
            .env_remove("CAPSTAN_TOKEN")
            .env_remove("CAPSTAN_TOKEN_FILE")
            .stdin(Stdio::null());
        if let Some(token) = token {
            cmd.env("CAPSTAN_TOKEN", token);
        }
        cmd.output().expect("run capstan")
    }

    /// Submits a pipeline file's text through the API and returns the run id.
    pub async fn submit(&self, yaml: &str) -> anyhow::Result<String> {
        let request = api::SubmitRunRequest {
            pipeline_yaml: yaml.into(),
            file_name: "test.yaml".into(),
            ..Default::default()
        };
        if self.etcd.is_some() {
            let id = self.leader_client().await?.submit_run(request).await?;
            return Ok(id.to_string());
        }
        let r = self.client().await?.submit_run(request).await?;
        Ok(r.into_inner().run_id)
    }

    pub async fn get_run(&self, id: &str) -> anyhow::Result<api::Run> {
        if self.etcd.is_some() {
            let run = self
                .leader_client()
                .await?
                .get_run(&RunId::from_string(id))
                .await?;
            return Ok(run);
        }
        Ok(self
            .client()
            .await?
            .get_run(api::GetRunRequest { run_id: id.into() })
            .await?
            .into_inner())
    }

    /// Polls until `pred` holds for the run, or fails with the cluster's logs.
    pub async fn wait_run(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&api::Run) -> bool,
    ) -> anyhow::Result<api::Run> {
        let mut last = None;
        let found = poll_until(timeout, self.poll_every(), async || {
            let Ok(run) = self.get_run(id).await else {
                return Ok(None);
            };
            if pred(&run) {
                return Ok(Some(run));
            }
            last = Some(run);
            Ok(None)
        })
        .await?;
        match found {
            Some(run) => Ok(run),
            None => bail!(
                "run {id} did not reach the expected state in {timeout:?}; last: {last:#?}\n{}",
                self.all_logs()
            ),
        }
    }

    /// Waits for the run to end and returns it.
    pub async fn wait_done(&self, id: &str, timeout: Duration) -> anyhow::Result<api::Run> {
        self.wait_run(id, timeout, is_finished).await
    }

    /// The whole log of a task (every attempt), as the API streams it.
    pub async fn task_log(&self, run: &str, task: &str) -> anyhow::Result<Vec<u8>> {
        let mut stream = if self.etcd.is_some() {
            self.leader_client()
                .await?
                .read_logs(&RunId::from_string(run), Some(task), false)
                .await?
        } else {
            self.client()
                .await?
                .read_logs(api::ReadLogsRequest {
                    run_id: run.into(),
                    task: task.into(),
                    follow: false,
                })
                .await?
                .into_inner()
        };
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// How many runners the coordinators say are connected.
    async fn connected_runners(&self) -> anyhow::Result<usize> {
        let runners = if self.etcd.is_some() {
            self.leader_client().await?.list_runners().await?
        } else {
            self.client()
                .await?
                .list_runners(api::ListRunnersRequest {})
                .await?
                .into_inner()
                .runners
        };
        Ok(runners.iter().filter(|r| r.connected).count())
    }

    /// Waits until at least `n` runners are connected.
    pub async fn wait_runners_connected(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        eventually(
            timeout,
            Duration::from_millis(50),
            async || {
                Ok(self
                    .connected_runners()
                    .await
                    .is_ok_and(|connected| connected >= n)
                    .then_some(()))
            },
            || {
                format!(
                    "{n} runners did not connect in {timeout:?}\n{}",
                    self.all_logs()
                )
            },
        )
        .await
    }
}
