//! `capstan token create|list|revoke`: API tokens over the API (an admin
//! token is needed). The first admin token comes from
//! `capstan-coordinator token create` (offline).

use capstan_proto::api::v1::{TokenInfo, TokenScope};
use serde_json::{Value, json};

use super::{Context, print_json};
use crate::args::{RunnerTokenCommand, Scope, TokenCommand};
use crate::exit::{Exit, Failure};
use crate::output::{Format, Table, format_time};

pub(crate) async fn run(ctx: &Context, command: TokenCommand) -> Result<Exit, Failure> {
    let client = ctx.connect().await?;
    match command {
        TokenCommand::Create {
            name,
            scope,
            expires,
        } => {
            let scope = match scope {
                Scope::Read => TokenScope::Read,
                Scope::Submit => TokenScope::Submit,
                Scope::Admin => TokenScope::Admin,
            };
            let made = client.create_token(&name, scope, expires).await?;
            let info = made.info.unwrap_or_default();
            match ctx.format {
                Format::Text => {
                    eprintln!(
                        "created the {} token `{}` ({}); it is shown only now: keep it secret",
                        scope_name(info.scope),
                        info.name,
                        expiry(&info)
                    );
                    println!("{}", made.token);
                }
                Format::Json => {
                    let mut v = info_json(&info);
                    v["token"] = json!(made.token);
                    print_json(&v);
                }
            }
        }
        TokenCommand::List => {
            let tokens = client.list_tokens().await?;
            match ctx.format {
                Format::Text => print!("{}", list_text(&tokens)),
                Format::Json => {
                    print_json(&json!(tokens.iter().map(info_json).collect::<Vec<_>>()))
                }
            }
        }
        TokenCommand::Revoke { name } => {
            let info = client.revoke_token(&name).await.map_err(|e| {
                Failure::from_client(e, || {
                    format!("no token named `{name}` (see `capstan token list`)")
                })
            })?;
            match ctx.format {
                Format::Text => println!(
                    "revoked the token `{}`: it fails from the next call on",
                    info.name
                ),
                Format::Json => print_json(&info_json(&info)),
            }
        }
    }
    Ok(Exit::Success)
}

/// `capstan runner-token create --ephemeral`: the token on stdout, what
/// it is for on stderr.
pub(crate) async fn runner_token(
    ctx: &Context,
    command: RunnerTokenCommand,
) -> Result<Exit, Failure> {
    let RunnerTokenCommand::Create {
        ephemeral,
        labels,
        ttl,
    } = command;
    if !ephemeral {
        return Err(Failure::usage(
            "pass --ephemeral: the only runner tokens are single-use ones for ephemeral runners \
             (the fleet's shared token is the coordinator's --registration-token)",
        ));
    }
    let client = ctx.connect().await?;
    let made = client
        .create_runner_token(labels.clone().into_iter().collect(), ttl)
        .await?;
    match ctx.format {
        Format::Text => {
            let shown: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!(
                "created a single-use token for one ephemeral runner (labels `{}`; expires {}); \
                 it is shown only now: pass it as the runner's --registration-token with --ephemeral",
                shown.join(","),
                format_time(made.expires_at_ms)
            );
            println!("{}", made.token);
        }
        Format::Json => print_json(&json!({
            "token": made.token,
            "labels": labels,
            "expires": format_time(made.expires_at_ms),
        })),
    }
    Ok(Exit::Success)
}

fn scope_name(scope: i32) -> &'static str {
    match TokenScope::try_from(scope) {
        Ok(TokenScope::Read) => "read",
        Ok(TokenScope::Submit) => "submit",
        Ok(TokenScope::Admin) => "admin",
        _ => "unknown",
    }
}

fn expiry(info: &TokenInfo) -> String {
    if info.expires_at_ms == 0 {
        "never expires".into()
    } else {
        format!("expires {}", format_time(info.expires_at_ms))
    }
}

fn info_json(info: &TokenInfo) -> Value {
    json!({
        "name": info.name,
        "scope": scope_name(info.scope),
        "created": format_time(info.created_at_ms),
        "expires": if info.expires_at_ms == 0 { Value::Null } else { json!(format_time(info.expires_at_ms)) },
    })
}

fn list_text(tokens: &[TokenInfo]) -> String {
    let mut table = Table::new(["NAME", "SCOPE", "CREATED", "EXPIRES"]);
    for t in tokens {
        table.row([
            t.name.clone(),
            scope_name(t.scope).to_string(),
            format_time(t.created_at_ms),
            if t.expires_at_ms == 0 {
                "never".to_string()
            } else {
                format_time(t.expires_at_ms)
            },
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_shows_names_scopes_and_dates() {
        let text = list_text(&[TokenInfo {
            name: "ci".into(),
            scope: TokenScope::Submit.into(),
            created_at_ms: 1_700_000_000_000,
            expires_at_ms: 0,
        }]);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "NAME  SCOPE   CREATED               EXPIRES");
        assert_eq!(lines[1], "ci    submit  2023-11-14T22:13:20Z  never");
    }
}
