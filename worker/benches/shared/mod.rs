//! What the engine's benchmarks share: the median of timed rounds, timing a call that way, and
//! the load average they ran under (the machine's throughput moves with it, so every table
//! records it).

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

/// One warm-up call of `f`, then the median seconds of `reps` timed calls.
#[allow(dead_code)] // engine.rs and lcm_vs_euler.rs time calls; the micro-benches time rounds
pub fn timed(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}
