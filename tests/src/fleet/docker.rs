//! The Docker Engine as the fleet tests drive it: the `docker` CLI (the
//! engine's own client, so a failure reads as a user would see it), and the
//! faults a network really has, injected from the host: a container's
//! iptables rules set inside its network namespace with `nsenter` (the
//! container needs no capability for that), `docker pause`, `docker kill`,
//! `docker network disconnect`.

use anyhow::{Context as _, bail};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

/// Runs `docker ARGS` and returns its stdout, trimmed; fails with stderr.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run `docker` (install docker.io; scripts/testbed up starts the engine)")?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether the image exists on this engine.
pub fn image_exists(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image]).is_ok()
}

/// The host PID of the container's first process (its namespaces' owner).
pub fn pid_of(container: &str) -> anyhow::Result<u32> {
    let pid: u32 = docker(&["inspect", "-f", "{{.State.Pid}}", container])?.parse()?;
    if pid == 0 {
        bail!("container {container} is not running");
    }
    Ok(pid)
}

/// Runs `iptables ARGS` inside the container's network namespace; its stdout.
pub fn iptables(container: &str, args: &[&str]) -> anyhow::Result<String> {
    let pid = pid_of(container)?.to_string();
    let out = Command::new("nsenter")
        .args(["-t", &pid, "-n", "iptables", "-w"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run nsenter/iptables (apt-get install util-linux iptables)")?;
    if !out.status.success() {
        bail!(
            "iptables {} in {container} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Drops every packet between the container and each of `peers` (IPs),
/// both ways. Dropped, not rejected: a partition sends no RST.
pub fn cut(container: &str, peers: &[String]) -> anyhow::Result<()> {
    for ip in peers {
        iptables(container, &["-A", "INPUT", "-s", ip, "-j", "DROP"])?;
        iptables(container, &["-A", "OUTPUT", "-d", ip, "-j", "DROP"])?;
    }
    Ok(())
}

/// Drops each packet in or out of the container's `eth0` with
/// `probability` (iptables `statistic`, both directions): loss on its link.
pub fn lossy(container: &str, probability: f64) -> anyhow::Result<()> {
    let p = format!("{probability:.4}");
    for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
        iptables(
            container,
            &[
                "-A",
                chain,
                dir,
                "eth0",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        )?;
    }
    Ok(())
}

/// How many packets the [`lossy`] rules have dropped so far, both ways.
pub fn lost_packets(container: &str) -> anyhow::Result<u64> {
    let mut lost = 0;
    for chain in ["INPUT", "OUTPUT"] {
        let rules = iptables(container, &["-L", chain, "-v", "-n", "-x"])?;
        for rule in rules.lines().filter(|l| l.contains("statistic")) {
            let packets = rule.split_whitespace().next().unwrap_or_default();
            lost += packets
                .parse::<u64>()
                .with_context(|| format!("packet count in {rule:?}"))?;
        }
    }
    Ok(lost)
}

/// Sends the container's TCP connections to `to` (`ip:port`) through
/// `via` (`ip:port`) instead, with a DNAT rule in its own network
/// namespace: the container still dials `to` (a leader hint's address
/// too), and a proxy at `via` (e.g. [`crate::faults::Proxy`]) sits on
/// the path.
pub fn redirect(container: &str, to: SocketAddr, via: SocketAddr) -> anyhow::Result<()> {
    let (ip, port, via) = (to.ip().to_string(), to.port().to_string(), via.to_string());
    iptables(
        container,
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &ip,
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &via,
        ],
    )?;
    Ok(())
}

/// Removes every rule [`cut`], [`lossy`] and [`redirect`] added.
pub fn heal(container: &str) -> anyhow::Result<()> {
    iptables(container, &["-F", "INPUT"])?;
    iptables(container, &["-F", "OUTPUT"])?;
    iptables(container, &["-t", "nat", "-F", "OUTPUT"])?;
    Ok(())
}
