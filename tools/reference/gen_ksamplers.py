"""Fixture 12: k-diffusion samplers (Euler, Euler a, Heun, DPM++ 2M, DPM++ 2S a) on tiny-sd15, as A1111 runs them.

Writes `ksamplers.json` (schedules + run index), `ksamplers.safetensors` (latents after every step) and one
`ksampler_<run>.png` per run. It mirrors AUTOMATIC1111's webui (k-diffusion samplers, "CPU" RNG source,
quantization off), using k-diffusion 0.1.1.post1 itself (`k_diffusion.sampling`, `k_diffusion.external`):

- Model: tiny-sd15 loaded in float32 (gen_expected.load_models). Everything is float32 on CPU.
- Denoiser: `DiscreteEpsDDPMDenoiser(unet, alphas_cumprod, quantize=False)`, alphas_cumprod = the float32 tensor
  diffusers computes for the SD1.5 scheduler config (scaled_linear 0.00085..0.012, 1000 steps), so
  sigmas = sqrt((1 - ac) / ac) (float32). For a batch x at sigma (1-D, batch length) it returns
      denoised = x + eps * c_out,  eps = UNet(x * c_in, t, encoder_hidden_states=cond).sample,
      c_in = 1 / sqrt(sigma^2 + 1), c_out = -sigma, t = sigma_to_t(sigma)
  where sigma_to_t is the fractional timestep from linear interpolation in log-sigma (float32, not rounded).
- Schedules (A1111): normal = `denoiser.get_sigmas(steps)` (t = linspace(999, 0, steps) -> sigma by log-sigma
  interpolation); karras = `get_sigmas_karras(steps, sigma_min, sigma_max, rho=7)` with the model's smallest and
  largest sigma. Both end with an appended 0.
- Text: the prompt (and at cfg > 1 the negative prompt) through CLIPTokenizer (77 tokens, EOS padding) and
  CLIPTextModel's last_hidden_state, as diffusers' StableDiffusionPipeline does.
- CFG (A1111's CFGDenoiser): cfg <= 1: one UNet pass with the prompt only, denoised = model(x, sigma, cond).
  cfg > 1: ONE batch of 2 in the order [cond, uncond] (x and sigma repeated), then, on the DENOISED outputs
      denoised = d_uncond + (d_cond - d_uncond) * cfg.
- Noise: g = Generator("cpu").manual_seed(seed); x = randn([1,4,8,8], g) * sigmas[0]. The ancestral samplers
  (euler_a, dpmpp_2s_a) draw each step's noise as randn([1,4,8,8], g), continuing the same generator, only when
  sigmas[i+1] > 0 (so an n-step run makes n-1 draws after the initial one). Euler/Heun draw an unused churn term
  (s_churn = 0) with torch.randn_like on torch's global RNG; that never touches g.
- Samplers: k-diffusion's sample_euler, sample_euler_ancestral, sample_heun, sample_dpmpp_2m,
  sample_dpmpp_2s_ancestral with their defaults (eta = 1, s_noise = 1, s_churn = 0).
- Recorded: run/<name>/step<i>/latents = x AFTER step i (the last is the sampler's return value). The PNG decodes
  that last latent as gen_expected does: vae.decode(x / 0.18215), round(clamp(d/2+0.5, 0, 1) * 255) as RGB8.

k-diffusion is installed with --no-deps (its package __init__ pulls in clean-fid, wandb, kornia, ...): only its
`sampling`/`external`/`utils` modules are imported, under a bare `k_diffusion` package object.
"""

import importlib.metadata
import importlib.util
import os
import sys
import types

import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import EulerDiscreteScheduler

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json
from gen_expected import encode, load_models, to_uint8

# Import k_diffusion.sampling / .external without running k_diffusion/__init__.py.
_spec = importlib.util.find_spec("k_diffusion")
_pkg = types.ModuleType("k_diffusion")
_pkg.__path__ = list(_spec.submodule_search_locations)
sys.modules["k_diffusion"] = _pkg
import k_diffusion.external as kext  # noqa: E402
import k_diffusion.sampling as ksamp  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SCHEDULE_STEPS = [1, 2, 3, 4, 6, 8, 20, 30]
METHODS = {  # kiln name -> k-diffusion sampler
    "euler": ksamp.sample_euler,
    "euler_a": ksamp.sample_euler_ancestral,
    "heun": ksamp.sample_heun,
    "dpmpp_2m": ksamp.sample_dpmpp_2m,
    "dpmpp_2s_a": ksamp.sample_dpmpp_2s_ancestral,
}
ANCESTRAL = {"euler_a", "dpmpp_2s_a"}
RUN_STEPS = [3, 6]
CFGS = {1.0: (42, ""), 2.5: (1234, "blurry, low quality")}  # cfg -> (seed, negative prompt)
SHAPE = [1, 4, 8, 8]  # 64x64 image


