//! The servers' codec: tonic's prost codec with one change, a request
//! that fails to decode is `INVALID_ARGUMENT` (the caller sent bytes that
//! are not the RPC's message) instead of tonic's `INTERNAL`, which reads as
//! the server's own fault and which a client may retry. Only the generated
//! servers use it (`build.rs`); the clients keep tonic's codec, since a
//! response they cannot decode is not their request's fault.

use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] whose decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct ServerCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Decodes as [`ProstDecoder`] does and reports a failure as
/// [`invalid_message`].
#[derive(Debug, Clone, Default)]
pub struct InvalidArgumentDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The inner decoder's only error is prost's, as INTERNAL; its
        // message is prost's text (which names the field it stopped at).
        self.0
            .decode(buf)
            .map_err(|s| invalid_message(std::any::type_name::<U>(), s.message()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The status for a request message of type `type_path` (a Rust path;
/// its last segment is the proto message's name) that prost could not
/// decode with `error`.
pub fn invalid_message(type_path: &str, error: &str) -> Status {
    let name = type_path.rsplit("::").next().unwrap_or(type_path);
    Status::invalid_argument(format!(
        "the request is not a valid {name} message ({error}); send the protobuf message \
         the RPC takes (proto/capstan/)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_decode_failure_names_the_message_and_prosts_reason() {
        let s = invalid_message(
            "capstan_proto::runner::v1::RegisterRequest",
            "failed to decode Protobuf message: invalid wire type",
        );
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "the request is not a valid RegisterRequest message (failed to decode Protobuf \
             message: invalid wire type); send the protobuf message the RPC takes (proto/capstan/)"
        );
    }
}
