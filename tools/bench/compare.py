"""Prints the Markdown table for BENCHMARKS.md from the two JSON lines of tools/bench/run.sh."""

import json
import sys

kiln = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
torch = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])

rows = [("text encode (77 tokens)", "text_encode_s"), ("UNet step 512² (batch 1)", "unet_step_512_s"),
        ("UNet step 256² (batch 1)", "unet_step_256_s"), ("VAE decode 512²", "vae_decode_512_s")]
print("| operation | kiln (candle) s | diffusers (PyTorch) s | kiln / PyTorch |")
print("|---|---|---|---|")
for label, key in rows:
    print(f"| {label} | {kiln[key]:.3f} | {torch[key]:.3f} | {kiln[key] / torch[key]:.2f}× |")
print(f"| peak RSS | {kiln['peak_rss_gb']:.2f} GB | {torch['peak_rss_gb']:.2f} GB | |")
print()
print("Per-operation profile of one 512² UNet step (seconds; PyTorch: profiler self time):")
print()
print("| op | kiln | PyTorch |")
print("|---|---|---|")
for op in ["convolutions", "linear", "attention", "GEGLU", "norms", "other"]:
    print(f"| {op} | {kiln['unet_512_profile_s'].get(op, 0):.2f} | {torch['unet_512_profile_s'].get(op, 0):.2f} |")
print()


def image(e, steps, passes, prompts):
    return prompts * e["text_encode_s"] + steps * passes * e["unet_step_512_s"] + e["vae_decode_512_s"]


for name, e in (("kiln", kiln), ("PyTorch", torch)):
    lcm = image(e, 4, 1, 1)
    euler = image(e, 25, 2, 2)
    print(f"{name}: LCM 4 steps CFG 1 ≈ {lcm:.0f} s, Euler a 25 steps CFG 7.5 ≈ {euler:.0f} s "
          f"→ LCM is {euler / lcm:.1f}× faster")
