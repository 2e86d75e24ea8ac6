"""Fixture: A1111's "DPM++ SDE" (k-diffusion `sample_dpmpp_sde`) and its Brownian-tree noise.

Writes `dpmpp_sde.json` (seed sequences, schedules, query lists, run index) and `dpmpp_sde.safetensors`
(noise values and latents). Uses k-diffusion 0.1.1.post1 and torchsde 0.2.6 themselves, on CPU in float32:

- Noise sampler: A1111's `create_noise_sampler` (modules/sd_samplers_kdiffusion.py):
      sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
      BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=[seed of each image])
  i.e. one `torchsde.BrownianTree(t0, w0=zeros_like(x[0]), t1, entropy=seed)` per image (tol 1e-6, pool_size 24,
  halfway_tree=True), each query answering tree(min, max) * sign / sqrt(|sigma_next - sigma|).
- seed_sequences: `numpy.random.SeedSequence(entropy, spawn_key=..., pool_size=...).generate_state(n)` for a few
  inputs, including the ones torchsde builds (root: no spawn key; node: spawn_key=(key, depth), pool 24).
- noise/<seed>: a fresh noise sampler (latent [1,4,8,8], the karras 6-step schedule of SD1.5) queried at every
  (sigma, sigma_next) pair sample_dpmpp_sde asks for, in order; recorded by running the sampler with the toy
  denoiser below and wrapping the noise sampler. Tensor noise/<seed>/q<k> = the k-th answer, [1,4,8,8];
  noise/<seed>/w<k> = the tree's increment before the division by sqrt(|sigma_next - sigma|) (BatchedBrownianTree).
- runs: sample_dpmpp_sde (eta 1, s_noise 1, r 1/2) with the toy denoiser
      denoised = x * scale + 0.01,  scale = f32(0.5) / (f32(1) + f32(sigma))   (scale in numpy float32)
  Initial x = cat(randn([1,4,8,8], Generator().manual_seed(seed)) for each seed) * sigmas[0].
  run/<name>/x0 = the initial x; run/<name>/step<i> = x AFTER step i; runs.<name>.queries = the noise queries.
- Sigmas: SD1.5's k-diffusion denoiser as gen_ksamplers.py builds it (normal = get_sigmas, karras =
  get_sigmas_karras(n, sigma_min, sigma_max)).
"""

import importlib.metadata
import os

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from safetensors.torch import save_file

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json
from gen_ksamplers import Denoiser, ksamp, schedule

SHAPE = [1, 4, 8, 8]
NOISE_SEEDS = [42, 2**32 + 5]
RUNS = {  # name -> (schedule, steps, seeds: one image per seed)
    "normal_6": ("normal", 6, [42]),
    "karras_6": ("karras", 6, [42, 2**32 + 5]),
}
SEED_SEQUENCES = [  # (entropy, spawn_key, pool_size, n_words)
    (42, [], 24, 3),
    (42, [0, 0], 24, 4),
    (42, [5, 3], 24, 4),
    (2**32 + 5, [], 24, 3),
    (2**32 + 5, [1, 1], 24, 4),
    (0, [], 4, 8),
    (123456789, [2**33 + 7, 40], 24, 4),
    (2**64 - 1, [3], 4, 5),
]


def toy_model(x, sigma):
    """The deterministic denoiser both languages run: x * (0.5 / (1 + sigma)) + 0.01 in float32."""
    assert x.dtype == torch.float32 and sigma.dtype == torch.float32
    scale = np.float32(0.5) / (np.float32(1.0) + np.float32(sigma[0].item()))
    assert all(s.item() == sigma[0].item() for s in sigma)
    return x * float(scale) + 0.01


def initial_x(seeds, sigma0):
    x = torch.cat([torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
                   for s in seeds])
    return x * sigma0


def recording_sampler(x, sigmas, seeds, log):
    """A1111's create_noise_sampler, with every query and answer appended to `log`."""
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    inner = ksamp.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=list(seeds))

    def sample(sigma, sigma_next):
        out = inner(sigma, sigma_next)
        assert out.dtype == torch.float32 and sigma.dtype == torch.float32 and sigma_next.dtype == torch.float32
        # The same tree queried again (same values: the cache and search start only change speed).
        w = inner.tree(sigma, sigma_next)
        assert torch.equal(out, w / (sigma_next - sigma).abs().sqrt())
        log.append((f32(sigma), f32(sigma_next), out.clone(), w.clone()))
        return out
    return sample


def run(sigmas, seeds, log):
    x = initial_x(seeds, sigmas[0])
    seen = []
    out = ksamp.sample_dpmpp_sde(toy_model, x, sigmas, disable=True, callback=lambda d: seen.append(d["x"].clone()),
                                 noise_sampler=recording_sampler(x, sigmas, seeds, log))
    assert torch.equal(seen[0], x)
    return x, seen[1:] + [out]


def main():
    setup_torch()
    ac = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(os.path.join(TINY_DIR, "scheduler"))).alphas_cumprod
    denoiser = Denoiser(None, ac, quantize=False)
    tensors, schedules = {}, {}

    seed_sequences = []
    for entropy, key, pool, n in SEED_SEQUENCES:
        ss = np.random.SeedSequence(entropy=entropy, spawn_key=tuple(key), pool_size=pool)
        seed_sequences.append({"entropy": str(entropy), "spawn_key": [str(k) for k in key], "pool_size": pool,
                               "state": [int(v) for v in ss.generate_state(n)]})

    for kind, steps in [("normal", 6), ("karras", 6)]:
        s = schedule(denoiser, kind, steps)
        assert s.dtype == torch.float32
        schedules[f"{kind}_{steps}"] = [f32(v) for v in s]

    noise = {}
    for seed in NOISE_SEEDS:
        log = []
        run(schedule(denoiser, "karras", 6), [seed], log)
        queries = []
        for k, (sigma, sigma_next, out, w) in enumerate(log):
            tensors[f"noise/{seed}/q{k}"] = out.contiguous()
            tensors[f"noise/{seed}/w{k}"] = w.contiguous()
            queries.append([sigma, sigma_next])
        noise[str(seed)] = {"schedule": "karras_6", "queries": queries}

    runs = {}
    for name, (kind, steps, seeds) in RUNS.items():
        log = []
        x0, after = run(schedule(denoiser, kind, steps), seeds, log)
        tensors[f"run/{name}/x0"] = x0.contiguous()
        for i, lat in enumerate(after):
            assert torch.isfinite(lat).all()
            tensors[f"run/{name}/step{i}"] = lat.contiguous()
        runs[name] = {"schedule": f"{kind}_{steps}", "seeds": [str(s) for s in seeds],
                      "queries": [[sigma, sigma_next] for sigma, sigma_next, _, _ in log]}

    save_file(tensors, os.path.join(FIXTURES, "dpmpp_sde.safetensors"), metadata={"format": "pt"})
    write_json("dpmpp_sde.json", {
        "versions": {**versions(), **{p: importlib.metadata.version(p) for p in ["k-diffusion", "torchsde",
                                                                                  "trampoline"]}},
        "notes": "See tools/reference/gen_dpmpp_sde.py's docstring. Seeds and entropies are decimal strings "
                 "(they may exceed 2^53). noise/<seed>/q<k> and run/<name>/{x0,step<i>} are [B,4,8,8] f32.",
        "seed_sequences": seed_sequences,
        "schedules": schedules,
        "noise": noise,
        "runs": runs,
    })


if __name__ == "__main__":
    main()
