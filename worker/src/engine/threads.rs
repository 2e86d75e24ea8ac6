//! The CPU thread count the engine computes with, fixed once per process.
//!
//! candle 0.11 asks for its thread count on every CPU operation and, unless
//! `RAYON_NUM_THREADS` (or `CANDLE_NUM_THREADS`) is set, works it out afresh each time; on Linux
//! that ends in `num_cpus::get_physical`, which reads and parses `/proc/cpuinfo`. Profiled on
//! the tiny test model (`perf`, 2026-11-26): 26 % of the render thread's samples and 40 % of a
//! bare render loop's were in those reads. Setting the variable once, to the same number candle
//! would pick (physical cores), turns each lookup into an environment read.
//!
//! candle 0.11 also runs its large elementwise operations on a pool of its own beside rayon's,
//! whose threads spin for 25 000 rounds after each operation before they sleep. Our kernels
//! run on rayon's threads, so on a machine with as many threads as cores that spinning takes
//! cores from the next dense layer: measured on the 2-core AMD EPYC (2026-12-07, `perf`), 3.4 %
//! of a text encode's samples were candle's idle worker spinning and 2.3 % its caller waiting,
//! and with no spinning a text encode took 0.096–0.115 s against 0.126–0.150 s (UNet and VAE
//! unchanged). The pool's threads are therefore told to sleep at once
//! (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0`) unless the variable is set; its work is handed out from
//! a shared cursor, so the caller takes up a sleeping thread's share.

/// Fixes the engine's CPU thread count for the process: `configured` (a worker's `--threads`
/// / `KILN_THREADS`) when given, else `CANDLE_NUM_THREADS` or `RAYON_NUM_THREADS` when set,
/// else the physical core count. Sets `RAYON_NUM_THREADS` (read by candle, its matrix products
/// and our kernels' rayon pool) and clears `CANDLE_NUM_THREADS` when `configured` overrides it;
/// returns the thread count in force. Also sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 0 when it is
/// unset (see the module's doc).
///
/// # Safety
///
/// Changes the process environment: call it at the top of `main`, before any other thread
/// exists (see [`std::env::set_var`]).
pub unsafe fn fix_thread_count(configured: Option<usize>) -> usize {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: the caller guarantees no other thread is running.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
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
