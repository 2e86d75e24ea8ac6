//! The coordinator's ground floor: the types the queue, the store and the API share — cell,
//! sweep and failure states ([`state`]), failed attempts and what becomes of them
//! ([`failure`]), and a cell as a lease chooses among them ([`candidate`]). It imports nothing
//! of the coordinator above [`crate::clock`], so none of those layers imports another to
//! reach these.

pub mod candidate;
pub mod failure;
pub mod state;
