"""Fixture: A1111's "DPM++ SDE" (k-diffusion `sample_dpmpp_sde`) rendering tiny-sd15, in gen_ksamplers.py's layout.

Writes `dpmpp_sde_renders.json` (schedules + run index), `dpmpp_sde_renders.safetensors` (latents after every step)
and one `dpmpp_sde_<run>.png` per run, exactly as gen_ksamplers.py lays out `ksamplers.*`:

- Model, denoiser, text, CFG (batch [cond, uncond], combined on the denoised outputs), schedules (normal =
  `get_sigmas`, karras = `get_sigmas_karras(n, sigma_min, sigma_max)`), initial noise
  (x = randn([1,4,8,8], Generator("cpu").manual_seed(seed)) * sigmas[0]) and PNG decoding: gen_ksamplers.py's.
- Sampler: k-diffusion 0.1.1.post1's `sample_dpmpp_sde` with its defaults (eta 1, s_noise 1, r 1/2).
- Noise: A1111's `create_noise_sampler` (modules/sd_samplers_kdiffusion.py), as gen_dpmpp_sde.py describes:
      BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
  built on the initial x, one torchsde 0.2.6 BrownianTree (entropy = the image seed). The image generator g makes
  no draw after the initial noise. Every run is done twice: once with gen_dpmpp_sde.recording_sampler (which also
  re-queries the tree) and once with the bare A1111 sampler; the script asserts both give identical latents.
- Runs (8): schedule {normal, karras} x steps {3, 6} x cfg {1 (seed 42, negative ""), 2.5 (seed 1234, negative
  "blurry, low quality")}, named `dpmpp_sde_<schedule>_s<steps>_cfg<1|2p5>` minus the `dpmpp_sde_` prefix.
  Each step calls the UNet twice (at sigma_i and at the midpoint sigma), except the last (sigma_next = 0: one
  Euler step, no noise query); each other step makes two noise queries, (sigma_i, s) and (sigma_i, sigma_{i+1}).
- Recorded: run/<name>/step<i>/latents = x AFTER step i, [1,4,8,8] f32 (the last is the sampler's return value).
"""

import importlib.metadata
import os
import sys

import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import save_file

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json
from gen_dpmpp_sde import recording_sampler
from gen_expected import encode, load_models, to_uint8
from gen_ksamplers import CFGS, PROMPT, RUN_STEPS, SHAPE, Denoiser, cfg_model, ksamp, schedule


def a1111_noise_sampler(x, sigmas, seed):
    """A1111's create_noise_sampler for one image, with nothing wrapped around it."""
    return ksamp.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])


def render(model, sigmas, seed, noise_sampler_fn):
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float32) * sigmas[0]
    seen = []  # the callback sees x BEFORE step i
    out = ksamp.sample_dpmpp_sde(model, x, sigmas, callback=lambda d: seen.append(d["x"].clone()), disable=True,
                                 noise_sampler=noise_sampler_fn(x))
    assert len(seen) == len(sigmas) - 1 and torch.equal(seen[0], x)
    return seen[1:] + [out]  # x AFTER step i


def main():
    setup_torch()
    torch.manual_seed(0)  # global RNG: nothing here should use it
    unet, vae, te, tok = load_models()
    ac = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(os.path.join(TINY_DIR, "scheduler"))).alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    denoiser = Denoiser(unet, ac, quantize=False)

    schedules = {}
    for kind in ["normal", "karras"]:
        for n in RUN_STEPS:
            s = schedule(denoiser, kind, n)
            assert s.dtype == torch.float32 and s.shape == (n + 1,) and s[-1] == 0
            schedules[f"{kind}_{n}"] = {"sigmas": [f32(v) for v in s],
                                        "timesteps": [f32(v) for v in denoiser.sigma_to_t(s[:-1])]}

    embeds = {text: encode(te, tok, text)[1] for text in [PROMPT] + [neg for _, neg in CFGS.values()]}
    tensors, runs = {}, {}
    for kind in ["normal", "karras"]:
        for steps in RUN_STEPS:
            for cfg, (seed, neg) in CFGS.items():
                name = f"{kind}_s{steps}_cfg{cfg:g}".replace(".", "p")
                sigmas = schedule(denoiser, kind, steps)
                model = cfg_model(denoiser, embeds[PROMPT], embeds[neg], cfg)
                log = []
                after = render(model, sigmas, seed, lambda x: recording_sampler(x, sigmas, [seed], log))
                assert len(log) == 2 * (steps - 1)  # two queries per step but the last
                bare = render(model, sigmas, seed, lambda x: a1111_noise_sampler(x, sigmas, seed))
                assert all(torch.equal(a, b) for a, b in zip(after, bare))
                for i, lat in enumerate(after):
                    assert lat.dtype == torch.float32 and list(lat.shape) == SHAPE and torch.isfinite(lat).all()
                    tensors[f"run/{name}/step{i}/latents"] = lat.contiguous()
                out = after[-1]
                png = f"dpmpp_sde_{name}.png"
                u8 = to_uint8(vae.decode(out / vae.config.scaling_factor).sample)
                Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
                runs[name] = {"method": "dpmpp_sde", "schedule": kind, "steps": steps, "cfg": cfg, "seed": seed,
                              "prompt": PROMPT, "negative_prompt": neg, "png": png}
                print(f"{name}: max|x| {out.abs().max().item():.4f}", file=sys.stderr)

    save_file(tensors, os.path.join(FIXTURES, "dpmpp_sde_renders.safetensors"), metadata={"format": "pt"})
    write_json("dpmpp_sde_renders.json", {
        "versions": {**versions(), **{p: importlib.metadata.version(p) for p in ["k-diffusion", "torchsde",
                                                                                  "trampoline", "scipy"]}},
        "notes": "See tools/reference/gen_dpmpp_sde_renders.py's docstring. sample_dpmpp_sde (eta 1, s_noise 1, "
                 "r 1/2) with A1111's BrownianTreeNoiseSampler(x, min nonzero sigma, max sigma, seed=[seed]). "
                 "CFG batch order [cond, uncond]; combined on denoised outputs. run/<name>/step<i>/latents = x "
                 "after step i, [1,4,8,8] f32.",
        "schedules": schedules,
        "runs": runs,
    })


if __name__ == "__main__":
    main()