class Denoiser(kext.DiscreteEpsDDPMDenoiser):
    """k-diffusion's eps wrapper around the diffusers UNet (t: float32 fractional timesteps, one per batch item)."""

    def get_eps(self, x_in, t, cond):
        return self.inner_model(x_in, t, encoder_hidden_states=cond).sample


def cfg_model(denoiser, cond, uncond, cfg):
    """A1111's CFGDenoiser: the callable a k-diffusion sampler gets as `model`."""
    def model(x, sigma):
        if cfg <= 1.0:
            return denoiser(x, sigma, cond=cond)
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        d_cond, d_uncond = out[:1], out[1:]  # batch order [cond, uncond]
        return d_uncond + (d_cond - d_uncond) * cfg
    return model


def schedule(denoiser, kind, steps):
    if kind == "normal":
        return denoiser.get_sigmas(steps)
    return ksamp.get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())


def main():
    setup_torch()
    torch.manual_seed(0)  # global RNG: only the unused churn draws of euler/heun use it
    unet, vae, te, tok = load_models()
    cfg_dir = os.path.join(TINY_DIR, "scheduler")
    ac = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg_dir)).alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    denoiser = Denoiser(unet, ac, quantize=False)

    schedules = {}
    for kind in ["normal", "karras"]:
        for n in SCHEDULE_STEPS:
            s = schedule(denoiser, kind, n)
            assert s.dtype == torch.float32 and s.shape == (n + 1,) and s[-1] == 0
            schedules[f"{kind}_{n}"] = {"sigmas": [f32(v) for v in s],
                                        "timesteps": [f32(v) for v in denoiser.sigma_to_t(s[:-1])]}

    embeds = {text: encode(te, tok, text)[1] for text in [PROMPT] + [neg for _, neg in CFGS.values()]}
    tensors, runs = {}, {}
    for method, sampler in METHODS.items():
        for kind in ["normal", "karras"]:
            for steps in RUN_STEPS:
                for cfg, (seed, neg) in CFGS.items():
                    name = f"{method}_{kind}_s{steps}_cfg{cfg:g}".replace(".", "p")
                    sigmas = schedule(denoiser, kind, steps)
                    g = torch.Generator("cpu").manual_seed(seed)
                    x = torch.randn(SHAPE, generator=g, dtype=torch.float32) * sigmas[0]
                    extra, draws = {}, []
                    if method in ANCESTRAL:  # per-step noise continues g (A1111: the image's own generator)
                        def noise(s, s_next):
                            draws.append(float(s_next))
                            return torch.randn(SHAPE, generator=g, dtype=torch.float32)
                        extra["noise_sampler"] = noise
                    seen = []  # the callback sees x BEFORE step i
                    out = sampler(cfg_model(denoiser, embeds[PROMPT], embeds[neg], cfg), x, sigmas,
                                  callback=lambda d: seen.append(d["x"].clone()), disable=True, **extra)
                    assert len(seen) == steps and torch.equal(seen[0], x)
                    assert len(draws) == (steps - 1 if method in ANCESTRAL else 0)  # none in the last step
                    after = seen[1:] + [out]  # x AFTER step i
                    for i, lat in enumerate(after):
                        assert lat.dtype == torch.float32 and list(lat.shape) == SHAPE and torch.isfinite(lat).all()
                        tensors[f"run/{name}/step{i}/latents"] = lat.contiguous()
                    png = f"ksampler_{name}.png"
                    u8 = to_uint8(vae.decode(out / vae.config.scaling_factor).sample)
                    Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
                    runs[name] = {"method": method, "schedule": kind, "steps": steps, "cfg": cfg, "seed": seed,
                                  "prompt": PROMPT, "negative_prompt": neg, "png": png}
                    print(f"{name}: max|x| {out.abs().max().item():.4f}", file=sys.stderr)

    save_file(tensors, os.path.join(FIXTURES, "ksamplers.safetensors"), metadata={"format": "pt"})
    write_json("ksamplers.json", {
        "versions": {**versions(), **{p: importlib.metadata.version(p) for p in ["k-diffusion", "scipy", "torchsde",
                                                                                  "torchdiffeq"]}},
        "notes": "See tools/reference/gen_ksamplers.py's docstring. CFG batch order [cond, uncond]; combined on "
                 "denoised outputs. run/<name>/step<i>/latents = x after step i, [1,4,8,8] f32.",
        "schedules": schedules,
        "runs": runs,
    })


if __name__ == "__main__":
    main()
