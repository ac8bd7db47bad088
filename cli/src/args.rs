//! The command line, as fixed in DESIGN.md ("Command line").

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::output::Format;

/// Submit pipelines to a Capstan coordinator and watch them run.
#[derive(Debug, Parser)]
#[command(name = "capstan", version, about, propagate_version = true)]
pub struct Cli {
    /// Coordinator gRPC URL(s), comma-separated; the client finds the leader.
    #[arg(
        long,
        global = true,
        env = "CAPSTAN_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7700",
        value_name = "URL[,URL]"
    )]
    pub(crate) server: Vec<String>,

    /// CA certificate (PEM) that signed the coordinator's certificate, for
    /// `https://` servers [default: the system's roots].
    #[arg(long, global = true, env = "CAPSTAN_CA_CERT", value_name = "PEM")]
    pub(crate) ca_cert: Option<PathBuf>,

    /// Output format.
    #[arg(
        short = 'o',
        long,
        global = true,
        env = "CAPSTAN_OUTPUT",
        value_enum,
        default_value_t = Format::Text
    )]
    pub(crate) output: Format,

    /// API token sent on every call (`capstan_...`).
    #[arg(
        long,
        global = true,
        env = "CAPSTAN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    pub(crate) token: Option<String>,

    /// File holding the API token (instead of --token).
    #[arg(long, global = true, env = "CAPSTAN_TOKEN_FILE", value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Queue a run of a pipeline file; prints the run id.
    Submit(SubmitArgs),
    /// Show a run and its tasks.
    Status {
        /// Run id.
        run: String,
    },
    /// List runs, newest first, a page at a time.
    Runs(RunsArgs),
    /// Print a run's logs.
    Logs {
        /// Run id.
        run: String,
        /// Only this task's log, raw.
        #[arg(long)]
        task: Option<String>,
        /// Keep printing until the tasks end.
        #[arg(short, long)]
        follow: bool,
    },
    /// Approve a task waiting at its `approval:` gate; it is queued.
    Approve {
        /// Run id.
        run: String,
        /// The task (quote a matrix task's name).
        task: String,
        /// Why, shown with the decision.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Reject a task waiting at its `approval:` gate; it fails and what
    /// needs it is skipped.
    Reject {
        /// Run id.
        run: String,
        /// The task.
        task: String,
        /// Why, shown with the decision.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Cancel every unfinished task of a run.
    Cancel {
        /// Run id.
        run: String,
    },
    /// List registered runners.
    Runners,
    /// Let a runner finish its work and take no more.
    Drain {
        /// Runner id or name.
        runner: String,
    },
    /// Undo `drain`: the runner takes work again (once restarted, if it
    /// already drained and exited).
    Resume {
        /// Runner id or name.
        runner: String,
    },
    /// Show the coordinator cluster: leader, epoch, members.
    Cluster,
    /// Check a pipeline file locally, without a coordinator.
    Validate {
        /// Pipeline file.
        file: PathBuf,
    },
    /// Run a pipeline on an embedded coordinator and runner, in this process.
    Dev(DevArgs),
    /// Manage API tokens (needs an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Single-use runner registration tokens (needs an admin token).
    #[command(subcommand, name = "runner-token")]
    RunnerToken(RunnerTokenCommand),
    /// Repositories whose pushes start runs (needs an admin token).
    #[command(subcommand)]
    Repo(RepoCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunnerTokenCommand {
    /// Make a token that registers exactly one ephemeral runner (one task,
    /// then it leaves) with these labels, and print it, once.
    Create {
        /// Required: the only runner tokens are single-use ones.
        #[arg(long)]
        ephemeral: bool,
        /// The runner's labels (its own --labels are ignored).
        #[arg(long, value_name = "k=v,k=v", value_parser = capstan_proto::labels::parse, default_value = "")]
        labels: std::collections::BTreeMap<String, String>,
        /// How long it waits for its runner, e.g. `10m` (at most 7 days).
        #[arg(long, value_name = "DURATION", value_parser = capstan_proto::units::parse_age, default_value = "10m")]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum RepoCommand {
    /// Register a repository; prints its webhook secret, once, as the last word.
    Add(RepoAdd),
    /// List the repositories (never a secret).
    List,
    /// Forget a repository: its webhooks are refused from then on.
    Remove {
        /// Repository name.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct RepoAdd {
    /// Unique name.
    pub(crate) name: String,
    /// What git fetches (https, ssh, git, file); `https://user:token@...`
    /// gives the coordinator a fetch login, kept sealed.
    #[arg(long)]
    pub(crate) url: String,
    /// The pipeline file's path in the repository.
    #[arg(long, default_value = ".capstan.yaml")]
    pub(crate) pipeline: String,
    /// Branches whose pushes start runs, comma-separated globs
    /// (`main,release/*`) [default: every branch].
    #[arg(long, value_delimiter = ',')]
    pub(crate) branches: Vec<String>,
    /// The forge to post commit statuses to.
    #[arg(long, value_enum, requires_all = ["api_url", "status_token"])]
    pub(crate) forge: Option<ForgeKind>,
    /// The forge's API base (`https://api.github.com`, `https://gitea.example.com`).
    #[arg(long, value_name = "URL")]
    pub(crate) api_url: Option<String>,
    /// The token the forge's status API takes (kept sealed, never shown).
    #[arg(
        long,
        env = "CAPSTAN_STATUS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) status_token: Option<String>,
    /// A cron schedule (`0 3 * * *`) that runs the first branch's head; repeatable.
    #[arg(long = "schedule", value_name = "CRON")]
    pub(crate) schedules: Vec<String>,
}

/// `capstan runs`: which runs, and which page.
#[derive(Debug, clap::Args)]
pub(crate) struct RunsArgs {
    /// At most this many (at most 1000).
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
    /// Only runs in this state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<RunStateArg>,
    /// Only runs of this pipeline.
    #[arg(long)]
    pub(crate) pipeline: Option<String>,
    /// Only runs submitted with the API token of this name.
    #[arg(long)]
    pub(crate) submitter: Option<String>,
    /// Only runs of this repository.
    #[arg(long)]
    pub(crate) repo: Option<String>,
    /// Only runs of this commit (or a prefix of at least 4 characters).
    #[arg(long)]
    pub(crate) commit: Option<String>,
    /// Only runs created within this long before now: 30m, 2h, 7d.
    #[arg(long, value_parser = capstan_proto::units::parse_age)]
    pub(crate) since: Option<std::time::Duration>,
    /// The next page: the cursor the previous page printed.
    #[arg(long)]
    pub(crate) cursor: Option<String>,
}

/// A run's state, as `capstan runs --state` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RunStateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A forge whose status API Capstan speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ForgeKind {
    Github,
    Gitea,
    Gitlab,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a token and print it, once.
    Create {
        /// Unique name, recorded with every run the token submits.
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum)]
        scope: Scope,
        /// Lifetime, e.g. `30d`, `12h` [default: never expires].
        #[arg(long, value_name = "DURATION", value_parser = capstan_proto::units::parse_age)]
        expires: Option<std::time::Duration>,
    },
    /// List the tokens (names, scopes, dates; never a secret).
    List,
    /// Revoke a token: it fails from the next call on.
    Revoke {
        /// Token name.
        name: String,
    },
}

/// A token's scope; each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scope {
    /// Status, runs, logs, runners, cluster.
    Read,
    /// Read, submit runs, cancel the runs it submitted.
    Submit,
    /// Everything: cancel any run, drain and resume runners, tokens.
    Admin,
}

#[derive(Debug, clap::Args)]
pub(crate) struct SubmitArgs {
    /// Pipeline file.
    pub(crate) file: PathBuf,
    /// Override a param of the file (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub(crate) params: Vec<(String, String)>,
    /// Source repository URL.
    #[arg(long, env = "CAPSTAN_REPO")]
    pub(crate) repo: Option<String>,
    /// Revision to check out; `${{ git.sha }}` resolves to it.
    #[arg(long, env = "CAPSTAN_REV")]
    pub(crate) rev: Option<String>,
    /// Higher runs first.
    #[arg(
        long,
        env = "CAPSTAN_PRIORITY",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub(crate) priority: i32,
    /// Queue at most one run per key: a submit whose key an earlier run has
    /// prints that run instead (e.g. a webhook delivery id, so a redelivery
    /// runs nothing twice). Default: a fresh key, which still makes the
    /// client's own retries safe.
    #[arg(long, env = "CAPSTAN_IDEMPOTENCY_KEY", value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
    /// Watch the run and its logs; exit with its result.
    #[arg(short, long)]
    pub(crate) follow: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DevArgs {
    /// Pipeline file.
    pub(crate) file: PathBuf,
    /// How steps run: host processes (shell), simulated (fake), containers (docker).
    #[arg(long, env = "CAPSTAN_EXECUTOR", value_enum, default_value_t = Executor::Shell)]
    pub(crate) executor: Executor,
    /// Override a param of the file (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub(crate) params: Vec<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Executor {
    Shell,
    Fake,
    Docker,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_global_flags_anywhere() {
        let cli = Cli::try_parse_from([
            "capstan", "status", "run-1", "-o", "json", "--server", "a:1,b:2",
        ])
        .unwrap();
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.server, ["a:1", "b:2"]);
    }

    #[test]
    fn params_are_key_value() {
        let cli = Cli::try_parse_from([
            "capstan", "submit", "p.yaml", "--param", "a=b=c", "--param", "x=",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(
            args.params,
            [("a".into(), "b=c".into()), ("x".into(), String::new())]
        );
        assert!(
            Cli::try_parse_from(["capstan", "submit", "p.yaml", "--param", "novalue"]).is_err()
        );
    }

    #[test]
    fn token_flags() {
        let cli = Cli::try_parse_from(["capstan", "runs", "--token", "capstan_x"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("capstan_x"));
        let cli = Cli::try_parse_from([
            "capstan",
            "token",
            "create",
            "--name",
            "ci",
            "--scope",
            "submit",
            "--expires",
            "30d",
        ])
        .unwrap();
        let Command::Token(TokenCommand::Create { scope, expires, .. }) = cli.command else {
            panic!("not token create")
        };
        assert_eq!(scope, Scope::Submit);
        assert_eq!(
            expires,
            Some(std::time::Duration::from_secs(30 * 24 * 3600))
        );
        assert!(
            Cli::try_parse_from(["capstan", "runs", "--token", "a", "--token-file", "f"]).is_err()
        );
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
