"""Fixture 11: textual-inversion embeddings as A1111 applies them, `inversion.json` + `inversion.safetensors`
+ `embeddings/*.safetensors`.

Writes three tiny textual-inversion files for tiny-sd15 (hidden 16) into `embeddings/`:

- `kiln-glow.safetensors`: 3 vectors, f32, in the `emb_params` form (one tensor named `emb_params`, what
  kohya's scripts and most safetensors embeddings on Civitai hold). Its name tokenizes to `kiln</w> -</w> glow</w>`.
- `kiln.safetensors`: 1 vector, f16, in the `string_to_param.*` form (A1111's own `.pt` layout flattened into
  safetensors). Its name is the first token of `kiln-glow`'s, so the longest-match-first rule matters.
- `narrow.safetensors`: 2 vectors of width 8, for the refusal of an embedding whose width is not the text
  encoder's.

Then an independent Python model of A1111's rules (written from A1111's behaviour, not its code), on top of
gen_prompts.py's parsing (comments, extra networks, emphasis, BREAK):

1. The database: name = file stem; the name's token ids are `tokenizer(name, truncation=False,
   add_special_tokens=False)`; per first token, candidates longest first. The hash A1111 writes (`TI hashes`) is
   the first 12 hex digits of the whole file's sha256.
2. Chunking, per part's own token list: at each position first the comma rule (a comma is remembered; a full
   chunk whose last comma is within 20 tokens moves the tokens after it on), then a full chunk is closed; then
   the longest embedding whose name's ids start here: when its vectors do not fit in the chunk (tokens + vectors
   > 75), the chunk is closed (padded with EOS) and the embedding starts the next one. It occupies one token per
   vector (id 0, `!`), each with the part's weight, and its position is remembered in the chunk it was placed in.
   A1111 keeps that position even when the comma rule later moves the placeholder tokens on: the vectors then
   land on the old chunk's padding and the moved tokens stay `!` (case `after_late_comma`).
3. Encoding, per chunk of 77: the token embeddings are looked up, and at each remembered position p the
   embedding's vectors replace rows p+1 … (after BOS; cut at the chunk's end), before the position embeddings
   are added (a replacement `token_embedding` module, as A1111 wraps it). Emphasis and concatenation as in
   gen_prompts.py.

Cases: `positive_emphasis` (both embeddings, weights 1.3 and 1/1.1), `negative` (a negative prompt: its
`<lora:…>` stays text), `chunk_boundary` (73 tokens, then `kiln-glow`: it moves to the second chunk),
`not_the_name` (`kiln-glowing`, `kilnglow`, `kilns`: only `kiln` matches, inside `kiln-glowing`),
`after_late_comma` (A1111's position quirk above). `pairs.pair` is `chunk_boundary` with `negative` under CFG
(the negative padded with the empty prompt's chunk).
"""

import hashlib
import os
import sys
import warnings

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json
from gen_prompts import BREAK, CHUNK, BACKTRACK, cut_networks, parse_attention, strip_comments

EMB_DIR = os.path.join(FIXTURES, "embeddings")
HIDDEN = 16
PLACEHOLDER = 0  # the id A1111 puts where an embedding's vectors go

# name -> (prompt, role)
CASES = {
    "positive_emphasis": ("a castle at dusk, (kiln-glow:1.3) over the hills, [kiln] sky", "positive"),
    "negative": ("kiln-glow, blurry, (low quality:1.2), <lora:kept:1> watermark", "negative"),
    "chunk_boundary": ("a " * 73 + "kiln-glow a tower", "positive"),
    "not_the_name": ("kiln-glowing kilnglow, kilns at night", "positive"),
    "after_late_comma": ("a " * 60 + ", kiln-glow" + " b" * 11 + " c d", "positive"),
}
PAIRS = {"pair": ("chunk_boundary", "negative")}


