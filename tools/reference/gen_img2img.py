"""Fixture 15: A1111-style img2img with k-diffusion samplers, on tiny-sd15.

Writes `img2img.json` (parameters, t_enc, sigma schedules), `img2img.safetensors` (init latents, start latents and
the latents after every run step) and one `img2img_<case>.png` per case. It follows AUTOMATIC1111's webui 1.10
(`StableDiffusionProcessingImg2Img.init` / `.sample` in modules/processing.py, `KDiffusionSampler.sample_img2img`
in modules/sd_samplers_kdiffusion.py, `setup_img2img_steps` in modules/sd_samplers_common.py), with the defaults:
"CPU" RNG source, no subseed, no mask, resize mode "Just resize" on an init image that is already at the render
size, `img2img_fix_steps` off, `initial_noise_multiplier` 1.0, `img2img_extra_noise` 0, batch size 1.

The denoiser, CFG wrapper, schedules and k-diffusion samplers are gen_ksamplers.py's, and the sampling loop and PNG
writer gen_hires.py's (all imported):

1. Init image: the 8-bit RGB PNG written by gen_vae_encoder.py (`vae_encoder_a.png` 64x64 or `vae_encoder_b.png`
   96 wide x 64 high), read with PIL as RGB; image = np.float32(pixels) / 255, NCHW, then `image * 2 - 1` in float32
   (A1111: `np.array(image).astype(np.float32) / 255.0` in processing.py, `image * 2 - 1` in
   `images_tensor_to_samples`). Its values equal diffusers' `VaeImageProcessor.preprocess` bit for bit (asserted
   against vae_encoder.safetensors' `<img>/image`).
2. Encode: init_latent = vae.encode(image).latent_dist.mean * scaling_factor (0.18215; a float32 multiply by
   float32(0.18215)). kiln's DEFINED behaviour is the posterior MEAN (diffusers' `latent_dist.mode()`, i.e.
   `retrieve_latents(sample_mode="argmax")`). A1111 instead samples the posterior
   (`get_first_stage_encoding` -> `DiagonalGaussianDistribution.sample()` = mean + std * randn from torch's global
   RNG); with SD VAEs the std is negligible (real SD1.5 logvar is around -20 or below), so kiln draws nothing here.
   The image tensor is C-contiguous NCHW, as A1111 builds it (np.moveaxis, then np.repeat over the batch copies).
   diffusers' `VaeImageProcessor.preprocess` instead returns a channels-last-strided view (a numpy transpose), and
   torch's CPU conv then takes a different kernel: vae_encoder.safetensors' `<img>/mean` (encoded that way) differs
   from this mean by up to 4.8e-6 absolute (about 3e-6 of max|mean|); the script asserts it is within 1e-5 relative.
3. Steps (setup_img2img_steps with steps=None and img2img_fix_steps off): steps = the requested steps;
   t_enc = int(min(strength, 0.999) * steps) with strength the Python double as written (0.3 * 6 = 1.7999999999999998
   -> t_enc 1); sigmas = schedule(steps) (normal: denoiser.get_sigmas(steps); karras: get_sigmas_karras(steps,
   sigma_min, sigma_max, rho=7), both float32 with an appended 0); sigma_sched = sigmas[steps - t_enc - 1:], so
   t_enc + 1 sampler steps are run (t_enc + 2 values, ending in 0).
4. Noise: g = Generator("cpu").manual_seed(seed); noise = randn([1,4,H/8,W/8], g) (A1111's `self.rng.next()`, the
   ImageRNG's first call = the seed's first draw); xi = init_latent + noise * sigma_sched[0] (float32). The
   ancestral samplers (euler_a, dpmpp_2s_a) draw their per-step noise as randn([1,4,H/8,W/8], g), continuing g
   (A1111: TorchHijack.randn_like -> p.rng.next()), only when sigma_next > 0 (so t_enc draws after the first).
5. Sampling: the k-diffusion sampler (defaults eta = 1, s_noise = 1, s_churn = 0) over sigma_sched, with
   gen_ksamplers' CFG (cfg <= 1: one UNet pass with the prompt only; cfg > 1: one batch [cond, uncond], combined
   on the denoised outputs: d_uncond + (d_cond - d_uncond) * cfg).
6. The final latents are decoded as gen_expected does: vae.decode(x / 0.18215), round(clamp(d/2+0.5, 0, 1) * 255)
   as RGB8. (A1111 itself truncates: astype(uint8).)

Recorded in img2img.safetensors (all float32):
  case/<name>/init_latent      [1,4,H/8,W/8], the posterior mean already multiplied by scaling_factor
  case/<name>/noise            the first draw of g, [1,4,H/8,W/8]
  case/<name>/start            xi = init_latent + noise * sigma_sched[0]
  case/<name>/step<i>/latents  x after run step i, i in 0..t_enc+1; the last one is the result
"""

