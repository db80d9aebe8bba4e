//! ID newtypes: a trial id can't be passed where an experiment id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An id field that did not hold a UUID.
#[derive(Debug, thiserror::Error)]
#[error("{what} `{text}` is not a valid id: expected a UUID such as 0190f3d2-8c4e-7d1a-9b1e-5f0c2a9d4e11")]
pub struct BadId {
    pub what: &'static str,
    pub text: String,
}

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn parse(text: &str) -> Result<Self, BadId> {
                Uuid::parse_str(text.trim()).map(Self).map_err(|_| BadId {
                    what: $what,
                    text: text.to_string(),
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = BadId;
            fn from_str(text: &str) -> Result<Self, BadId> {
                Self::parse(text)
            }
        }
    };
}

id_type!(ExperimentId, "experiment id");
id_type!(TrialId, "trial id");
id_type!(WorkerId, "worker id");
id_type!(LeaseToken, "lease token");
