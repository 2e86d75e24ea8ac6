"""Fixture 9: A1111 prompt syntax -> conditioning, `prompts.json` + `prompts.safetensors`.

An independent Python model of what AUTOMATIC1111's stable-diffusion-webui does to a prompt before the UNet sees
it, written from its documented behaviour (not from its code), run on tiny-sd15's text encoder (fp16 weights loaded
as float32) and tokenizer:

1. `#` comments are cut (the built-in "Comments" script, on by default): first each line that starts with `#`,
   with the newline before it and the one after it, becomes one newline; then from any other `#` to the end of
   its line, newline included, becomes one newline.
2. Positive prompts only: extra networks `<kind:args>` (kind = word characters, args = anything up to the first
   `>`) are cut out.
3. Emphasis (`parse_prompt_attention`): `(x)` x1.1, `[x]` /1.1 (i.e. x(1/1.1)), `(x:w)` xw, multipliers applied
   to every part since the opening bracket when it closes (so nesting multiplies, and round and square brackets
   are counted separately); `\\(` `\\)` `\\[` `\\]` `\\\\` literal, a lone backslash vanishes; a `:` that does not
   start `:NUMBER)` is text; `BREAK` (a whole word, with the whitespace around it) separates pieces of a text run
   and becomes a ("BREAK", -1) part; unclosed brackets apply to the end of the prompt (kiln refuses those, so no
   case has one); equal-weight neighbours merge.
4. Chunking (`sd_hijack_clip`): each part tokenized without BOS/EOS; 75 tokens per chunk; BREAK closes a chunk;
   when a chunk is full and the next token is not a comma, the tokens after its last comma move on if that comma
   is within 20 tokens of the end (comma_padding_backtrack = 20); each chunk is BOS + 75 + EOS, padded with EOS,
   weight 1.0 outside the prompt tokens.
5. Each chunk is encoded alone ([1, 77]); clip skip N > 1 takes hidden_states[-N] through final_layer_norm.
   EmphasisOriginal per chunk: m0 = z.mean(); z *= weights; z *= m0 / z.mean(). Chunks are concatenated on the
   token axis.
6. pad_cond_uncond: under CFG the shorter of cond/uncond gets the empty prompt's [1, 77, hidden] appended until
   both have the same number of chunks.

The A1111 docstring examples of parse_prompt_attention are asserted first, as a check of this model.
"""

import os
import re
import sys
import warnings

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from common import FIXTURES, TINY_DIR, f32, setup_torch, versions, write_json

CHUNK = 75
BACKTRACK = 20
BREAK = ("BREAK", -1.0)

LONG = (
    "masterpiece, best quality, very highly detailed, ultra realistic, 8k uhd, raw dslr, soft lighting, film grain, "
    "fujifilm xt3, a (beautiful:1.1) young woman, long flowing auburn hair, freckles, bright green eyes, "
    "standing in a sunflower field, golden hour, gentle wind, white summer dress, straw hat, warm smile, "
    "shallow depth of field, creamy bokeh, cinematic composition, rule of thirds, sharp focus, intricate "
    "details, volumetric light, god rays, warm colors, subtle lens flare, 35mm photograph, award winning, "
    "trending on artstation, national geographic, [blurry], vivid colors, detailed skin texture, visible pores, "
    "natural makeup, late summer, scattered clouds, deep blue sky, distant snowy mountains, flock of birds, "
    "monarch butterflies, wooden fence, old red barn, country road, tall grass, wildflowers, dragonflies, "
    "lens dust, kodak portra 400, analog photo, high dynamic range, perfect exposure, professional color grading"
)

