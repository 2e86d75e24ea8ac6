"""Prints the Markdown tables for BENCHMARKS.md from the JSON lines of tools/bench/run.sh's rounds.

    compare.py --kiln K1.json K2.json ... --torch T1.json T2.json ...

Each file's last line is one round's JSON object; every figure is the median over the rounds, with
each round's value beside it.
"""

import argparse
import json
import statistics


def last_json(path):
    return json.loads(open(path).read().strip().splitlines()[-1])


ap = argparse.ArgumentParser()
ap.add_argument("--kiln", nargs="+", required=True)
ap.add_argument("--torch", nargs="+", required=True)
args = ap.parse_args()
kiln = [last_json(p) for p in args.kiln]
torch = [last_json(p) for p in args.torch]


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def each(runs, key, fmt):
    return " / ".join(format(r[key], fmt) for r in runs)


rows = [("text encode (77 tokens)", "text_encode_s", ".3f"), ("UNet step 512² (batch 1)", "unet_step_512_s", ".2f"),
        ("UNet step 256² (batch 1)", "unet_step_256_s", ".2f"), ("VAE decode 512²", "vae_decode_512_s", ".2f")]
print("| operation | kiln rounds (s) | PyTorch rounds (s) | median kiln / PyTorch |")
print("|---|---|---|---|")
for label, key, fmt in rows:
    k, t = med(kiln, key), med(torch, key)
    print(f"| {label} | {each(kiln, key, fmt)} | {each(torch, key, fmt)} | {k:{fmt}} / {t:{fmt}} = **{k / t:.2f}×** |")
k, t = max(r["peak_rss_gb"] for r in kiln), max(r["peak_rss_gb"] for r in torch)
print(f"| peak RSS (model loaded, 512² VAE decode) | {k:.2f} GB | {t:.2f} GB | **{k / t:.2f}×** |")
print()
print("One 512² UNet step by operation, median seconds over the rounds (PyTorch: profiler self time):")
print()
ops = ["convolutions", "linear", "attention", "GEGLU", "norms", "other"]
print("| | " + " | ".join(ops) + " |")
print("|---" * (len(ops) + 1) + "|")
for name, runs in (("kiln", kiln), ("PyTorch", torch)):
    cells = [statistics.median(r["unet_512_profile_s"].get(op, 0.0) for r in runs) for op in ops]
    print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
print()


def image(runs, steps, passes, prompts):
    return prompts * med(runs, "text_encode_s") + steps * passes * med(runs, "unet_step_512_s") + med(
        runs, "vae_decode_512_s")


for name, runs in (("kiln", kiln), ("PyTorch", torch)):
    lcm = image(runs, 4, 1, 1)
    euler = image(runs, 25, 2, 2)
    print(f"{name}, from the parts: LCM 4 steps CFG 1 ≈ {lcm:.1f} s, Euler a 25 steps CFG 7.5 ≈ {euler:.0f} s "
          f"(batch 2 counted as two batch-1 steps) → LCM {euler / lcm:.1f}× faster")
