//! Planning benchmark (not a test): a sweep file that expands to the default cell limit,
//! 1,000,000 cells. Run: `cargo bench -p kiln-coordinator --bench plan --profile dev`.

use kiln_coordinator::sweep::{PlanLimits, SweepSource, plan};

fn main() {
    let src = SweepSource::new(
        "big.toml",
        "model = \"m\"\nprompt = \"a {a|b|c|d|e} __n__\"\nseeds = { from = 0, count = 100 }\n\
         [wildcards]\nn = \"n.txt\"\n[axes]\ncfg = [1.0, 1.5, 2.0, 2.5]\nsteps = [2, 4, 6, 8, 10]\n",
    )
    .with_file(
        "n.txt",
        (0..100).map(|i| format!("thing {i}\n")).collect::<String>(),
    );
    let t = std::time::Instant::now();
    let p = plan(&src, &PlanLimits::default(), 0).expect("the benchmark sweep plans");
    assert_eq!(p.cells.len(), 1_000_000);
    println!(
        "planned {} cells in {:.2} s",
        p.cells.len(),
        t.elapsed().as_secs_f64()
    );
}
