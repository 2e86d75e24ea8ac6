//! What the engine's micro-benchmarks share: the median of timed rounds and the load average
//! they ran under (the machine's throughput moves with it, so every table records it).

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `/proc/loadavg`'s three averages, or `?` where there is none.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}
