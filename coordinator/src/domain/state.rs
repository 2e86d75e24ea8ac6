//! The states a cell and a sweep can be in, and the classes of failure. Each is stored as text
//! with a `CHECK` constraint listing exactly these spellings (see `migrations/`).

use std::fmt;
use std::str::FromStr;

use crate::Error;

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(Error::Corrupt(format!(
                        concat!("unknown ", stringify!($name), " {:?}"), other
                    ))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Lifecycle state of a cell (River's states plus `held` for paused sweeps).
    CellState {
        /// May be leased now.
        Available = "available",
        /// Waits for `scheduled_at`.
        Scheduled = "scheduled",
        /// Leased: an attempt is in flight under a lease.
        Running = "running",
        /// Failed; waits for its backoff before it is available again.
        Retryable = "retryable",
        /// Its sweep is paused.
        Held = "held",
        /// Rendered, result recorded. Terminal.
        Completed = "completed",
        /// Cancelled by a user. Terminal.
        Cancelled = "cancelled",
        /// Failed for good. Terminal.
        Discarded = "discarded",
    }
);

impl CellState {
    /// True for completed, cancelled and discarded.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CellState::Completed | CellState::Cancelled | CellState::Discarded
        )
    }
}

text_enum!(
    /// State of a sweep as a whole.
    SweepState {
        /// Its cells are handed out.
        Active = "active",
        /// Its queued cells are held.
        Paused = "paused",
        /// Cancelled by a user.
        Cancelled = "cancelled",
    }
);

text_enum!(
    /// What a token may do. `read` ⊂ `submit` ⊂ `admin` for the sweep service; `worker` is the
    /// worker service only.
    Scope {
        /// Read its owner's sweeps, cells and results; list workers.
        Read = "read",
        /// And submit, extend, cancel, pause, resume and retry its owner's sweeps.
        Submit = "submit",
        /// Everything, on every owner's sweeps.
        Admin = "admin",
        /// Register as a worker and lease, render and report cells.
        Worker = "worker",
    }
);

impl SweepState {
    /// The state cells entering a sweep in this state take: what an extend or an intake move
    /// inserts, and how a sweep's counts show its intake (the SQL of `Store::counts` says the
    /// same in a `CASE`).
    pub fn entry_state(self) -> CellState {
        match self {
            SweepState::Active => CellState::Available,
            SweepState::Paused => CellState::Held,
            SweepState::Cancelled => CellState::Cancelled,
        }
    }
}

text_enum!(
    /// Why an attempt failed; decides whether and where it is retried.
    FailureClass {
        /// Can never render: not retried.
        BadInput = "bad_input",
        /// Out of memory or device error: retried, preferably elsewhere.
        Resource = "resource",
        /// Passing trouble: retried after a backoff.
        Transient = "transient",
        /// Stopped because a user cancelled the cell.
        Cancelled = "cancelled",
        /// The lease ran out without a heartbeat (worker died or lost the network).
        LeaseExpired = "lease_expired",
    }
);

text_enum!(
    /// Kind of device a worker renders on.
    DeviceKind {
        /// Not declared.
        Unspecified = "unspecified",
        /// CPU.
        Cpu = "cpu",
        /// NVIDIA CUDA.
        Cuda = "cuda",
        /// Apple Metal.
        Metal = "metal",
    }
);

text_enum!(
    /// What a registry model is (`kiln model add --kind`), stored in `models.kind`.
    ModelKind {
        /// A full Stable Diffusion checkpoint (`model`).
        Checkpoint = "checkpoint",
        /// A LoRA (`[[loras]]`).
        Lora = "lora",
        /// A textual-inversion embedding.
        Embedding = "embedding",
        /// A VAE (`vae`).
        Vae = "vae",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for s in CellState::ALL {
            assert_eq!(s.as_str().parse::<CellState>().unwrap(), *s);
        }
        for s in FailureClass::ALL {
            assert_eq!(s.as_str().parse::<FailureClass>().unwrap(), *s);
        }
        assert!("bogus".parse::<CellState>().is_err());
    }

    #[test]
    fn stored_spellings_match_the_schema_check() {
        let schema = include_str!("../../../migrations/sqlite/0001_init.sql");
        for s in CellState::ALL {
            assert!(schema.contains(&format!("'{}'", s.as_str())), "{s} missing");
        }
        for s in SweepState::ALL {
            assert!(schema.contains(&format!("'{}'", s.as_str())), "{s} missing");
        }
    }
}
