"""Shared helpers for the kiln reference-fixture generators.

Every generator writes into worker/tests/fixtures/reference/ (relative to the repo root),
computes everything in float32 on CPU, and is deterministic (fixed seeds).
"""

import json
import os
import sys

import numpy as np
import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO_ROOT, "worker", "tests", "fixtures", "reference")
ASSETS = os.path.join(REPO_ROOT, "worker", "assets")
TINY_DIR = os.path.join(FIXTURES, "tiny-sd15")

# SD1.5 scheduler config (the relevant keys of runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json,
# which is a PNDMScheduler config). LCMScheduler / EulerAncestralDiscreteScheduler are built with from_config().
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "trained_betas": None,
}


def setup_torch():
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)
    # Single thread: makes float32 reductions reproducible run to run on the same machine.
    torch.set_num_threads(1)


def f32(x):
    """One float as a JSON number with float32 precision."""
    return float(np.float32(x))


def flat(t):
    """Tensor/array -> (shape list, row-major list of float32-exact python floats)."""
    if isinstance(t, torch.Tensor):
        a = t.detach().to(torch.float32).cpu().contiguous().numpy()
    else:
        a = np.asarray(t, dtype=np.float32)
    return list(a.shape), [float(v) for v in a.reshape(-1)]


def tensor_json(t):
    shape, values = flat(t)
    return {"shape": shape, "values": values}


def ints(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return [int(v) for v in np.asarray(t).reshape(-1)]


def write_json(name, obj):
    os.makedirs(FIXTURES, exist_ok=True)
    path = os.path.join(FIXTURES, name)
    with open(path, "w", encoding="utf-8") as f:
        # float repr of a float32-exact double round-trips exactly through f32 parsing.
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)", file=sys.stderr)
    return path


def versions():
    import diffusers
    import transformers
    import safetensors

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
