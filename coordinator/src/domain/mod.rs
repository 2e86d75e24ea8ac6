//! The coordinator's ground floor: the types the queue, the store and the API share — who is
//! calling and what it may do ([`auth`]), cell,
//! sweep and failure states ([`state`]), failed attempts and what becomes of them
//! ([`failure`]), a cell as a lease chooses among them ([`candidate`]), a cell's way through a
//! lease and the fence on its writes ([`lease`]), and what the store returns for sweeps, cells
//! and workers ([`rows`]). It imports nothing of the coordinator but [`crate::clock`],
//! [`crate::Error`] and [`crate::sweep`]'s cells (the planner, which knows no queue, store or
//! API), so none of those layers imports another to reach these.

pub mod auth;
pub mod candidate;
pub mod failure;
pub mod lease;
pub mod rows;
pub mod state;
