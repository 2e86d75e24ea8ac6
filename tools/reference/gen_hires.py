"""Fixture 13: A1111-style "hires fix" with a latent upscaler or the "Lanczos" image upscaler, on tiny-sd15.

Writes `hires.json` (parameters, img2img step numbers, sigma schedules), `hires.safetensors` (latents after every
step of both passes, and the upscaled latents) and two PNGs per case, `hires_<case>_first.png` (the first pass
decoded) and `hires_<case>.png` (the result); the Lanczos case also writes `hires_<case>_first_u8.png` and
`hires_<case>_resized.png` (step 2b). It follows AUTOMATIC1111's webui 1.10
(`StableDiffusionProcessingTxt2Img.sample` / `sample_hr_pass` in modules/processing.py,
`KDiffusionSampler.sample_img2img` in modules/sd_samplers_kdiffusion.py, `setup_img2img_steps` in
modules/sd_samplers_common.py, `ImageRNG` in modules/rng.py), with the defaults: "CPU" RNG source, no subseed,
eta_noise_seed_delta 0, img2img_extra_noise 0, no hires checkpoint/prompt override, batch size 1.

The denoiser, CFG wrapper, schedules and k-diffusion samplers are gen_ksamplers.py's (imported from it):

1. First pass: a txt2img render at (W, H) exactly as gen_ksamplers does it: g = Generator("cpu").manual_seed(seed),
   x = randn([1,4,H/8,W/8], g) * sigmas[0], then the sampler over sigmas = schedule(steps); the ancestral samplers
   draw their per-step noise from g (only when sigma_next > 0). Result: latents x0.
2. Latent upscale: W2 = int(W * hr_scale), H2 = int(H * hr_scale);
   x_up = torch.nn.functional.interpolate(x0, size=(H2 // 8, W2 // 8), mode=MODE, antialias=False), with
   A1111's names "Latent" -> bilinear (align_corners=False, torch's default), "Latent (nearest)" -> nearest,
   "Latent (nearest-exact)" -> nearest-exact.
2b. Image upscale instead, for the "Lanczos" upscaler (kiln `lanczos`; sample_hr_pass's `else` branch, taken when
   the upscaler is not a latent one):
   a. decoded = vae.decode(x0 / 0.18215).sample (the same decode as the PNGs; A1111's decode_latent_batch on CPU,
      .to(float32)); x = clamp((decoded + 1.0) / 2.0, 0, 1); u8 = (255. * np.moveaxis(x[0].numpy(), 0, 2))
      .astype(np.uint8), a float32 product TRUNCATED (not rounded) to 8 bits; Image.fromarray(u8) (mode "RGB").
      Saved as `hires_<case>_first_u8.png`.
   b. images.resize_image(0, image, W2, H2, upscaler_name="Lanczos") (modules/images.py): its inner resize(im, w, h)
      takes scale = max(w / im.width, h / im.height); when scale > 1 it calls UpscalerLanczos.upscale(im, scale)
      (modules/upscaler.py Upscaler.upscale): dest = int((size * scale) // 8 * 8) per axis, then up to 3 times
      do_upscale = im.resize((int(im.width * scale), int(im.height * scale)), resample=LANCZOS), stopping when the
      size did not change or reached dest (always after the first for Lanczos, since int(s * scale) >= dest); then
      im.resize(dest, LANCZOS) if the size is not dest; back in resize(), im.resize((w, h), LANCZOS) if the size is
      not (w, h). a1111_lanczos_resize() replays that chain and records every PIL call. For 64 -> 96 (x1.5) it is
      ONE call, Image.resize((96, 96), resample=LANCZOS) on the 64x64 RGB8 picture (dest = 96 = W2). (A chain of
      several calls happens when W * scale is not a multiple of 8: x1.3 on 64 gives 64->83, 83->80, 80->83.)
      Saved as `hires_<case>_resized.png`.
   c. img = np.moveaxis(np.array(resized).astype(np.float32) / 255.0, 2, 0), np.array([img]) -> torch.from_numpy
      (C-contiguous NCHW); images_tensor_to_samples: image * 2 - 1 (float32), then VAE encode. kiln's defined
      behaviour (as in gen_img2img.py) is the posterior MEAN: x_up = vae.encode(image).latent_dist.mean * 0.18215.
      A1111 samples the posterior (get_first_stage_encoding -> DiagonalGaussianDistribution.sample(), torch's global
      RNG); not reproduced. Steps 3-5 are then the same as for the latent upscalers, starting from x_up.
3. New noise: a NEW generator for the same seed at the new shape (A1111: `self.rng = ImageRNG(samples.shape[1:],
   seeds, ...)`; `noise = self.rng.next()`, whose first call is `first()`):
   g2 = Generator("cpu").manual_seed(seed); noise = randn([1,4,H2/8,W2/8], g2). The hires sampler's ancestral noise
   continues g2 (A1111's TorchHijack(p).randn_like -> p.rng.next(), and p.rng is now the new ImageRNG).
4. img2img schedule (setup_img2img_steps with steps = hr_second_pass_steps or steps, i.e. never None):
   requested = hr_steps or steps; total = int(requested / min(denoise, 0.999)); t_enc = requested - 1;
   sigmas = schedule(total) (normal: denoiser.get_sigmas(total); karras: get_sigmas_karras(total, sigma_min,
   sigma_max)); sigma_sched = sigmas[total - t_enc - 1:] (requested + 1 values, ending in 0);
   xi = x_up + noise * sigma_sched[0]; then the hires sampler runs over sigma_sched with the same conditioning
   and cfg. `denoise` is the Python double (0.6, not float32(0.6)): int(3 / 0.6) = 5 but int(3 / f32(0.6)) = 4.
5. Both the first-pass latents and the final latents are decoded as gen_expected does:
   vae.decode(x / 0.18215), round(clamp(d/2+0.5, 0, 1) * 255) as RGB8. (A1111 itself truncates: astype(uint8).)

Recorded in hires.safetensors (all float32):
  case/<name>/first/step<i>/latents   x after first-pass step i, [1,4,H/8,W/8]; the last one is x0
  case/<name>/upscaled                x_up, [1,4,H2/8,W2/8] (Lanczos: the encoded posterior mean * 0.18215)
  case/<name>/hires/noise             the first draw of g2, [1,4,H2/8,W2/8]
  case/<name>/hires/start             xi = x_up + noise * sigma_sched[0]
  case/<name>/hires/step<i>/latents   x after hires step i; the last one is the result
"""

