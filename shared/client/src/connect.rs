//! Reaching a coordinator: the endpoint of a URL (`https://` is TLS or
//! nothing), one connection with its handshake's failures explained, and
//! the probe of every server at once that picks the leader.

use std::error::Error as StdError;
use std::time::Duration;

use capstan_proto::cluster::v1::AskLeaderRequest;
use capstan_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use tonic::transport::Endpoint;

use crate::{AuthChannel, ClientError, ClientOptions, auth, is_connection_failure};

/// A channel to one server, with the token on every call.
#[derive(Clone)]
pub(crate) struct Connection {
    pub(crate) url: String,
    pub(crate) channel: AuthChannel,
}

pub(crate) fn endpoint(url: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let endpoint =
        Endpoint::from_shared(url.to_string()).map_err(|source| ClientError::InvalidServer {
            url: url.to_string(),
            source,
        })?;
    // `https://` is TLS or nothing: tonic refuses an https endpoint without
    // a TLS config instead of speaking plaintext to it.
    let endpoint = if url.starts_with("https://") {
        endpoint
            .tls_config(options.tls.tonic_config()?)
            .map_err(|source| ClientError::InvalidServer {
                url: url.to_string(),
                source,
            })?
    } else {
        endpoint
    };
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        // Notice a dead leader while following a quiet stream.
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

pub(crate) async fn connect_one(
    url: &str,
    options: &ClientOptions,
) -> Result<Connection, ClientError> {
    let endpoint = endpoint(url, options)?;
    let unreachable = |source: Box<dyn StdError + Send + Sync>| ClientError::Unreachable {
        servers: vec![url.to_string()],
        source,
    };
    match tokio::time::timeout(options.connect_timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(Connection {
            url: url.to_string(),
            channel: auth::authed(channel, options.token.clone()),
        }),
        Ok(Err(e)) => Err(match capstan_tls::classify(&e) {
            Some(failure) => tls_failure(url, failure),
            // A TLS handshake cut short without a TLS answer: a plaintext
            // server behind an `https://` URL.
            None if url.starts_with("https://") && is_eof(&e) => tls_failure(
                url,
                capstan_tls::TlsFailure::NotTls(
                    "the connection closed during the handshake".into(),
                ),
            ),
            None => unreachable(Box::new(e)),
        }),
        Err(_) => Err(unreachable(
            format!("no answer within {:?}", options.connect_timeout).into(),
        )),
    }
}

fn tls_failure(url: &str, failure: capstan_tls::TlsFailure) -> ClientError {
    ClientError::Tls {
        url: url.to_string(),
        failure,
    }
}

/// True if an `UnexpectedEof` I/O error is in `err`'s chain.
fn is_eof(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::UnexpectedEof
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Connects to every server at once and asks each who leads (with
/// `start` first in the rotation, which only orders equals). The leader
/// wins as soon as it answers (`true` beside it); otherwise the first
/// follower that answered (`false`), once every probe has ended. A server that accepts TCP but never answers
/// (stopped with SIGSTOP, wedged) costs at most `connect_timeout` instead of
/// becoming the connection that every later call hangs on. The error names
/// every server and the last failure.
pub(crate) async fn connect_any(
    servers: &[String],
    start: usize,
    options: &ClientOptions,
) -> Result<(Connection, bool), ClientError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut probes: FuturesUnordered<_> = (0..servers.len())
        .map(|i| probe(&servers[(start + i) % servers.len()], options))
        .collect();
    let mut follower: Option<Connection> = None;
    let mut last: Option<Box<dyn StdError + Send + Sync>> = None;
    while let Some(result) = probes.next().await {
        match result {
            Ok((connection, true)) => return Ok((connection, true)),
            Ok((connection, false)) => {
                follower.get_or_insert(connection);
            }
            Err(ClientError::Unreachable { source, .. }) => last = Some(source),
            Err(other) => return Err(other),
        }
    }
    follower
        .map(|c| (c, false))
        .ok_or_else(|| ClientError::Unreachable {
            servers: servers.to_vec(),
            source: last.unwrap_or_else(|| "no coordinator address given".into()),
        })
}

/// Connects to `url` and asks it whether it leads, within
/// `connect_timeout` for both. A server that answers the question with an
/// error is reachable (not the leader as far as we know).
async fn probe(url: &str, options: &ClientOptions) -> Result<(Connection, bool), ClientError> {
    let connection = connect_one(url, options).await?;
    let mut cluster = ClusterServiceClient::new(connection.channel.clone());
    let asked = tokio::time::timeout(
        options.connect_timeout,
        cluster.ask_leader(AskLeaderRequest {}),
    )
    .await;
    match asked {
        Ok(Ok(answer)) => Ok((connection, answer.into_inner().is_leader)),
        Ok(Err(status)) if !is_connection_failure(&status) => Ok((connection, false)),
        // Under TLS 1.3 a refused client certificate shows on the first call.
        Ok(Err(status)) if let Some(failure) = capstan_tls::classify(&status) => {
            Err(tls_failure(url, failure))
        }
        Ok(Err(status)) => Err(ClientError::Unreachable {
            servers: vec![url.to_string()],
            source: Box::new(status),
        }),
        Err(_) => Err(ClientError::Unreachable {
            servers: vec![url.to_string()],
            source: format!(
                "connected, but no answer within {:?}",
                options.connect_timeout
            )
            .into(),
        }),
    }
}
