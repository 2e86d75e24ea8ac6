//! The CPU thread count the engine computes with, fixed once per process.
//!
//! candle 0.11 asks for its thread count on every CPU operation and, unless
//! `RAYON_NUM_THREADS` (or `CANDLE_NUM_THREADS`) is set, works it out afresh each time; on Linux
//! that ends in `num_cpus::get_physical`, which reads and parses `/proc/cpuinfo`. Profiled on
//! the tiny test model (`perf`, 2026-11-26): 26 % of the render thread's samples and 40 % of a
//! bare render loop's were in those reads. Setting the variable once, to the same number candle
//! would pick (physical cores), turns each lookup into an environment read.

/// Fixes the engine's CPU thread count for the process: `configured` (a worker's `--threads`
/// / `KILN_THREADS`) when given, else `CANDLE_NUM_THREADS` or `RAYON_NUM_THREADS` when set,
/// else the physical core count. Sets `RAYON_NUM_THREADS` (read by candle, its matrix products
/// and our kernels' rayon pool) and clears `CANDLE_NUM_THREADS` when `configured` overrides it;
/// returns the thread count in force.
///
/// # Safety
///
/// Changes the process environment: call it at the top of `main`, before any other thread
/// exists (see [`std::env::set_var`]).
pub unsafe fn fix_thread_count(configured: Option<usize>) -> usize {
    let set = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    if let Some(n) = configured.filter(|&n| n > 0) {
        // SAFETY: the caller guarantees no other thread is running.
        unsafe {
            std::env::remove_var("CANDLE_NUM_THREADS");
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        return n;
    }
    if let Some(n) = set("CANDLE_NUM_THREADS").or_else(|| set("RAYON_NUM_THREADS")) {
        return n;
    }
    let n = num_cpus::get_physical().max(1);
    // SAFETY: the caller guarantees no other thread is running.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    n
}
