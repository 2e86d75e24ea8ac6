//! `TorchRng` against `torch.randn` (`tools/reference/gen_rng.py`).
//!
//! `rng.json` was drawn with torch's AVX2 normal kernel (the one x86 CPUs dispatch to),
//! `rng_scalar.json` with `ATEN_CPU_CAPABILITY=default`; draws under 16 elements are the same
//! in both.

use kiln_worker::engine::rng::{NormalKernel, TorchRng};
use serde::Deserialize;

use crate::fixture::load;

/// Largest allowed `|ours - torch|`. The implementation follows torch's float32 arithmetic
/// operation by operation and is bit-exact on the reference machine; the slack only absorbs a
/// libm that rounds `logf`/`sinf`/`cosf` differently (scalar kernel).
const TOLERANCE: f32 = 1e-6;

#[derive(Deserialize)]
struct RngFixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    seed: u64,
    draws: Vec<Draw>,
}

#[derive(Deserialize)]
struct Draw {
    shape: Vec<usize>,
    /// `null` marks a draw the generator made but the fixture did not store (size).
    values: Option<Vec<f32>>,
}

/// Replays every case with `kernel` and returns how many values were bit-identical.
fn replay(fixture: &str, kernel: NormalKernel) -> (usize, usize) {
    let fixture: RngFixture = load(fixture);
    assert!(!fixture.cases.is_empty(), "no cases");
    let (mut exact, mut total) = (0, 0);
    for case in &fixture.cases {
        let mut rng = TorchRng::with_kernel(case.seed, kernel);
        for (n, draw) in case.draws.iter().enumerate() {
            let numel: usize = draw.shape.iter().product();
            let got = rng.randn(numel);
            let Some(values) = &draw.values else {
                continue;
            };
            assert_eq!(
                numel,
                values.len(),
                "seed {} draw {n}: shape/values",
                case.seed
            );
            for (i, (g, w)) in got.iter().zip(values).enumerate() {
                assert!(
                    (g - w).abs() <= TOLERANCE,
                    "seed {} draw {n} {:?} [{i}]: got {g}, torch {w}",
                    case.seed,
                    draw.shape
                );
                exact += usize::from(g.to_bits() == w.to_bits());
            }
            total += numel;
        }
    }
    (exact, total)
}

#[test]
fn avx2_kernel_matches_torch_bit_for_bit() {
    let (exact, total) = replay("rng.json", NormalKernel::Avx2);
    // The AVX2 emulation is pure float arithmetic (no libm), so it is exact everywhere.
    assert_eq!(exact, total, "only {exact}/{total} values bit-identical");
}

#[test]
fn scalar_kernel_matches_torch_default_capability() {
    let (exact, total) = replay("rng_scalar.json", NormalKernel::Scalar);
    // Bit-exact with glibc; only the tolerance above is promised for other libms.
    assert!(exact > 0 && total > 0);
}

#[test]
fn the_default_kernel_is_avx2() {
    let mut default = TorchRng::new(42);
    let mut avx2 = TorchRng::with_kernel(42, NormalKernel::Avx2);
    assert_eq!(default.randn(100), avx2.randn(100));
}
