"""Fixture 3: schedulers.json -- LCMScheduler and EulerAncestralDiscreteScheduler reference values.

Both schedulers are built with from_config(SD1.5 scheduler config) exactly as a user does after loading SD1.5
(so LCM inherits set_alpha_to_one=False, steps_offset=1; Euler a gets its default timestep_spacing "linspace").

Synthetic sampler runs (no UNet), latents [1,4,8,8]:
    g = torch.Generator("cpu").manual_seed(1234)
    latents = torch.randn([1,4,8,8], generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input  = scheduler.scale_model_input(latents, t)      # identity for LCM
        model_output = 0.5 * tanh(model_input) + 0.01 * t / 1000     # fake eps, all float32
        latents, denoised = scheduler.step(model_output, t, latents, generator=g)
Each noise tensor the scheduler draws (through diffusers.utils.torch_utils.randn_tensor) is recorded too, in the
order drawn, with the step it was drawn in.
"""

import sys

import numpy as np
import torch

import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod
import diffusers.schedulers.scheduling_lcm as lcm_mod
from diffusers import EulerAncestralDiscreteScheduler, LCMScheduler

from common import SD15_SCHEDULER_CONFIG, f32, flat, setup_torch, tensor_json, versions, write_json

SEED = 1234
SHAPE = [1, 4, 8, 8]


