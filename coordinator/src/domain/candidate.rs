//! A cell as a lease sees it before choosing: the few columns the affinity rules
//! (`queue::affinity`) choose by, read ahead by the dispatcher and returned by the store.

/// One available cell the worker could take, in queue order.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Cell id.
    pub id: i64,
    /// Pipeline-reuse hash.
    pub affinity_key: String,
    /// Worker of the cell's last failed attempt, if any.
    pub last_failed_worker: Option<i64>,
}
