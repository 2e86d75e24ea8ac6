//! What the engine's benchmarks share: their arguments, the median of timed rounds, timing a
//! call that way, and the load average they ran under (the machine's throughput moves with it,
//! so every table records it).

// Each benchmark is its own crate and uses only part of this module.
#![allow(dead_code)]

/// The benchmark's own arguments: the command line without the program and the flags cargo
/// adds (`--bench`).
pub fn args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}

/// Seconds `f` took, and what it returned.
pub fn seconds<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = std::time::Instant::now();
    let out = f();
    (start.elapsed().as_secs_f64(), out)
}

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

/// The largest difference between `want` and `got`, relative to `want`'s largest magnitude.
pub fn relative_diff(want: &[f32], got: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = want
        .iter()
        .zip(got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Times `a` then `b`, `rounds` times, alternating so that both see the same machine load;
/// their median seconds.
pub fn alternate<A, B, E>(
    rounds: usize,
    mut a: impl FnMut() -> Result<A, E>,
    mut b: impl FnMut() -> Result<B, E>,
) -> Result<(f64, f64), E> {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (t, out) = seconds(&mut a);
        drop(out?);
        ta.push(t);
        let (t, out) = seconds(&mut b);
        drop(out?);
        tb.push(t);
    }
    Ok((median(ta), median(tb)))
}

/// The header of a candle-against-kiln table: case, then each side's milliseconds and
/// GFLOP/s, the speed-up and the relative difference.
pub fn print_header() {
    println!(
        "{:<32} {:>9} {:>7} {:>9} {:>7} {:>7} {:>9}",
        "case", "candle ms", "GFLOP/s", "kiln ms", "GFLOP/s", "speedup", "rel diff"
    );
}

/// One row of that table: `flop` operations in `candle_s` and `kiln_s` seconds.
pub fn print_row(name: &str, flop: f64, candle_s: f64, kiln_s: f64, rel: f32) {
    println!(
        "{name:<32} {:>9.3} {:>7.1} {:>9.3} {:>7.1} {:>6.2}x {:>9.1e}",
        candle_s * 1e3,
        flop / candle_s / 1e9,
        kiln_s * 1e3,
        flop / kiln_s / 1e9,
        candle_s / kiln_s,
        rel
    )
}