import importlib.metadata
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from diffusers import EulerDiscreteScheduler

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json
from gen_expected import encode, load_models
from gen_hires import run_sampler, save_png
from gen_ksamplers import Denoiser, PROMPT, cfg_model, schedule

CASES = {
    "euler_a_s6_d0p5": dict(init="vae_encoder_a.png", width=64, height=64, method="euler_a", schedule="normal",
                            steps=6, strength=0.5, cfg=1.0, seed=42, negative_prompt=""),
    "dpmpp_2m_karras_s5_d0p75": dict(init="vae_encoder_b.png", width=96, height=64, method="dpmpp_2m",
                                     schedule="karras", steps=5, strength=0.75, cfg=2.5, seed=1234,
                                     negative_prompt="blurry, low quality"),
    "dpmpp_2s_a_karras_s6_d0p3": dict(init="vae_encoder_a.png", width=64, height=64, method="dpmpp_2s_a",
                                      schedule="karras", steps=6, strength=0.3, cfg=2.5, seed=7,
                                      negative_prompt="blurry"),
}
VAE_ENCODER_KEY = {"vae_encoder_a.png": "a", "vae_encoder_b.png": "b"}


def setup_img2img_steps(steps, strength):
    """A1111's setup_img2img_steps(p) with steps=None and img2img_fix_steps off: (steps, t_enc)."""
    return steps, int(min(strength, 0.999) * steps)


def load_init_image(name, width, height):
    """A1111: RGB PIL image -> float32 / 255 -> NCHW -> * 2 - 1."""
    pil = Image.open(os.path.join(FIXTURES, name)).convert("RGB")
    assert pil.size == (width, height), (pil.size, width, height)
    arr = np.moveaxis(np.array(pil).astype(np.float32) / 255.0, 2, 0)[None]
    return torch.from_numpy(np.ascontiguousarray(arr)) * 2 - 1


