"""Fixture 16: diffusers' DDIM, UniPC (multistep) and TCD samplers on tiny-sd15.

Writes `diffusers_samplers.json` (timestep tables + run index), `diffusers_samplers.safetensors` (every tensor each
scheduler step saw and produced) and one `diffusers_sampler_<run>.png` per run.

- Schedulers: `DDIMScheduler`, `UniPCMultistepScheduler` and `TCDScheduler`, each built with
  `from_config(SD1.5 scheduler config)` (common.SD15_SCHEDULER_CONFIG: PNDM keys, set_alpha_to_one=False,
  steps_offset=1, clip_sample=False, no timestep_spacing key). So each keeps its own class default for the keys
  SD1.5 does not set: DDIM and TCD spacing "leading" (TCD ignores it), UniPC spacing "linspace", solver_order 2,
  solver_type "bh2", predict_x0 True, lower_order_final True, disable_corrector [], final_sigmas_type "zero".
- Timestep tables: `set_timesteps(n)` for n in SCHEDULE_STEPS (UniPC also its sigmas; TCD also, per step,
  timestep_s = floor((1 - gamma) * prev_timestep) for gamma 0.3, evaluated with torch as TCDScheduler.step does).
- Renders: diffusers' `StableDiffusionPipeline` (tiny-sd15 in float32, 64x64, `output_type="np"`), seed 42
  (`generator=Generator("cpu").manual_seed(42)`), prompt PROMPT; at cfg 2.5 the negative prompt NEGATIVE (CFG batch
  [uncond, cond], eps_u + g (eps_c - eps_u)); at cfg 1 one UNet pass and no negative prompt. `eta` is passed to the
  pipeline, which forwards it to `scheduler.step` (DDIM's eta; TCD's `eta` is its gamma). NOTE: the pipeline's own
  `eta` default (0.0) overrides TCDScheduler.step's default 0.3, so a TCD render with gamma 0.3 must pass eta=0.3.
- Recorded per run (tensor names `run/<name>/...`, all [1,4,8,8] float32):
    initial_latents     randn([1,4,8,8], g) * init_noise_sigma (1.0 for all three), drawn first
    step<i>/sample      the sample passed to scheduler.step (initial_latents, then the previous step's latents)
    step<i>/model_output the (guided) eps passed to scheduler.step
    step<i>/latents     prev_sample (= callback_on_step_end latents)
    step<i>/x0          DDIM: pred_original_sample; UniPC: convert_model_output(...) (predicted x0); TCD: absent
    step<i>/pred_noised TCD only: pred_noised_sample
    noise<k>            the k-th randn_tensor the scheduler drew (run index: noise_draws, with the step index)
  and the final PNG: vae.decode(latents / 0.18215), round(clamp(d/2+0.5, 0, 1) * 255) as RGB8.
"""

import functools
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.schedulers.scheduling_ddim as ddim_mod
import diffusers.schedulers.scheduling_tcd as tcd_mod
import diffusers.schedulers.scheduling_unipc_multistep as unipc_mod
from diffusers import DDIMScheduler, StableDiffusionPipeline, TCDScheduler, UniPCMultistepScheduler

from common import FIXTURES, SD15_SCHEDULER_CONFIG, f32, setup_torch, versions, write_json
from gen_expected import load_models, to_uint8

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SEED = 42
SCHEDULE_STEPS = [1, 4, 6, 20]
RUN_STEPS = [4, 6]
CFGS = [1.0, 2.5]
TCD_GAMMA = 0.3
SHAPE = [1, 4, 8, 8]
SCHEDULERS = {  # kiln method -> (class, module whose randn_tensor the step calls, step parameter name for eta)
    "ddim": (DDIMScheduler, ddim_mod, "eta"),
    "unipc": (UniPCMultistepScheduler, unipc_mod, None),  # draws no noise: its module has no randn_tensor
    "tcd": (TCDScheduler, tcd_mod, "gamma"),
}


