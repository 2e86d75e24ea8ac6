"""The diffusers side of the GPU comparison (tools/gpu/check.sh): what `kiln bench --json` measures,
measured the same way for diffusers' StableDiffusionPipeline in fp16 with the LCMScheduler (PyTorch SDPA
attention), on the same weights and settings; and, with --render, one image for the parity check.

Prints one JSON object per batch size with the fields of `kiln bench --json`:
images_per_s (wall time of whole pipeline calls: text encode, 4 steps, VAE decode, to uint8),
unet_ms_per_step (UNet forwards, timed with a device sync on either side, as kiln's steps end in one),
vae_ms_per_image, peak_mib (free device memory before loading minus the lowest seen, polled every 2 ms,
as kiln measures itself).

    python3 tools/gpu/bench_diffusers.py MODEL --device cuda --batch 1,8 [--size 512] [--cfg 1]
    python3 tools/gpu/bench_diffusers.py MODEL --device cuda --render 1 -o diffusers-1.png

The noise comes from torch's CPU generator seeded with each image's seed (A1111's and kiln's "CPU" RNG),
so the same seed draws the same latents as kiln on any device. `--device cpu --dtype float32` runs the same
code on the CPU (used to check this script without a GPU).
"""

import argparse
import json
import statistics
import threading
import time

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

PROMPT = "a photograph of an astronaut riding a horse"


class MemoryWatch:
    """Lowest free device memory while running (CUDA only)."""

    def __init__(self, device):
        self.device = device
        self.lowest = None
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            free, _ = torch.cuda.mem_get_info(self.device)
            self.lowest = free if self.lowest is None else min(self.lowest, free)
            time.sleep(0.002)

    def finish(self):
        self.stop = True
        self.thread.join()
        return self.lowest


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_module(module, device, sink):
    """Times every forward of `module` into `sink` (ms), with a device sync on either side."""
    forward = module.forward

    def wrapper(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        sync(device)
        sink.append((time.perf_counter() - start) * 1000)
        return out

    module.forward = wrapper


def load(args, device, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, variant=args.variant or None, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if args.lora:
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def call(pipe, args, seeds):
    return pipe(
        [PROMPT] * len(seeds),
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        height=args.size,
        width=args.size,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    ).images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--variant", default="fp16", help="weight file variant (make_sd15_random.py writes fp16; \"\" for none)")
    ap.add_argument("--lora", help="a LoRA file to fuse, e.g. an LCM-LoRA")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--batch", default="1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--render", type=int, help="render this one seed to -o instead of timing")
    ap.add_argument("-o", "--out")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    watch = MemoryWatch(device) if device.type == "cuda" else None
    start = time.perf_counter()
    pipe = load(args, device, dtype)
    load_s = time.perf_counter() - start

    with torch.inference_mode():
        if args.render is not None:
            call(pipe, args, [args.render])[0].save(args.out)
            if watch:
                watch.finish()
            return
        unet_ms, vae_ms = [], []
        timed_module(pipe.unet, device, unet_ms)
        timed_module(pipe.vae.decoder, device, vae_ms)
        rows = []
        for batch in [int(b) for b in args.batch.split(",")]:
            seeds = list(range(batch))
            call(pipe, args, seeds)  # warm-up
            walls = []
            unet_ms.clear()
            vae_ms.clear()
            for _ in range(args.reps):
                sync(device)
                t = time.perf_counter()
                call(pipe, args, seeds)
                sync(device)
                walls.append(time.perf_counter() - t)
            rows.append(
                {
                    "engine": "diffusers",
                    "device": args.device,
                    "dtype": args.dtype,
                    "size": args.size,
                    "steps": args.steps,
                    "cfg": args.cfg,
                    "batch": batch,
                    "images_per_s": batch / statistics.median(walls),
                    "unet_ms_per_step": statistics.median(unet_ms),
                    # diffusers decodes a batch in one call
                    "vae_ms_per_image": statistics.median(vae_ms) / batch,
                    "load_s": load_s,
                    "torch": torch.__version__,
                }
            )
    lowest = watch.finish() if watch else None
    peak = (before - lowest) / 2**20 if lowest is not None else None
    for row in rows:
        row["peak_mib"] = peak
        if device.type == "cuda":
            row["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(json.dumps(row))


if __name__ == "__main__":
    main()