def main():
    setup_torch()
    torch.manual_seed(0)  # global RNG: only euler's/heun's unused churn draws would touch it (none here)
    unet, vae, te, tok = load_models()
    cfg_dir = os.path.join(TINY_DIR, "scheduler")
    ac = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg_dir)).alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    denoiser = Denoiser(unet, ac, quantize=False)
    sf = vae.config.scaling_factor
    enc_ref = load_file(os.path.join(FIXTURES, "vae_encoder.safetensors"))
    embeds = {t: encode(te, tok, t)[1] for t in [PROMPT] + sorted({c["negative_prompt"] for c in CASES.values()})}

    tensors, cases = {}, {}
    for name, c in CASES.items():
        w, h = c["width"], c["height"]
        shape = [1, 4, h // 8, w // 8]

        # 1-2. init image -> posterior mean * scaling_factor
        image = load_init_image(c["init"], w, h)
        key = VAE_ENCODER_KEY[c["init"]]
        assert image.dtype == torch.float32 and torch.equal(image, enc_ref[f"{key}/image"])
        assert image.is_contiguous()  # NCHW, as A1111 builds it (see the docstring: layout changes the rounding)
        mean = vae.encode(image).latent_dist.mean
        ref_mean = enc_ref[f"{key}/mean"]  # encoded from a channels-last input: equal up to f32 rounding
        enc_diff = (mean - ref_mean).abs().max().item()
        assert enc_diff <= 1e-5 * ref_mean.abs().max().item(), enc_diff
        init_latent = mean * sf
        assert list(init_latent.shape) == shape and init_latent.dtype == torch.float32

        # 3. img2img cut of the schedule
        steps, t_enc = setup_img2img_steps(c["steps"], c["strength"])
        sigmas = schedule(denoiser, c["schedule"], steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        assert len(sigma_sched) == t_enc + 2 and sigma_sched[-1] == 0 and bool((sigma_sched[:-1] > 0).all())

        # 4. noise from the seed's generator; ancestral noise continues it
        g = torch.Generator("cpu").manual_seed(c["seed"])
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        xi = init_latent + noise * sigma_sched[0]
        assert xi.dtype == torch.float32

        # 5. sample
        model = cfg_model(denoiser, embeds[PROMPT], embeds[c["negative_prompt"]], c["cfg"])
        after, draws = run_sampler(c["method"], model, xi, sigma_sched, g, shape)
        assert len(after) == t_enc + 1

        tensors[f"case/{name}/init_latent"] = init_latent.contiguous()
        tensors[f"case/{name}/noise"] = noise.contiguous()
        tensors[f"case/{name}/start"] = xi.contiguous()
        for i, lat in enumerate(after):
            tensors[f"case/{name}/step{i}/latents"] = lat.contiguous()

        # 6. decode
        png = f"img2img_{name}.png"
        assert save_png(vae, after[-1], png) == [h, w]

        cases[name] = {
            "init": c["init"], "width": w, "height": h,
            "method": c["method"], "schedule": c["schedule"], "steps": steps,
            "strength": c["strength"],  # a Python double: t_enc = int(min(strength, 0.999) * steps) in f64
            "cfg": c["cfg"], "seed": c["seed"], "prompt": PROMPT, "negative_prompt": c["negative_prompt"],
            "t_enc": t_enc, "sigma_sched_start": steps - t_enc - 1, "run_steps": t_enc + 1,
            "sigmas": [f32(v) for v in sigmas],
            "sigma_sched": [f32(v) for v in sigma_sched],
            "noise_draws": 1 + draws,
            # max |mean - vae_encoder.safetensors' <img>/mean| (unscaled; that one was encoded channels-last)
            "vae_encoder_mean_max_abs_diff": f32(enc_diff),
            "png": png,
        }
        print(f"{name}: t_enc {t_enc} sigma_sched {[round(float(v), 4) for v in sigma_sched]} "
              f"max|init| {init_latent.abs().max().item():.3f} max|x| {after[-1].abs().max().item():.3f}",
              file=sys.stderr)

    save_file(tensors, os.path.join(FIXTURES, "img2img.safetensors"), metadata={"format": "pt"})
    write_json("img2img.json", {
        "versions": {**versions(), **{p: importlib.metadata.version(p) for p in ["k-diffusion", "scipy", "torchsde",
                                                                                  "torchdiffeq", "pillow"]}},
        "notes": "See tools/reference/gen_img2img.py's docstring. image = f32(png)/255*2-1; init_latent = "
                 "vae posterior MEAN * 0.18215 (kiln's defined behaviour; A1111 samples the posterior); "
                 "t_enc = int(min(strength, 0.999) * steps) in f64; sigma_sched = sigmas(steps)[steps - t_enc - 1:] "
                 "(t_enc + 1 steps run); noise = first randn of Generator(seed), xi = init_latent + noise * "
                 "sigma_sched[0]; ancestral noise continues that generator. CFG batch [cond, uncond] combined on "
                 "denoised outputs. case/<name>/step<i>/latents = x after run step i.",
        "scaling_factor": f32(sf),
        "cases": cases,
    })


if __name__ == "__main__":
    main()
