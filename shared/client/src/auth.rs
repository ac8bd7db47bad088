//! The API token a [`crate::Client`] sends on every call, as gRPC metadata
//! `authorization: Bearer <token>` (marked sensitive, so tonic and our
//! logs never print it).

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A channel that carries the client's token on every call.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Adds the `authorization` metadata to each request (none without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<token>)"
        } else {
            "Bearer(none)"
        })
    }
}

/// A token that cannot be sent as metadata (not printable ASCII).
#[derive(Debug, thiserror::Error)]
#[error(
    "the API token contains characters a token never has (a line break from the token file?); \
     pass the `capstan_...` text alone"
)]
pub struct BadToken;

impl Bearer {
    /// `token: None` sends nothing (the coordinator then answers UNAUTHENTICATED).
    pub fn new(token: Option<&str>) -> Result<Self, BadToken> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| BadToken)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// `channel` with `bearer` on every call.
pub fn authed(channel: Channel, bearer: Bearer) -> AuthChannel {
    InterceptedService::new(channel, bearer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_in_the_authorization_metadata() {
        let mut b = Bearer::new(Some("capstan_abc\n")).unwrap();
        let req = b.call(Request::new(())).unwrap();
        let v = req.metadata().get("authorization").unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer capstan_abc");
        assert!(v.is_sensitive());
        assert_eq!(format!("{b:?}"), "Bearer(<token>)");
        let req = Bearer::new(None).unwrap().call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(Bearer::new(Some("a\u{7}b")).is_err());
    }
}
