"""The diffusers/PyTorch side of the engine benchmark (see tools/bench/README.md).

Times, on CPU in float32 with a fixed thread count, the same operations the Rust bench times: one text
encode, one UNet step (batch 1, as LCM at CFG <= 1 runs it) at 512x512 and 256x256, and one VAE decode at
512x512. Prints one JSON object. With --profile it also groups a torch.profiler trace of one 512x512 UNet step
into convolutions / attention / GEGLU / norms / linear / other.

    /work/venv/bin/python tools/bench/bench_diffusers.py /tmp/kiln-bench/sd15-random --threads 2
"""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel


def timed(fn, reps):
    fn()  # warm-up (allocations, one-time packing)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def category(name: str) -> str:
    n = name.lower()
    if "conv" in n:
        return "convolutions"
    if "scaled_dot_product" in n or "softmax" in n or "bmm" in n or "baddbmm" in n or "flash" in n:
        return "attention"
    if "gelu" in n:
        return "GEGLU"
    if "norm" in n:
        return "norms"
    if "addmm" in n or n == "aten::mm" or "linear" in n or "matmul" in n:
        return "linear"
    return "other"


def profile_unet(unet, latents, t, context):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        unet(latents, t, encoder_hidden_states=context)
    totals = {}
    for event in prof.key_averages():
        # self time, so nested ops are not double counted
        totals[category(event.key)] = totals.get(category(event.key), 0.0) + event.self_cpu_time_total / 1e6
    return totals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    f32 = torch.float32
    te = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", variant="fp16", torch_dtype=f32).eval()
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", variant="fp16", torch_dtype=f32).eval()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", variant="fp16", torch_dtype=f32).eval()

    ids = torch.tensor([[49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407] + [49407] * 67])
    out = {"engine": "diffusers", "torch": torch.__version__, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        context = te(ids).last_hidden_state
        out["text_encode_s"] = timed(lambda: te(ids), args.reps)
        t = torch.tensor(999.0)
        for size in (512, 256):
            latents = torch.randn(1, 4, size // 8, size // 8)
            out[f"unet_step_{size}_s"] = timed(lambda: unet(latents, t, encoder_hidden_states=context), args.reps)
        latents = torch.randn(1, 4, 64, 64)
        out["vae_decode_512_s"] = timed(lambda: vae.decode(latents / 0.18215), max(1, args.reps - 1))
        if args.profile:
            out["unet_512_profile_s"] = profile_unet(unet, latents, t, context)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