def make(method):
    return SCHEDULERS[method][0].from_config(SD15_SCHEDULER_CONFIG)


def tcd_timestep_s(timesteps, gamma):
    """TCDScheduler.step's timestep_s for each step, computed as it does (prev_timestep 0 after the last step)."""
    out = []
    for i in range(len(timesteps)):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else torch.tensor(0)
        out.append(int(torch.floor((1 - gamma) * prev).to(dtype=torch.long)))
    return out


def schedule_tables():
    tables = {}
    for method in SCHEDULERS:
        tables[method] = {}
        for n in SCHEDULE_STEPS:
            s = make(method)
            s.set_timesteps(n)
            entry = {"timesteps": [int(t) for t in s.timesteps]}
            if method == "unipc":
                assert s.sigmas.dtype == torch.float32 and len(s.sigmas) == n + 1
                entry["sigmas"] = [f32(v) for v in s.sigmas]
            if method == "tcd":
                entry[f"timestep_s_gamma{TCD_GAMMA:g}"] = tcd_timestep_s(s.timesteps, TCD_GAMMA)
            tables[method][str(n)] = entry
    return tables


class Recorder:
    """Wraps one scheduler's step (and UniPC's convert_model_output) and its module's randn_tensor."""

    def __init__(self, sched, module):
        self.sched, self.module = sched, module
        self.steps, self.noise, self.x0 = [], [], []

    def __enter__(self):
        orig_step, orig_randn = self.sched.step, getattr(self.module, "randn_tensor", None)
        self._orig = (orig_step, orig_randn)

        # functools.wraps keeps inspect.signature(step), so the pipeline still passes eta=/generator= where the
        # scheduler accepts them (prepare_extra_step_kwargs inspects the signature).
        @functools.wraps(orig_step)
        def step(model_output, timestep, sample, *a, **kw):
            out = orig_step(model_output, timestep, sample, *a, **kw)
            out = out if isinstance(out, tuple) else tuple(out.values())
            self.steps.append({"timestep": int(timestep), "sample": sample.clone(),
                               "model_output": model_output.clone(), "prev": out[0].clone(),
                               "second": out[1].clone() if len(out) > 1 else None, "kwargs": sorted(kw)})
            return out

        def randn(*a, **kw):
            t = orig_randn(*a, **kw)
            self.noise.append((len(self.steps), t.clone()))
            return t

        self.sched.step = step
        if orig_randn is not None:
            self.module.randn_tensor = randn
        if isinstance(self.sched, UniPCMultistepScheduler):
            orig_convert = self.sched.convert_model_output

            def convert(*a, **kw):
                x0 = orig_convert(*a, **kw)
                self.x0.append(x0.clone())
                return x0

            self.sched.convert_model_output = convert
        return self

    def __exit__(self, *exc):
        self.sched.step = self._orig[0]
        if self._orig[1] is not None:
            self.module.randn_tensor = self._orig[1]
        self.sched.__dict__.pop("convert_model_output", None)