def write_embeddings():
    """The three files; returns {name: record} with each one's vectors and facts."""
    os.makedirs(EMB_DIR, exist_ok=True)
    g = torch.Generator("cpu").manual_seed(1111)
    # Token embeddings of tiny-sd15 have std 0.5; these are of the same scale.
    glow = (torch.randn((3, HIDDEN), generator=g) * 0.5).to(torch.float32)
    kiln = (torch.randn((1, HIDDEN), generator=g) * 0.5).to(torch.float16)
    narrow = (torch.randn((2, 8), generator=g) * 0.5).to(torch.float32)
    files = {
        "kiln-glow": ({"emb_params": glow}, "emb_params"),
        "kiln": ({"string_to_param.*": kiln}, "string_to_param"),
        "narrow": ({"emb_params": narrow}, "emb_params"),
    }
    out = {}
    for name, (tensors, form) in files.items():
        path = os.path.join(EMB_DIR, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        (vec,) = tensors.values()
        out[name] = {"file": f"embeddings/{name}.safetensors", "form": form, "sha256": sha,
                     "short_hash": sha[:12], "vectors": vec.shape[0], "width": vec.shape[1],
                     "vec": vec.to(torch.float32)}
    return out


class Database:
    """Names -> token ids, candidates per first token longest first (ties: name order)."""

    def __init__(self, tok, records):
        self.by_first = {}
        for name in sorted(records):
            rec = records[name]
            if rec["width"] != HIDDEN:
                continue  # only used in the refusal test
            ids = tok(name, truncation=False, add_special_tokens=False)["input_ids"]
            self.by_first.setdefault(ids[0], []).append((ids, name, rec))
        for cands in self.by_first.values():
            cands.sort(key=lambda c: -len(c[0]))

    def at(self, tokens, i):
        for ids, name, rec in self.by_first.get(tokens[i], []):
            if tokens[i:i + len(ids)] == ids:
                return name, rec, len(ids)
        return None


def chunk(tokenized, db, bos, eos, comma):
    """tokenized: (ids, weight) per part, None for BREAK -> [(77 ids, 77 weights, [(offset, name)])]."""
    chunks = []
    cur, wts, fixes, comma_at = [], [], [], -1

    def close():
        nonlocal cur, wts, fixes, comma_at
        pad = CHUNK - len(cur)
        chunks.append(([bos] + cur + [eos] * (pad + 1), [1.0] + wts + [1.0] * (pad + 1), fixes))
        cur, wts, fixes, comma_at = [], [], [], -1

    for item in tokenized:
        if item is None:
            close()
            continue
        ids, w = item
        i = 0
        while i < len(ids):
            t = ids[i]
            if t == comma:
                comma_at = len(cur)
            elif len(cur) == CHUNK and comma_at != -1 and CHUNK - comma_at <= BACKTRACK:
                keep = comma_at + 1
                moved, moved_w = cur[keep:], wts[keep:]
                cur, wts = cur[:keep], wts[:keep]
                close()  # the remembered positions stay with the closed chunk
                cur, wts = moved, moved_w
            if len(cur) == CHUNK:
                close()
            found = db.at(ids, i)
            if found is None:
                cur.append(t)
                wts.append(w)
                i += 1
                continue
            name, rec, n_tokens = found
            if len(cur) + rec["vectors"] > CHUNK:
                close()
            fixes.append((len(cur), name))
            cur += [PLACEHOLDER] * rec["vectors"]
            wts += [w] * rec["vectors"]
            i += n_tokens
    if cur or not chunks:
        close()
    return chunks


class TokenEmbeddingWithFixes(torch.nn.Module):
    """Looks up token embeddings, then writes each fix's vectors over rows offset+1 ... of its chunk."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.fixes = []  # [(offset, [n, 16] tensor)] for the one chunk being encoded

    def forward(self, input_ids):
        out = self.wrapped(input_ids).clone()
        for offset, vec in self.fixes:
            n = min(out.shape[1] - offset - 1, vec.shape[0])
            out[0, offset + 1:offset + 1 + n] = vec[:n]
        return out


def encode_chunk(te, hook, ids, weights, fixes, records):
    hook.fixes = [(off, records[name]["vec"]) for off, name in fixes]
    z = te(input_ids=torch.tensor([ids], dtype=torch.int64)).last_hidden_state
    hook.fixes = []
    w = torch.tensor(weights, dtype=torch.float32)
    m0 = z.mean()
    z = z * w.reshape(1, -1, 1)
    return z * (m0 / z.mean())


def main():
    setup_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te = CLIPTextModel.from_pretrained(os.path.join(TINY_DIR, "text_encoder"), variant="fp16",
                                           dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer"))
    bos, eos, comma = tok.bos_token_id, tok.eos_token_id, tok.get_vocab()[",</w>"]
    records = write_embeddings()
    db = Database(tok, records)
    emb = te.embeddings
    hook = TokenEmbeddingWithFixes(emb.token_embedding)
    emb.token_embedding = hook

    def condition(text, role):
        text = strip_comments(text)
        if role == "positive":
            text, _ = cut_networks(text)
        parsed = parse_attention(text)
        ids = tok([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
        tokenized = [None if (t, w) == BREAK else (i, w) for (t, w), i in zip(parsed, ids)]
        chunks = chunk(tokenized, db, bos, eos, comma)
        z = torch.cat([encode_chunk(te, hook, c, w, f, records) for c, w, f in chunks], dim=1)
        return chunks, z

    tensors, cases = {}, {}
    for name, (prompt, role) in CASES.items():
        chunks, z = condition(prompt, role)
        tensors[name] = z
        used = list(dict.fromkeys(n for _, _, f in chunks for _, n in f))
        cases[name] = {
            "prompt": prompt, "role": role,
            "chunks": [{"tokens": c, "weights": [f32(x) for x in w], "fixes": [[o, n] for o, n in f]}
                       for c, w, f in chunks],
            "used": used, "embedding": name, "shape": list(z.shape),
        }
        print(f"{name}: {len(chunks)} chunk(s), fixes {[c['fixes'] for c in cases[name]['chunks']]}",
              file=sys.stderr)

    # The cases must exercise what they are named for.
    c = cases["positive_emphasis"]["chunks"][0]
    assert [n for _, n in c["fixes"]] == ["kiln-glow", "kiln"] and f32(1.3) in c["weights"], c
    boundary = cases["chunk_boundary"]["chunks"]
    assert len(boundary) == 2 and boundary[0]["fixes"] == [] and boundary[1]["fixes"] == [[0, "kiln-glow"]]
    assert boundary[0]["tokens"][74:] == [eos] * 3, boundary[0]["tokens"]
    assert cases["not_the_name"]["used"] == ["kiln"], cases["not_the_name"]
    late = cases["after_late_comma"]["chunks"]
    assert late[0]["fixes"] == [[61, "kiln-glow"]] and late[0]["tokens"][62] == eos and late[1]["fixes"] == []
    assert late[1]["tokens"][1:4] == [PLACEHOLDER] * 3, late[1]["tokens"]
    assert cases["negative"]["used"] == ["kiln-glow"]
    # The replacement reaches the output: without it the same ids give another embedding.
    hook_off = te(input_ids=torch.tensor([c["tokens"]])).last_hidden_state
    assert not torch.allclose(hook_off, tensors["positive_emphasis"][:, :77], atol=1e-3)

    _, empty = condition("", "negative")
    pairs = {}
    for name, (pos, neg) in PAIRS.items():
        cond, uncond = tensors[pos], tensors[neg]
        k = max(cond.shape[1], uncond.shape[1]) // 77
        pad = lambda z: torch.cat([z, empty.repeat(1, k - z.shape[1] // 77, 1)], dim=1)
        tensors[f"{name}/cond"], tensors[f"{name}/uncond"] = pad(cond), pad(uncond)
        assert tensors[f"{name}/uncond"].shape[1] == 2 * 77
        pairs[name] = {"prompt_case": pos, "negative_case": neg, "chunks": k,
                       "cond": f"{name}/cond", "uncond": f"{name}/uncond"}

    for k, v in tensors.items():
        assert torch.isfinite(v).all(), k
    out = os.path.join(FIXTURES, "inversion.safetensors")
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, out, metadata={"format": "pt"})
    print(f"wrote inversion.safetensors ({os.path.getsize(out)} bytes)", file=sys.stderr)
    write_json("inversion.json", {
        "description": "Textual-inversion embeddings applied as A1111 does, on tiny-sd15's text encoder (float32, "
                       "CPU); see tools/reference/gen_inversion.py. chunks = 77 token ids, float32 weights and fixes "
                       "[offset in the chunk's prompt tokens (BOS not counted), embedding name]; embedding = key in "
                       "inversion.safetensors ([1, 77*chunks, 16] f32); used = embeddings placed, in order.",
        "versions": versions(),
        "files": {n: {k: v for k, v in r.items() if k != "vec"} for n, r in records.items()},
        "cases": cases,
        "pairs": pairs,
    })


if __name__ == "__main__":
    main()
