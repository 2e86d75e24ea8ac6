"""One whole image with diffusers, as a user runs it: the pipeline loaded from a diffusers folder,
then one LCM render (CFG 1, a single UNet pass per step), on CPU in float32 with a fixed thread
count. Prints one JSON line: seconds to load, seconds to render, and the process's peak RSS.
The kiln side of the comparison is `kiln render` (tools/bench/whole_image.sh runs both).

The folder is make_sd15_random.py's (`*.fp16.safetensors`, upcast to float32 as kiln does, and
no tokenizer): the pipeline is built from its parts, with CLIP's tokenizer from the tiny reference
model (the same vocabulary every SD1.5 model ships).

    /work/venv/bin/python tools/bench/diffusers_image.py DIR --size 512 --steps 4 --threads 2
"""

import argparse
import json
import resource
import time

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

TOKENIZER = "worker/tests/fixtures/reference/tiny-sd15/tokenizer"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    f32 = torch.float32
    part = dict(variant="fp16", torch_dtype=f32)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(args.model, subfolder="vae", **part),
        text_encoder=CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", **part),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        unet=UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", **part),
        scheduler=LCMScheduler.from_pretrained(args.model, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    loaded = time.perf_counter()
    generator = torch.Generator().manual_seed(1)
    pipe(
        "a photograph of an astronaut riding a horse",
        num_inference_steps=args.steps,
        guidance_scale=1.0,
        width=args.size,
        height=args.size,
        generator=generator,
    ).images[0].save("/dev/null", format="PNG")
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"load_s": round(loaded - start, 2), "render_s": round(done - loaded, 2),
                      "peak_rss_gb": round(peak, 2)}))


if __name__ == "__main__":
    main()
