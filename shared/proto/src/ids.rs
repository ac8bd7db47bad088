//! Id newtypes. On the wire every id is a plain string; in Rust each kind of
//! id has its own type so a run id can never be passed where an attempt id is
//! expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A new, unique, time-ordered id (UUID v7 with a short kind prefix).
            pub fn generate() -> Self {
                Self(format!(concat!($prefix, "-{}"), uuid::Uuid::now_v7().simple()))
            }
            /// Wraps an id received from the wire or the store.
            pub fn from_string(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(
    /// A pipeline run.
    RunId,
    "run"
);
id_type!(
    /// One attempt at running one task; the fencing token of every report.
    AttemptId,
    "att"
);
id_type!(
    /// A registered runner.
    RunnerId,
    "rnr"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_prefixed_and_ordered() {
        let a = RunId::generate();
        let b = RunId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("run-"));
        assert!(a < b, "v7 ids sort by creation time: {a} {b}");
        assert!(AttemptId::generate().as_str().starts_with("att-"));
    }
}