def render(models, method, steps, cfg, eta, name, tensors):
    unet, vae, te, tok = models
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=make(method),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    negative = NEGATIVE if cfg > 1 else None
    seen = []

    def cb(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return {}

    g = torch.Generator("cpu").manual_seed(SEED)
    with Recorder(pipe.scheduler, SCHEDULERS[method][1]) as rec:
        out = pipe(prompt=PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                   eta=eta, height=64, width=64, generator=g, output_type="np",
                   callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    assert pipe.do_classifier_free_guidance == (cfg > 1)
    assert len(rec.steps) == steps == len(seen)
    final = seen[-1]
    decoded = vae.decode(final / vae.config.scaling_factor).sample
    u8 = to_uint8(decoded)
    assert np.array_equal(u8, (out.images * 255).round().astype("uint8")), "postprocess mismatch"
    png = f"diffusers_sampler_{name}.png"
    Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)

    # RNG order: one CPU generator; the initial latents first, then each scheduler draw in order.
    g2 = torch.Generator("cpu").manual_seed(SEED)
    init = torch.randn(SHAPE, generator=g2) * pipe.scheduler.init_noise_sigma
    assert torch.equal(init, rec.steps[0]["sample"])
    for _, z in rec.noise:
        assert torch.equal(torch.randn(SHAPE, generator=g2), z)
    tensors[f"run/{name}/initial_latents"] = init
    for i, s in enumerate(rec.steps):
        assert torch.equal(s["prev"], seen[i])
        assert i == 0 or torch.equal(s["sample"], seen[i - 1])
        tensors[f"run/{name}/step{i}/sample"] = s["sample"]
        tensors[f"run/{name}/step{i}/model_output"] = s["model_output"]
        tensors[f"run/{name}/step{i}/latents"] = s["prev"]
        if method == "ddim":
            tensors[f"run/{name}/step{i}/x0"] = s["second"]
        elif method == "unipc":
            tensors[f"run/{name}/step{i}/x0"] = rec.x0[i]
        else:
            tensors[f"run/{name}/step{i}/pred_noised"] = s["second"]
    for k, (_, z) in enumerate(rec.noise):
        tensors[f"run/{name}/noise{k}"] = z
    run = {
        "method": method,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": steps,
        "cfg": cfg,
        "seed": SEED,
        "prompt": PROMPT,
        "negative_prompt": negative or "",
        "timesteps": [s["timestep"] for s in rec.steps],
        "step_kwargs": rec.steps[0]["kwargs"],
        "noise_draws": [{"tensor": f"run/{name}/noise{k}", "drawn_in_step": n} for k, (n, _) in enumerate(rec.noise)],
        "png": png,
    }
    param = SCHEDULERS[method][2]
    if param:
        run[param] = eta
    print(f"{name}: timesteps {run['timesteps']} draws {len(rec.noise)} u8 std {u8.std():.2f}", file=sys.stderr)
    return run


def main():
    setup_torch()
    models = load_models()
    tensors, runs = {}, {}
    cases = []
    for method in SCHEDULERS:
        eta = TCD_GAMMA if method == "tcd" else 0.0
        for steps in RUN_STEPS:
            for cfg in CFGS:
                cases.append((f"{method}_s{steps}_cfg{cfg:g}".replace(".", "p"), method, steps, cfg, eta))
    cases.append(("ddim_eta0p5_s6_cfg2p5", "ddim", 6, 2.5, 0.5))
    for name, method, steps, cfg, eta in cases:
        runs[name] = render(models, method, steps, cfg, eta, name, tensors)
    for k, v in tensors.items():
        assert v.dtype == torch.float32 and list(v.shape) == SHAPE and torch.isfinite(v).all(), k
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(FIXTURES, "diffusers_samplers.safetensors"), metadata={"format": "pt"})
    write_json("diffusers_samplers.json", {
        "versions": versions(),
        "notes": "See tools/reference/gen_diffusers_samplers.py's docstring. Schedulers from_config(SD1.5 config). "
                 "run/<name>/step<i>/{sample,model_output,latents,x0|pred_noised}, noise<k>: [1,4,8,8] f32.",
        "config": SD15_SCHEDULER_CONFIG,
        "scheduler_defaults": {
            "ddim": {k: make("ddim").config[k] for k in ["timestep_spacing", "steps_offset", "set_alpha_to_one",
                                                          "clip_sample"]},
            "unipc": {k: make("unipc").config[k] for k in ["timestep_spacing", "solver_order", "solver_type",
                                                           "predict_x0", "lower_order_final", "disable_corrector",
                                                           "final_sigmas_type", "use_karras_sigmas"]},
            "tcd": {k: make("tcd").config[k] for k in ["original_inference_steps", "set_alpha_to_one",
                                                       "timestep_scaling"]},
        },
        "schedules": schedule_tables(),
        "runs": runs,
    })


if __name__ == "__main__":
    main()