import importlib.metadata
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import EulerDiscreteScheduler

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json
from gen_expected import encode, load_models, to_uint8
from gen_ksamplers import ANCESTRAL, METHODS, PROMPT, Denoiser, cfg_model, schedule

NEGATIVE = "blurry, low quality"
UPSCALERS = {  # kiln name -> (A1111 name, interpolate mode)
    "latent": ("Latent", "bilinear"),
    "latent_nearest": ("Latent (nearest)", "nearest"),
    "latent_nearest_exact": ("Latent (nearest-exact)", "nearest-exact"),
    "lanczos": ("Lanczos", None),  # an image upscaler: decode, PIL Lanczos resize, encode (docstring step 2b)
}
CASES = {
    "latent_bilinear": dict(method="euler_a", schedule="normal", steps=4, cfg=1.0, seed=42, negative_prompt="",
                            hr_scale=1.5, upscaler="latent", hr_steps=3, denoise=0.6),
    "latent_nearest": dict(method="dpmpp_2s_a", schedule="karras", steps=6, cfg=2.5, seed=1234,
                           negative_prompt=NEGATIVE, hr_scale=2.0, upscaler="latent_nearest", hr_steps=0,
                           denoise=0.3),
    "latent_hires_sampler": dict(method="dpmpp_2m", schedule="karras", steps=5, cfg=2.5, seed=7,
                                 negative_prompt=NEGATIVE, hr_scale=1.25, upscaler="latent", hr_steps=4,
                                 denoise=0.45, hr_method="euler", hr_schedule="normal"),
    # Seed 89: of seeds 40..99 the one whose first-pass picture keeps every value that is not clamped
    # farthest from an 8-bit truncation edge (2.1e-4 of a level; seed 42 had one at 1.5e-5), so a
    # summation-order change of ~1e-6 in the latents (another convolution) cannot flip a pixel.
    "lanczos": dict(method="euler_a", schedule="normal", steps=4, cfg=1.0, seed=89, negative_prompt="",
                    hr_scale=1.5, upscaler="lanczos", hr_steps=3, denoise=0.5),
}
WIDTH = HEIGHT = 64


def setup_img2img_steps(requested, denoise):
    """A1111's setup_img2img_steps(p, steps) with steps given (the hires pass always gives it)."""
    total = int(requested / min(denoise, 0.999)) if denoise > 0 else 0
    return total, requested - 1


def run_sampler(method, model, x, sigmas, g, shape):
    """One k-diffusion run; returns (x after each step, number of noise draws from g)."""
    extra, draws = {}, []
    if method in ANCESTRAL:
        def noise(s, s_next):
            draws.append(float(s_next))
            return torch.randn(shape, generator=g, dtype=torch.float32)
        extra["noise_sampler"] = noise
    seen = []  # the callback sees x BEFORE step i
    out = METHODS[method](model, x, sigmas, callback=lambda d: seen.append(d["x"].clone()), disable=True, **extra)
    steps = len(sigmas) - 1
    assert len(seen) == steps and torch.equal(seen[0], x)
    assert len(draws) == (steps - 1 if method in ANCESTRAL else 0)  # none in the last step (sigma_next = 0)
    after = seen[1:] + [out]
    for lat in after:
        assert lat.dtype == torch.float32 and list(lat.shape) == shape and torch.isfinite(lat).all()
    return after, len(draws)


