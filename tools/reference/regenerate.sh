#!/usr/bin/env bash
# Regenerates every reference fixture under worker/tests/fixtures/reference/ (and worker/assets/ BPE files).
# Usage: tools/reference/regenerate.sh [path-to-python]   (default: /work/venv/bin/python, else python3)
# Deterministic: re-running on the same machine/versions gives byte-identical files.
set -euo pipefail
cd "$(dirname "$0")"
PY="${1:-}"
if [ -z "$PY" ]; then
  if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY=python3; fi
fi
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# fast fixtures
"$PY" gen_rng.py
"$PY" gen_rng.py --scalar
"$PY" check_rng_model.py
"$PY" gen_variation.py
"$PY" gen_tokenizer.py
"$PY" gen_schedulers.py
# models, LoRA, end-to-end references (order matters: each step reads the previous files)
"$PY" gen_models.py
"$PY" gen_lora.py
"$PY" gen_expected.py
"$PY" gen_prompts.py
"$PY" gen_single_file.py
"$PY" gen_lcm_distilled.py
"$PY" gen_lora_ldm.py
"$PY" gen_vae.py
"$PY" gen_vae_encoder.py
"$PY" gen_vae_tiled.py   # reads tiny-sd15/vae
"$PY" gen_inversion.py
"$PY" gen_ksamplers.py
"$PY" gen_hires.py
"$PY" gen_img2img.py
"$PY" gen_diffusers_samplers.py
"$PY" gen_dpmpp_sde.py
"$PY" gen_dpmpp_sde_renders.py   # imports gen_ksamplers.py, gen_dpmpp_sde.py
"$PY" gen_lanczos.py   # reads vae_encoder_{a,b}.png
chmod 644 ../../worker/tests/fixtures/reference/*.* ../../worker/tests/fixtures/reference/tiny-sd15/*/* \
  ../../worker/tests/fixtures/reference/tiny-sd15/*.json \
  ../../worker/tests/fixtures/reference/tiny-lcm-unet/* \
  ../../worker/tests/fixtures/reference/tiny-ldm-diffusers/*/* \
  ../../worker/tests/fixtures/reference/embeddings/*
du -ab ../../worker/tests/fixtures/reference | sort -k2