# name -> (prompt, role, clip skip)
CASES = {
    "plain": ("a photograph of an astronaut riding a horse", "positive", 1),
    "empty": ("", "positive", 1),
    "weighted": ("a portrait of a (smiling:1.2) woman, detailed", "positive", 1),
    "round": ("a (masterpiece) castle on a hill", "positive", 1),
    "square": ("a castle, [blurry] background", "positive", 1),
    "nested": ("((red) [fox]:1.5) in the snow, (((cinematic)))", "positive", 1),
    "escaped": ("a sign saying \\(literal\\) and \\[more\\], a \\\\ slash", "positive", 1),
    "break": ("a red fox BREAK a snowy forest, (night:1.1)", "positive", 1),
    "break_in_brackets": ("(a fox BREAK den)", "positive", 1),
    "comment": ("# style notes\na lighthouse at dusk # golden hour\n(stormy sea:1.3)", "positive", 1),
    "lora": ("a watercolor landscape <lora:x:0.5>, (soft light:0.8)", "positive", 1),
    "long": (LONG, "positive", 1),
    "clip_skip_2": ("((red) [fox]:1.5) in the snow, (((cinematic)))", "positive", 2),
    "negative": ("blurry, (low quality:1.3), <lora:kept:1> watermark", "negative", 1),
}
# A positive/negative pair under CFG: the negative (1 chunk) is padded to the positive's 3.
PAIRS = {"pair": ("long", "negative")}


def strip_comments(text):
    text = re.sub(r"(^|\n)#[^\n]*(\n|$)", "\n", text)
    return re.sub(r"#[^\n]*(\n|$)", "\n", text)


def cut_networks(text):
    found = []
    out = re.sub(r"<(\w+):([^>]+)>", lambda m: found.append((m.group(1), m.group(2).split(":"))) or "", text)
    return out, found


def split_breaks(run):
    pieces = re.split(r"\s*\bBREAK\b\s*", run)
    out = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(list(BREAK))
        out.append([piece, 1.0])
    return out


WEIGHT = re.compile(r":([+-]?[.\d]+)\)")
SPECIAL = "\\()[]:"


def parse_attention(text):
    parts = []
    open_at = {"(": [], "[": []}

    def scale(start, by):
        for part in parts[start:]:
            part[1] *= by

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt and nxt in "()[]\\":
                parts.append([nxt, 1.0])
                i += 2
            else:
                parts.append(["", 1.0])
                i += 1
        elif c in "([":
            open_at[c].append(len(parts))
            i += 1
        elif c == ":" and WEIGHT.match(text, i):
            m = WEIGHT.match(text, i)
            if open_at["("]:
                scale(open_at["("].pop(), float(m.group(1)))
            else:
                parts.extend(split_breaks(m.group(0)))
            i = m.end()
        elif c == ")" and open_at["("]:
            scale(open_at["("].pop(), 1.1)
            i += 1
        elif c == "]" and open_at["["]:
            scale(open_at["["].pop(), 1 / 1.1)
            i += 1
        elif c in ")]:":
            parts.append([c, 1.0])
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in SPECIAL:
                j += 1
            parts.extend(split_breaks(text[i:j]))
            i = j
    for start in open_at["("]:
        scale(start, 1.1)
    for start in open_at["["]:
        scale(start, 1 / 1.1)
    if not parts:
        parts = [["", 1.0]]
    merged = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


def self_check():
    # parse_prompt_attention's docstring examples (A1111's own expectations).
    assert parse_attention("normal text") == [("normal text", 1.0)]
    assert parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]


def chunk(tokenized, bos, eos, comma):
    """tokenized: list of (token ids, weight) per part, or None for BREAK."""
    chunks = []
    cur, wts, comma_at = [], [], -1

    def close():
        nonlocal cur, wts, comma_at
        pad = CHUNK - len(cur)
        chunks.append(([bos] + cur + [eos] * (pad + 1), [1.0] + wts + [1.0] * (pad + 1)))
        cur, wts, comma_at = [], [], -1

    for item in tokenized:
        if item is None:
            close()
            continue
        ids, w = item
        for t in ids:
            if t == comma:
                comma_at = len(cur)
            elif len(cur) == CHUNK and comma_at != -1 and CHUNK - comma_at <= BACKTRACK:
                keep = comma_at + 1
                moved, moved_w = cur[keep:], wts[keep:]
                cur, wts = cur[:keep], wts[:keep]
                close()
                cur, wts = moved, moved_w
            if len(cur) == CHUNK:
                close()
            cur.append(t)
            wts.append(w)
    if cur or not chunks:
        close()
    return chunks