def save_png(vae, lat, name):
    u8 = to_uint8(vae.decode(lat / vae.config.scaling_factor).sample)
    Image.fromarray(u8[0]).save(os.path.join(FIXTURES, name), format="PNG", optimize=False)
    return list(u8.shape[1:3])


def a1111_lanczos_resize(im, width, height):
    """images.resize_image(0, im, width, height, upscaler_name="Lanczos") of webui 1.10, with UpscalerLanczos.

    Returns (the resized image, the PIL resize calls made as [[in_w, in_h], [out_w, out_h]])."""
    calls = []

    def pil_resize(img, size):
        calls.append([list(img.size), list(size)])
        return img.resize(size, resample=Image.Resampling.LANCZOS)

    assert im.mode == "RGB"  # resize_image's shortcut for mode "L" (or upscaler "None") does not apply
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:
        # Upscaler.upscale(im, scale) with UpscalerLanczos.do_upscale
        dest_w, dest_h = int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8)
        for _ in range(3):
            shape = im.size
            im = pil_resize(im, (int(im.width * scale), int(im.height * scale)))
            if shape == im.size or (im.width >= dest_w and im.height >= dest_h):
                break
        if im.width != dest_w or im.height != dest_h:
            im = pil_resize(im, (int(dest_w), int(dest_h)))
    if im.width != width or im.height != height:
        im = pil_resize(im, (width, height))
    return im, calls


def image_upscale(vae, x0, w2, h2, name):
    """Docstring step 2b: decode, truncate to RGB8, A1111's Lanczos resize, encode (posterior mean * sf)."""
    sf = vae.config.scaling_factor
    decoded = vae.decode(x0 / sf).sample.to(torch.float32)
    lowres = torch.clamp((decoded + 1.0) / 2.0, min=0.0, max=1.0)
    x_sample = 255. * np.moveaxis(lowres[0].cpu().numpy(), 0, 2)
    assert x_sample.dtype == np.float32
    first_u8 = x_sample.astype(np.uint8)  # truncation, as A1111
    image = Image.fromarray(first_u8)
    resized, calls = a1111_lanczos_resize(image, w2, h2)
    assert resized.size == (w2, h2) and resized.mode == "RGB"
    if len(calls) == 1:  # x1.5 on 64: the chain is one plain PIL call
        assert resized.tobytes() == image.resize((w2, h2), resample=Image.Resampling.LANCZOS).tobytes()
    pngs = {}
    for key, img in [("first_u8_png", image), ("resized_png", resized)]:
        png = f"hires_{name}_{key[:-4]}.png"
        img.save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
        with Image.open(os.path.join(FIXTURES, png)) as back:
            assert back.convert("RGB").tobytes() == img.tobytes()
        pngs[key] = png
    arr = np.moveaxis(np.array(resized).astype(np.float32) / 255.0, 2, 0)
    pixels = torch.from_numpy(np.array([arr]))
    assert pixels.dtype == torch.float32 and pixels.is_contiguous() and list(pixels.shape) == [1, 3, h2, w2]
    x_up = vae.encode(pixels * 2 - 1).latent_dist.mean * sf
    return x_up, calls, pngs


