//! The leader hint: a follower answers every call with `UNAVAILABLE` and, when
//! it knows the leader, the leader's URL in the `capstan-leader` metadata
//! (README "High availability"). The CLI's client and the runner follow it.

use tonic::Status;

/// The gRPC metadata key of the hint.
pub const METADATA_KEY: &str = "capstan-leader";

/// Adds the hint to a follower's answer (an endpoint that is not valid
/// metadata is left out: the caller then retries its other URLs).
pub fn add_hint(status: &mut Status, leader: &str) {
    if let Ok(value) = leader.parse() {
        status.metadata_mut().insert(METADATA_KEY, value);
    }
}

/// The leader URL a follower named in its answer, trimmed; `None` when it
/// named none.
pub fn hint(status: &Status) -> Option<&str> {
    let value = status.metadata().get(METADATA_KEY)?.to_str().ok()?.trim();
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_survives_the_round_trip_and_an_empty_one_is_none() {
        let mut status = Status::unavailable("not the leader");
        assert_eq!(hint(&status), None);
        add_hint(&mut status, "http://10.0.0.2:7700");
        assert_eq!(hint(&status), Some("http://10.0.0.2:7700"));
        let mut blank = Status::unavailable("x");
        blank
            .metadata_mut()
            .insert(METADATA_KEY, " ".parse().unwrap());
        assert_eq!(hint(&blank), None);
        let mut bad = Status::unavailable("x");
        add_hint(&mut bad, "http://a\nb");
        assert_eq!(
            hint(&bad),
            None,
            "an endpoint that is not metadata is left out"
        );
    }
}