def encode_chunk(te, ids, weights, clip_skip):
    ids = torch.tensor([ids], dtype=torch.int64)
    out = te(input_ids=ids, output_hidden_states=True)
    z = out.last_hidden_state if clip_skip == 1 else te.final_layer_norm(out.hidden_states[-clip_skip])
    w = torch.tensor(weights, dtype=torch.float32)
    m0 = z.mean()
    z = z * w.reshape(1, -1, 1)
    return z * (m0 / z.mean())


def main():
    setup_torch()
    self_check()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te = CLIPTextModel.from_pretrained(os.path.join(TINY_DIR, "text_encoder"), variant="fp16",
                                           dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer"))
    bos, eos, comma = tok.bos_token_id, tok.eos_token_id, tok.get_vocab()[",</w>"]
    assert (bos, eos, comma) == (49406, 49407, 267)

    def condition(text, role, clip_skip):
        text = strip_comments(text)
        networks = []
        if role == "positive":
            text, networks = cut_networks(text)
        parsed = parse_attention(text)
        texts = [t for t, _ in parsed]
        ids = tok(texts, truncation=False, add_special_tokens=False)["input_ids"]
        tokenized = [None if (t, w) == BREAK else (i, w) for (t, w), i in zip(parsed, ids)]
        chunks = chunk(tokenized, bos, eos, comma)
        z = torch.cat([encode_chunk(te, c, w, clip_skip) for c, w in chunks], dim=1)
        return parsed, networks, chunks, z

    tensors, cases, embeds = {}, {}, {}
    for name, (prompt, role, clip_skip) in CASES.items():
        parsed, networks, chunks, z = condition(prompt, role, clip_skip)
        tensors[name] = z
        embeds[name] = z
        cases[name] = {
            "prompt": prompt, "role": role, "clip_skip": clip_skip,
            "parsed": [[t, w] for t, w in parsed],
            "networks": [{"kind": k, "items": items} for k, items in networks],
            "chunks": [{"tokens": c, "weights": [f32(x) for x in w]} for c, w in chunks],
            "embedding": name, "shape": list(z.shape),
        }
        print(f"{name}: {len(chunks)} chunk(s), parts {parsed[:4]}{'...' if len(parsed) > 4 else ''}",
              file=sys.stderr)

    # The long prompt must exercise the comma backtrack: its first chunk ends early, at a comma.
    first = cases["long"]["chunks"][0]["tokens"]
    assert len(cases["long"]["chunks"]) == 3 and first[75] == eos and comma in first, first
    assert cases["break"]["chunks"][0]["tokens"][4] == eos and len(cases["break"]["chunks"]) == 2

    _, _, _, empty = condition("", "negative", 1)
    pairs = {}
    for name, (pos, neg) in PAIRS.items():
        cond, uncond = embeds[pos], embeds[neg]
        k = max(cond.shape[1], uncond.shape[1]) // 77
        pad = lambda z: torch.cat([z, empty.repeat(1, k - z.shape[1] // 77, 1)], dim=1)
        tensors[f"{name}/cond"], tensors[f"{name}/uncond"] = pad(cond), pad(uncond)
        assert tensors[f"{name}/uncond"].shape[1] == 3 * 77
        pairs[name] = {"prompt_case": pos, "negative_case": neg, "chunks": k,
                       "cond": f"{name}/cond", "uncond": f"{name}/uncond"}

    for k, v in tensors.items():
        assert torch.isfinite(v).all(), k
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "prompts.safetensors"), metadata={"format": "pt"})
    print(f"wrote prompts.safetensors ({os.path.getsize(os.path.join(FIXTURES, 'prompts.safetensors'))} bytes)",
          file=sys.stderr)
    write_json("prompts.json", {
        "description": "A1111 prompt conditioning on tiny-sd15's text encoder (float32, CPU); see "
                       "tools/reference/gen_prompts.py. parsed = parse_prompt_attention pairs (BREAK = "
                       "['BREAK', -1.0]), weights as Python floats; chunks = 77 token ids and float32 weights each; "
                       "embedding = key in prompts.safetensors ([1, 77*chunks, 16] f32).",
        "versions": versions(),
        "comma_padding_backtrack": BACKTRACK,
        "cases": cases,
        "pairs": pairs,
    })


if __name__ == "__main__":
    main()