def fake_eps(model_input, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return (0.5 * torch.tanh(model_input) + 0.01 * t / 1000.0).to(torch.float32)


class NoiseRecorder:
    """Wraps randn_tensor inside a scheduler module so every noise draw is recorded."""

    def __init__(self, module):
        self.module = module
        self.orig = module.randn_tensor
        self.draws = []
        self.current_step = None

    def __enter__(self):
        def wrapped(*args, **kwargs):
            out = self.orig(*args, **kwargs)
            self.draws.append((self.current_step, out.clone()))
            return out

        self.module.randn_tensor = wrapped
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.orig


def lcm_section():
    sched = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert sched.config.original_inference_steps == 50
    timesteps = {}
    for n in range(1, 51):
        sched.set_timesteps(n)
        timesteps[str(n)] = [int(t) for t in sched.timesteps]
    boundary = {}
    for n in (4, 8):
        sched.set_timesteps(n)
        rows = []
        for t in sched.timesteps:
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            rows.append({"timestep": int(t), "c_skip": f32(c_skip), "c_out": f32(c_out)})
        boundary[str(n)] = rows
    return sched, timesteps, boundary


def run_lcm(steps=4):
    sched = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(SEED)
    latents0 = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    latents = latents0 * sched.init_noise_sigma
    records = []
    with NoiseRecorder(lcm_mod) as rec:
        for i, t in enumerate(sched.timesteps):
            rec.current_step = i
            model_input = sched.scale_model_input(latents, t)
            assert torch.equal(model_input, latents)
            eps = fake_eps(model_input, t)
            prev, denoised = sched.step(eps, t, latents, generator=g, return_dict=False)
            a_t = sched.alphas_cumprod[int(t)]
            prev_t = sched.timesteps[i + 1] if i + 1 < steps else t
            a_prev = sched.alphas_cumprod[int(prev_t)]
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            records.append(
                {
                    "step_index": i,
                    "timestep": int(t),
                    "prev_timestep": int(prev_t),
                    "alpha_prod_t": f32(a_t),
                    "alpha_prod_t_prev": f32(a_prev),
                    "c_skip": f32(c_skip),
                    "c_out": f32(c_out),
                    "sample_in": tensor_json(latents),
                    "model_output": tensor_json(eps),
                    "denoised": tensor_json(denoised),
                    "prev_sample": tensor_json(prev),
                    "noise_drawn": any(s == i for s, _ in rec.draws),
                }
            )
            latents = prev
    noise = [{"step_index": s, **tensor_json(n)} for s, n in rec.draws]
    # Re-derive the draw order independently: one generator, latents then one randn per non-final step.
    g2 = torch.Generator("cpu").manual_seed(SEED)
    assert torch.equal(torch.randn(SHAPE, generator=g2), latents0)
    for s, n in rec.draws:
        assert torch.equal(torch.randn(SHAPE, generator=g2), n)
    assert [s for s, _ in rec.draws] == list(range(steps - 1)), [s for s, _ in rec.draws]
    return {
        "steps": steps,
        "seed": SEED,
        "shape": SHAPE,
        "init_noise_sigma": f32(sched.init_noise_sigma),
        "initial_noise": tensor_json(latents0),
        "initial_latents": tensor_json(latents0 * sched.init_noise_sigma),
        "noise_draws": noise,
        "steps_detail": records,
        "final_latents": tensor_json(latents),
        "rng_order": "g=Generator('cpu').manual_seed(1234); latents=randn([1,4,8,8],g)*init_noise_sigma(=1.0); "
        "step i (0-based) of N draws z=randn([1,4,8,8],g) AFTER computing denoised, only when i != N-1: "
        "prev = sqrt(a_prev)*denoised + sqrt(1-a_prev)*z; the last step returns prev = denoised and draws nothing.",
    }


def euler_a_section():
    sched = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    out = {"timestep_spacing": sched.config.timestep_spacing, "by_steps": {}}
    for n in (4, 6, 20, 25):
        sched.set_timesteps(n)
        out["by_steps"][str(n)] = {
            "timesteps": [f32(t) for t in sched.timesteps],
            "sigmas": [f32(s) for s in sched.sigmas],
            "init_noise_sigma": f32(sched.init_noise_sigma),
        }
    return out


def run_euler_a(steps=6):
    sched = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(SEED)
    latents0 = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    init_sigma = sched.init_noise_sigma
    latents = latents0 * init_sigma
    records = []
    with NoiseRecorder(ea_mod) as rec:
        for i, t in enumerate(sched.timesteps):
            rec.current_step = i
            model_input = sched.scale_model_input(latents, t)
            eps = fake_eps(model_input, t)
            sigma = sched.sigmas[i]
            sigma_to = sched.sigmas[i + 1]
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            prev, x0 = sched.step(eps, t, latents, generator=g, return_dict=False)
            records.append(
                {
                    "step_index": i,
                    "timestep": f32(t),
                    "sigma": f32(sigma),
                    "sigma_next": f32(sigma_to),
                    "sigma_up": f32(sigma_up),
                    "sigma_down": f32(sigma_down),
                    "sample_in": tensor_json(latents),
                    "sample_in_scaled": tensor_json(model_input),
                    "model_output": tensor_json(eps),
                    "pred_original_sample": tensor_json(x0),
                    "prev_sample": tensor_json(prev),
                    "noise_drawn": any(s == i for s, _ in rec.draws),
                }
            )
            latents = prev
    noise = [{"step_index": s, **tensor_json(n)} for s, n in rec.draws]
    g2 = torch.Generator("cpu").manual_seed(SEED)
    assert torch.equal(torch.randn(SHAPE, generator=g2), latents0)
    for s, n in rec.draws:
        assert torch.equal(torch.randn(SHAPE, generator=g2), n)
    assert [s for s, _ in rec.draws] == list(range(steps)), [s for s, _ in rec.draws]
    return {
        "steps": steps,
        "seed": SEED,
        "shape": SHAPE,
        "init_noise_sigma": f32(init_sigma),
        "initial_noise": tensor_json(latents0),
        "initial_latents": tensor_json(latents),
        "noise_draws": noise,
        "steps_detail": records,
        "final_latents": tensor_json(latents),
        "rng_order": "g=Generator('cpu').manual_seed(1234); latents=randn([1,4,8,8],g)*init_noise_sigma "
        "(= sigmas.max() = sigma at t=999 for timestep_spacing 'linspace'); EVERY step (including the last, where "
        "sigma_up = 0) draws z=randn([1,4,8,8],g) after the Euler update: model_input = sample/sqrt(sigma^2+1); "
        "x0 = sample - sigma*eps; d = (sample-x0)/sigma; prev = sample + d*(sigma_down-sigma) + z*sigma_up with "
        "sigma_up = sqrt(s_next^2 (s^2 - s_next^2)/s^2), sigma_down = sqrt(s_next^2 - sigma_up^2).",
    }


def main():
    setup_torch()
    sched, lcm_timesteps, boundary = lcm_section()
    ac = sched.alphas_cumprod
    assert ac.dtype == torch.float32 and ac.numel() == 1000
    doc = {
        "description": "diffusers scheduler references for the SD1.5 config. fake eps formula: "
        "model_output = 0.5*tanh(model_input) + 0.01*t/1000 (float32; model_input = scale_model_input(sample, t)).",
        "versions": versions(),
        "config": SD15_SCHEDULER_CONFIG,
        "lcm_config": {k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
        "lcm_timesteps": lcm_timesteps,
        "lcm_boundary": boundary,
        "lcm_final_alpha_cumprod": f32(sched.final_alpha_cumprod),
        "alphas_cumprod": flat(ac)[1],
        "betas": flat(sched.betas)[1],
        "euler_a": euler_a_section(),
        "lcm_run": run_lcm(4),
        "euler_a_run": run_euler_a(6),
    }
    write_json("schedulers.json", doc)


if __name__ == "__main__":
    main()
