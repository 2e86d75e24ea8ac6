//! The CPU attention core and fused elementwise steps against the candle code they replace,
//! on SD1.5's shapes, f32.
//!
//! Each case runs both sides once as a warm-up (and checks that they agree), then alternates
//! them for `KILN_BENCH_ROUNDS` rounds (default 5, old first in even rounds, new first in odd
//! ones) and prints the medians, with the load average before and after: on a shared machine
//! only sides measured back to back compare. The thread count is rayon's
//! (`RAYON_NUM_THREADS`), as in the engine.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kiln-worker --bench attention --profile dev [-- FILTER]
//! ```

mod shared;

use kiln_worker::engine::bench::OpCase;
use shared::{loadavg, median};

/// A case's name and how to build its inputs.
type Case = (&'static str, fn() -> OpCase);

fn main() {
    // SAFETY: first thing in main, before any thread is started (as `kiln` does).
    let threads = unsafe { kiln_worker::engine::threads::fix_thread_count(None) };
    let filter: Vec<String> = shared::args();
    let rounds: usize = std::env::var("KILN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cases: [Case; 7] = [
        ("self-attention 512² (8×4096 tokens, d 40)", || {
            OpCase::attention(8, 4096, 4096, 40).unwrap()
        }),
        ("self-attention 256² (8×1024 tokens, d 40)", || {
            OpCase::attention(8, 1024, 1024, 40).unwrap()
        }),
        ("self-attention 32×32 level (8×1024, d 80)", || {
            OpCase::attention(8, 1024, 1024, 80).unwrap()
        }),
        ("cross-attention 512² (8×4096 q, 77 k, d 40)", || {
            OpCase::attention(8, 4096, 77, 40).unwrap()
        }),
        ("VAE mid attention 512² (1×4096, d 512)", || {
            OpCase::attention(1, 4096, 4096, 512).unwrap()
        }),
        ("GEGLU 4096 tokens × 2560", || {
            OpCase::geglu(4096, 1280).unwrap()
        }),
        ("group norm + SiLU 320×64×64", || {
            OpCase::group_norm_silu(320, 64, 64, 32).unwrap()
        }),
    ];
    println!(
        "threads {threads}, {rounds} rounds, load average before {}",
        loadavg()
    );
    println!("| case | old (s) | new (s) | old/new | max rel. diff |");
    println!("|---|---|---|---|---|");
    for (name, build) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let case = build();
        let diff = case.relative_difference().expect("both sides run");
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for fused in [round % 2 == 1, round % 2 == 0] {
                let t = case.time(fused).expect("runs");
                if fused { new.push(t) } else { old.push(t) }
            }
        }
        let (old, new) = (median(old), median(new));
        println!(
            "| {name} | {old:.4} | {new:.4} | {:.1}× | {diff:.1e} |",
            old / new
        );
    }
    println!("load average after {}", loadavg());
}
