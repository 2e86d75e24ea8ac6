"""Fixture 1: rng.json -- torch CPU generator (mt19937) randn reproduction.

For each case ONE generator `torch.Generator("cpu").manual_seed(seed)` is created and the draws are made in
order with `torch.randn(shape, generator=g, dtype=torch.float32)`, so the stream continues across draws.
"""

import os
import sys

# ATEN_CPU_CAPABILITY must be set before torch is imported. "--scalar" forces the non-SIMD kernel.
SCALAR = "--scalar" in sys.argv
if SCALAR:
    os.environ["ATEN_CPU_CAPABILITY"] = "default"

import torch  # noqa: E402

from common import setup_torch, tensor_json, write_json, versions  # noqa: E402

SMALL = [[3], [1, 7]]
MIXED = [[3], [16], [17], [1, 7], [1, 4, 9, 7], [100], [1, 4, 8, 8], [5]]

CASES = [
    # (seed, shapes, note)
    (0, [[3], [16], [17], [1, 7], [1, 4, 9, 7], [100], [1, 4, 8, 8], [15], [32], [1]], "mixed"),
    (1, MIXED, "mixed"),
    (42, MIXED + [[1, 4, 64, 64], [3]], "mixed + one latent-sized [1,4,64,64] draw, then a small draw after it"),
    (12345, [[16], [3], [17], [1, 4, 8, 8], [1, 7]], "mixed, starts with exactly 16"),
    (2**32 + 7, MIXED, "seed above 2^32"),
    (2**40 + 3, MIXED, "seed above 2^32"),
    (2**63 - 25, MIXED, "seed near 2^63"),
    (7, [[1, 4, 8, 8]], "UNet reference latents (expected.safetensors 'unet_latents')"),
    (
        1234,
        [[1, 4, 8, 8], [1, 4, 8, 8], [1, 4, 8, 8], [1, 4, 8, 8]],
        "LCM pipeline order: initial latents randn [1,4,8,8], then the 3 noise draws made inside "
        "LCMScheduler.step for steps 1..3 of 4 (the last step draws nothing)",
    ),
]


def main():
    setup_torch()
    cases = []
    for seed, shapes, note in CASES:
        g = torch.Generator("cpu").manual_seed(seed)
        draws = []
        for shape in shapes:
            t = torch.randn(shape, generator=g, dtype=torch.float32)
            if SCALAR and t.numel() > 1024:
                # keep rng_scalar.json small: the big draw is still MADE (the stream continues) but not stored
                draws.append({"shape": list(shape), "values": None, "omitted": True})
                continue
            draws.append(tensor_json(t))
        cases.append({"seed": seed, "note": note, "draws": draws})
    cap = torch.backends.cpu.get_cpu_capability()
    write_json(
        "rng_scalar.json" if SCALAR else "rng.json",
        {
            "description": "torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed), dtype=float32); "
            "one generator per case, draws in order (stream continues). numel>=16 draws depend on the torch CPU "
            "kernel: rng.json = the SIMD kernel (AVX2/AVX512, what x86 users get), rng_scalar.json = the same "
            "cases with ATEN_CPU_CAPABILITY=default (scalar libm kernel). numel<16 draws are identical in both. In rng_scalar.json 'values': null marks a draw that was "
            "made but not stored (size).",
            "torch_cpu_capability": cap,
            "versions": versions(),
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
