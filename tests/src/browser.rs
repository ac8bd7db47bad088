//! A real headless Chromium driven over WebDriver (chromedriver and the
//! fantoccini client), for the dashboard's tests: start, open pages, wait
//! for what the page shows, save screenshots as test artifacts.
//!
//! Debian's `chromium` and `chromium-driver` come from `scripts/testbed up`.
//! chromedriver runs in a process group of its own, so the browsers it
//! starts are killed with it on drop.

use crate::net::free_port;
use crate::process::Proc;
use crate::wait::poll_until;
use anyhow::{Context as _, bail};
use fantoccini::{Client, ClientBuilder};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long a page may take to show what a test waits for.
pub const PAGE_WAIT: Duration = Duration::from_secs(20);

pub struct Browser {
    pub client: Client,
    driver: Proc,
    shots: PathBuf,
}

/// Where screenshots go: `$CAPSTAN_SCREENSHOT_DIR`, else
/// `$CARGO_TARGET_DIR/dashboard-screenshots` (kept after the run).
pub fn screenshot_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPSTAN_SCREENSHOT_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("dashboard-screenshots")
}

fn find(names: &[&str]) -> anyhow::Result<PathBuf> {
    for name in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!(
        "{} not found: run scripts/testbed up (it installs Debian's chromium and chromium-driver)",
        names.join(" or ")
    )
}

impl Browser {
    /// chromedriver on a free loopback port, and one headless session.
    pub async fn start(dir: &Path) -> anyhow::Result<Browser> {
        let driver_bin = find(&["chromedriver"])?;
        let chromium = find(&["chromium", "chromium-browser"])?;
        let port = free_port();
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .process_group(0);
        let driver = Proc::spawn(cmd, dir, "chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let profile = dir.join("chromium-profile");
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                    "--disable-extensions", "--disable-background-networking",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        };
        let client = poll_until(
            Duration::from_secs(30),
            Duration::from_millis(200),
            async || {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                Ok(ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&url)
                    .await
                    .ok())
            },
        )
        .await?
        .context("chromedriver did not start a headless Chromium session in 30 s")?;
        let shots = screenshot_dir();
        std::fs::create_dir_all(&shots).with_context(|| format!("create {}", shots.display()))?;
        Ok(Browser {
            client,
            driver,
            shots,
        })
    }

    /// Runs `script` (its `return` value as JSON) in the page.
    pub async fn js(
        &self,
        script: &str,
        args: Vec<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        Ok(self.client.execute(script, args).await?)
    }

    /// The text of the first element matching `css` now (None: no such
    /// element). Read in the page by script, in one step, so a live update
    /// that replaces the element in between cannot make it stale.
    pub async fn query(&self, css: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
                vec![css.into()],
            )
            .await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// An attribute of the first element matching `css` now.
    pub async fn attr(&self, css: &str, name: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
                vec![css.into(), name.into()],
            )
            .await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        let v = self
            .js(
                "return document.querySelectorAll(arguments[0]).length;",
                vec![css.into()],
            )
            .await?;
        Ok(v.as_u64().unwrap_or(0) as usize)
    }

    /// The text of `css` once it exists.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        self.wait_text(css, "any text", |_| true).await
    }

    /// Waits until the text of `css` satisfies `ok`; the text then.
    pub async fn wait_text(
        &self,
        css: &str,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            last = self.query(css).await?;
            if let Some(t) = &last
                && ok(t)
            {
                return Ok(t.clone());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = self.client.current_url().await.ok();
        bail!("`{css}` never showed {what} on {url:?}; last text: {last:?}")
    }

    /// Clicks the element matching `css` once it exists, in the page by
    /// script (a live update may replace the element at any moment).
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PAGE_WAIT;
        while tokio::time::Instant::now() < deadline {
            let clicked = self
                .js(
                    "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true;",
                    vec![css.into()],
                )
                .await?;
            if clicked == serde_json::Value::Bool(true) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "no `{css}` to click on {:?}",
            self.client.current_url().await.ok()
        )
    }

    /// Saves a PNG of the page as `<name>.png` in [`screenshot_dir`].
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Ends the session (closing Chromium) and chromedriver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let closed = self.client.clone().close().await;
        self.stop_driver();
        closed.map_err(Into::into)
    }

    fn stop_driver(&mut self) {
        // Its process group: chromedriver and the browsers it started.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.driver.kill();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.stop_driver();
    }
}