def main():
    setup_torch()
    torch.manual_seed(0)  # global RNG: only euler's unused churn draws (s_churn = 0) touch it
    unet, vae, te, tok = load_models()
    cfg_dir = os.path.join(TINY_DIR, "scheduler")
    ac = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg_dir)).alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    denoiser = Denoiser(unet, ac, quantize=False)
    embeds = {t: encode(te, tok, t)[1] for t in [PROMPT, "", NEGATIVE]}

    tensors, cases = {}, {}
    for name, c in CASES.items():
        hr_method = c.get("hr_method", c["method"])
        hr_schedule = c.get("hr_schedule", c["schedule"])
        model = cfg_model(denoiser, embeds[PROMPT], embeds[c["negative_prompt"]], c["cfg"])

        # 1. first pass (gen_ksamplers' txt2img)
        shape = [1, 4, HEIGHT // 8, WIDTH // 8]
        sigmas = schedule(denoiser, c["schedule"], c["steps"])
        g = torch.Generator("cpu").manual_seed(c["seed"])
        x = torch.randn(shape, generator=g, dtype=torch.float32) * sigmas[0]
        first, first_draws = run_sampler(c["method"], model, x, sigmas, g, shape)
        for i, lat in enumerate(first):
            tensors[f"case/{name}/first/step{i}/latents"] = lat.contiguous()
        x0 = first[-1]

        # 2. latent upscale
        w2, h2 = int(WIDTH * c["hr_scale"]), int(HEIGHT * c["hr_scale"])
        a1111_upscaler, mode = UPSCALERS[c["upscaler"]]
        extra = {}
        if mode is None:  # 2b. image upscaler (Lanczos)
            x_up, calls, pngs = image_upscale(vae, x0, w2, h2, name)
            extra = {**pngs, "resize_calls": calls}
        else:
            x_up = torch.nn.functional.interpolate(x0, size=(h2 // 8, w2 // 8), mode=mode, antialias=False)
        hr_shape = [1, 4, h2 // 8, w2 // 8]
        assert list(x_up.shape) == hr_shape and x_up.dtype == torch.float32
        tensors[f"case/{name}/upscaled"] = x_up.contiguous()

        # 3. new generator, same seed, new shape
        g2 = torch.Generator("cpu").manual_seed(c["seed"])
        noise = torch.randn(hr_shape, generator=g2, dtype=torch.float32)

        # 4. img2img schedule and hires sampling
        requested = c["hr_steps"] or c["steps"]
        total, t_enc = setup_img2img_steps(requested, c["denoise"])
        hr_sigmas = schedule(denoiser, hr_schedule, total)
        sigma_sched = hr_sigmas[total - t_enc - 1:]
        assert len(sigma_sched) == requested + 1 and sigma_sched[-1] == 0
        xi = x_up + noise * sigma_sched[0]
        tensors[f"case/{name}/hires/noise"] = noise.contiguous()
        tensors[f"case/{name}/hires/start"] = xi.contiguous()
        hires, hr_draws = run_sampler(hr_method, model, xi, sigma_sched, g2, hr_shape)
        for i, lat in enumerate(hires):
            tensors[f"case/{name}/hires/step{i}/latents"] = lat.contiguous()

        # 5. decode both passes
        first_png, png = f"hires_{name}_first.png", f"hires_{name}.png"
        assert save_png(vae, x0, first_png) == [HEIGHT, WIDTH]
        assert save_png(vae, hires[-1], png) == [h2, w2]

        cases[name] = {
            "prompt": PROMPT, "negative_prompt": c["negative_prompt"], "seed": c["seed"], "cfg": c["cfg"],
            "width": WIDTH, "height": HEIGHT,
            "method": c["method"], "schedule": c["schedule"], "steps": c["steps"],
            "sigmas": [f32(v) for v in sigmas],
            "hr_scale": c["hr_scale"], "hr_width": w2, "hr_height": h2,
            "upscaler": c["upscaler"], "a1111_upscaler": a1111_upscaler, "interpolate_mode": mode,
            "hr_method": hr_method, "hr_schedule": hr_schedule,
            "hr_steps": c["hr_steps"], "hr_steps_effective": requested,
            "denoise": c["denoise"],  # a Python double, not float32: see the script's docstring
            "total_steps": total, "t_enc": t_enc, "sigma_sched_start": total - t_enc - 1,
            "hr_sigmas": [f32(v) for v in hr_sigmas],
            "sigma_sched": [f32(v) for v in sigma_sched],
            "first_noise_draws": first_draws, "hr_noise_draws": hr_draws,
            "first_pass_png": first_png, "png": png,
            **extra,
        }
        print(f"{name}: total {total} t_enc {t_enc} sigma_sched {[round(float(v), 4) for v in sigma_sched]} "
              f"max|x0| {x0.abs().max().item():.3f} max|x| {hires[-1].abs().max().item():.3f}", file=sys.stderr)

    save_file(tensors, os.path.join(FIXTURES, "hires.safetensors"), metadata={"format": "pt"})
    write_json("hires.json", {
        "versions": {**versions(), **{p: importlib.metadata.version(p) for p in ["k-diffusion", "scipy", "torchsde",
                                                                                  "torchdiffeq"]}},
        "notes": "See tools/reference/gen_hires.py's docstring. First pass = gen_ksamplers' txt2img; "
                 "x_up = interpolate(x0, (H2//8, W2//8), mode, antialias=False); noise = randn(hr shape) from a new "
                 "Generator seeded with the same seed (ancestral hires noise continues it); total = int(requested / "
                 "min(denoise, 0.999)) in f64, t_enc = requested - 1, sigma_sched = sigmas(total)[total - t_enc - 1:], "
                 "xi = x_up + noise * sigma_sched[0]. CFG batch [cond, uncond] combined on denoised outputs. "
                 "Upscaler lanczos (interpolate_mode null): decode x0, truncate clamp((d+1)/2,0,1)*255 to u8 "
                 "(first_u8_png), A1111 resize_image chain of PIL LANCZOS calls (resize_calls; resized_png), "
                 "x_up = vae posterior MEAN of (png/255*2-1) * 0.18215.",
        "cases": cases,
    })


if __name__ == "__main__":
    main()
