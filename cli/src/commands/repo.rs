//! `capstan repo add|list|remove`: the repositories whose pushes start
//! runs (an admin token is needed).

use capstan_proto::api::v1::{AddRepoRequest, Forge, RepoInfo};
use serde_json::{Value, json};

use super::{Context, print_json};
use crate::args::{ForgeKind, RepoAdd, RepoCommand};
use crate::exit::{Exit, Failure};
use crate::output::{Format, Table, format_time};

pub(crate) async fn run(ctx: &Context, command: RepoCommand) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    match command {
        RepoCommand::Add(add) => {
            let made = client.add_repo(request(add)).await?;
            let info = made.info.unwrap_or_default();
            match ctx.format {
                Format::Text => {
                    eprintln!(
                        "added the repository `{}` ({}); point its push webhook at \
                         /hooks/{} on the coordinator's HTTP port with this secret, shown only now:",
                        info.name,
                        info.url,
                        forge_name(info.forge).unwrap_or("github")
                    );
                    println!("{}", made.webhook_secret);
                }
                Format::Json => {
                    let mut v = info_json(&info);
                    v["webhook_secret"] = json!(made.webhook_secret);
                    print_json(&v);
                }
            }
        }
        RepoCommand::List => {
            let repos = client.list_repos().await?;
            match ctx.format {
                Format::Text => print!("{}", list_text(&repos)),
                Format::Json => print_json(&json!(repos.iter().map(info_json).collect::<Vec<_>>())),
            }
        }
        RepoCommand::Remove { name } => {
            let info = client.remove_repo(&name).await.map_err(|e| {
                Failure::from_client(e, || {
                    format!("no repository named `{name}` (see `capstan repo list`)")
                })
            })?;
            match ctx.format {
                Format::Text => println!(
                    "removed the repository `{}`: its webhooks are refused from now on",
                    info.name
                ),
                Format::Json => print_json(&info_json(&info)),
            }
        }
    }
    Ok(Exit::Success)
}

fn request(add: RepoAdd) -> AddRepoRequest {
    AddRepoRequest {
        name: add.name,
        url: add.url,
        pipeline: add.pipeline,
        branches: add.branches.into_iter().filter(|b| !b.is_empty()).collect(),
        forge: match add.forge {
            None => Forge::Unspecified,
            Some(ForgeKind::Github) => Forge::Github,
            Some(ForgeKind::Gitea) => Forge::Gitea,
            Some(ForgeKind::Gitlab) => Forge::Gitlab,
        }
        .into(),
        api_url: add.api_url.unwrap_or_default(),
        status_token: add.status_token.unwrap_or_default(),
        schedules: add.schedules,
    }
}

fn forge_name(forge: i32) -> Option<&'static str> {
    match Forge::try_from(forge) {
        Ok(Forge::Github) => Some("github"),
        Ok(Forge::Gitea) => Some("gitea"),
        Ok(Forge::Gitlab) => Some("gitlab"),
        _ => None,
    }
}

fn info_json(info: &RepoInfo) -> Value {
    json!({
        "name": info.name,
        "url": info.url,
        "pipeline": info.pipeline,
        "branches": info.branches,
        "forge": forge_name(info.forge),
        "api_url": if info.api_url.is_empty() { Value::Null } else { json!(info.api_url) },
        "status_token": info.has_status_token,
        "schedules": info.schedules,
        "created": format_time(info.created_at_ms),
    })
}

fn list_text(repos: &[RepoInfo]) -> String {
    let mut table = Table::new(["NAME", "URL", "PIPELINE", "BRANCHES", "FORGE", "SCHEDULES"]);
    for r in repos {
        table.row([
            r.name.clone(),
            r.url.clone(),
            r.pipeline.clone(),
            if r.branches.is_empty() {
                "*".to_string()
            } else {
                r.branches.join(",")
            },
            forge_name(r.forge).unwrap_or("-").to_string(),
            if r.schedules.is_empty() {
                "-".to_string()
            } else {
                r.schedules.join("; ")
            },
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_shows_every_setting_but_secrets() {
        let text = list_text(&[RepoInfo {
            name: "app".into(),
            url: "https://git.example.com/app.git".into(),
            pipeline: ".capstan.yaml".into(),
            branches: vec!["main".into(), "release/*".into()],
            forge: Forge::Gitea.into(),
            has_status_token: true,
            schedules: vec!["0 3 * * *".into()],
            ..Default::default()
        }]);
        assert!(
            text.contains("app") && text.contains("main,release/*"),
            "{text}"
        );
        assert!(
            text.contains("gitea") && text.contains("0 3 * * *"),
            "{text}"
        );
    }
}
