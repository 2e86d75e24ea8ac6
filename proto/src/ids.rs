//! Id newtypes. The coordinator assigns every id; on the wire they are plain `uint64`s and
//! these types are the only way they travel through our code.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A sweep: what a user submitted.
    SweepId(i64)
);
id_type!(
    /// A cell: one fully resolved render of a sweep.
    CellId(i64)
);
id_type!(
    /// A registered worker process.
    WorkerId(i64)
);
id_type!(
    /// The number of an attempt at a cell, from 1; it grows each time the cell is leased.
    Attempt(i32)
);

impl SweepId {
    /// From a wire id; `None` for 0 or a value past `i64::MAX` (never assigned).
    pub fn from_wire(v: u64) -> Option<Self> {
        positive(v).map(Self)
    }
}

impl CellId {
    /// From a wire id; `None` for 0 or a value past `i64::MAX` (never assigned).
    pub fn from_wire(v: u64) -> Option<Self> {
        positive(v).map(Self)
    }
}

impl WorkerId {
    /// From a wire id; `None` for 0 or a value past `i64::MAX` (never assigned).
    pub fn from_wire(v: u64) -> Option<Self> {
        positive(v).map(Self)
    }
}

impl Attempt {
    /// From a wire attempt number; `None` for 0 or a value past `i32::MAX`.
    pub fn from_wire(v: u32) -> Option<Self> {
        i32::try_from(v).ok().filter(|a| *a > 0).map(Self)
    }
}

fn positive(v: u64) -> Option<i64> {
    i64::try_from(v).ok().filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_ids_reject_zero_and_overflow() {
        assert_eq!(CellId::from_wire(0), None);
        assert_eq!(CellId::from_wire(u64::MAX), None);
        assert_eq!(CellId::from_wire(7), Some(CellId(7)));
        assert_eq!(Attempt::from_wire(0), None);
        assert_eq!(Attempt::from_wire(u32::MAX), None);
        assert_eq!(Attempt::from_wire(3), Some(Attempt(3)));
    }
}
