//! The runner processes of a [`TestCluster`]: every runner knows every
//! replica's URL, carries the builder's labels plus `index=<i>`, and works
//! under `<dir>/work-<name>`.

use super::TestCluster;
use super::replicas::set_env;
use crate::bins::bin;
use crate::process::Proc;
use std::process::Command;

impl TestCluster {
    /// Spawns a runner process named `name` (its work dir is under the cluster's dir).
    pub fn start_runner(&mut self, name: &str) -> anyhow::Result<()> {
        let cmd = self.runner_command(name, &self.token.clone());
        self.runners.push(Proc::spawn(cmd, self.dir(), name)?);
        Ok(())
    }

    /// The command that starts a runner, for tests that want to change it
    /// (its output goes where the test says; [`TestCluster::start_runner`]
    /// sends it to `<name>.log`).
    pub fn runner_command(&self, name: &str, token: &str) -> Command {
        self.runner_command_to(name, token, &self.urls())
    }

    /// Spawns a runner named `name` that knows the coordinators only as
    /// `urls` (e.g. fault proxies in front of them, `crate::faults`).
    pub fn start_runner_via(&mut self, name: &str, urls: &[String]) -> anyhow::Result<()> {
        let cmd = self.runner_command_to(name, &self.token.clone(), urls);
        self.runners.push(Proc::spawn(cmd, self.dir(), name)?);
        Ok(())
    }

    /// [`TestCluster::runner_command`] with the coordinator URLs `urls`.
    pub fn runner_command_to(&self, name: &str, token: &str, urls: &[String]) -> Command {
        let index = self.runners.len();
        let mut labels = self.opts.labels.clone();
        labels.push(format!("index={index}"));
        let mut cmd = Command::new(bin("capstan-runner"));
        // Nothing a test runs may pull from outside this machine: a test
        // that pulls (from the test bed's registry) says so with a flag,
        // which beats this.
        cmd.env("CAPSTAN_DOCKER_PULL", "never");
        set_env(&mut cmd, &self.opts.env);
        cmd.args(["--coordinator", &urls.join(",")])
            .args(["--registration-token", token])
            .args(["--name", name])
            .args(["--labels", &labels.join(",")])
            .args(["--capacity", &self.opts.capacity.to_string()])
            .args(["--executor", &self.opts.executor])
            .arg("--work-dir")
            .arg(self.dir().join(format!("work-{name}")));
        if let Some(pki) = self.pki() {
            cmd.arg("--ca-cert").arg(pki.ca_cert());
            if self.opts.mtls {
                let files = pki
                    .client(&format!("runner-{name}"), name)
                    .expect("issue a runner's client certificate");
                cmd.arg("--tls-client-cert")
                    .arg(files.cert)
                    .arg("--tls-client-key")
                    .arg(files.key);
            }
        }
        cmd.args(&self.opts.runner_args).env("RUST_LOG", "info");
        cmd
    }

    /// kill -9 of the runner named `name`.
    pub fn kill_runner(&mut self, name: &str) {
        if let Some(pos) = self.runners.iter().position(|r| r.name() == name) {
            // Dropping the process kills and reaps it.
            self.runners.remove(pos);
        }
    }

    /// Sends SIGTERM to the runner named `name` and returns its process
    /// (wait on it with [`crate::wait_exit`]; dropping it kills it).
    pub fn terminate_runner(&mut self, name: &str) -> Option<Proc> {
        let pos = self.runners.iter().position(|r| r.name() == name)?;
        let r = self.runners.remove(pos);
        r.signal(nix::sys::signal::Signal::SIGTERM);
        Some(r)
    }
}
