"""Fixture 2: tokenizer.json -- SD1.5 CLIP token ids from transformers' CLIPTokenizer.

The vocab is built from bpe_simple_vocab_16e6.txt.gz (shipped in PyPI open-clip-torch / clip-anytorch) with the
standard OpenAI CLIP construction, written as vocab.json + merges.txt, loaded with CLIPTokenizer and used with
padding="max_length", max_length=77, truncation=True (exactly what StableDiffusionPipeline does).

Also:
* copies the gz to worker/assets/ together with its MIT licence (OpenAI, from clip-anytorch's wheel),
* writes the tokenizer folder of tiny-sd15/ (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json),
* cross-checks every prompt against open_clip's SimpleTokenizer (and OpenAI's original clip.simple_tokenizer when
  clip-anytorch is installed) and records where they differ (those apply ftfy + html.unescape; HF does not).
"""

import gzip
import json
import os
import shutil
import sys

from common import ASSETS, TINY_DIR, write_json, versions

MAX_LEN = 77
BOS, EOS = 49406, 49407

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An Astronaut Riding A HORSE",
    "",
    " ",
    "cat",
    "a cat, sitting on a mat. high quality!!!",
    "don't stop, it's fine; we're here, they've gone, I'm ok, you'll see, he'd go",
    "DON'T SHOUT, IT'S LOUD",
    "a red  car\n\non a\tstreet   at night",
    "  leading and trailing spaces  ",
    "1234567890 and 3.14159, 2024-01-01 12:30",
    "100% sure, $5.99 @home #tag ~approx ^up |pipe",
    "café crème brûlée, über straße, naïve façade",
    "a cute dog 🐶 with sparkles ✨🔥",
    "东京的夜景，霓虹灯",
    "Москва зимой, красная площадь",
    "こんにちは世界 日本の風景",
    "(masterpiece:1.2), best quality, <lora:x:0.5>, [blurry], ((detailed))",
    "portrait of a woman, (freckles:0.8), \\(parenthesis\\), BREAK background",
    "salt &amp; pepper &lt;3 &quot;quoted&quot;",
    "rock & roll <3 \"quoted\" 'single'",
    "a/b\\c_d-e+f=g*h",
    "...!!!???,,,;;;:::",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "hello world " * 20,
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five "
    "twenty-six twenty-seven twenty-eight twenty-nine thirty thirty-one thirty-two thirty-three",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "8k uhd, dslr, soft lighting, film grain, Fujifilm XT3",
    "e\u0301 decomposed accent vs \u00e9 composed",
    "tab\tseparated\tvalues and non\u00a0breaking\u2003spaces",
    "mixed CASE WoRdS and CamelCaseIdentifier",
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_gz_path():
    import open_clip

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def build_vocab_and_merges(gz_path):
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    assert "#version" in lines[0], lines[0]  # the header line is literally "bpe_simple_vocab_16e6.txt#version: 0.2"
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894, len(merges)
    merges = [tuple(m.split()) for m in merges]
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    assert len(set(vocab)) == 49408, "duplicate vocab entries"
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer_dir(out_dir, vocab, merges):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_LEN,
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
                **special,
            },
            f,
            indent=2,
        )


def load_openai_simple_tokenizer():
    """OpenAI's original clip/simple_tokenizer.py from clip-anytorch, loaded as a plain file (clip/__init__.py
    imports pkg_resources, which current setuptools no longer ships)."""
    import importlib.util
    from importlib.metadata import distribution

    d = distribution("clip-anytorch")
    path = [f for f in d.files if str(f).replace("\\", "/").endswith("clip/simple_tokenizer.py")][0]
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", d.locate_file(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def main():
    from transformers import CLIPTokenizer

    gz = bpe_gz_path()
    vocab, merges = build_vocab_and_merges(gz)

    # assets: the gz + its licence (the file is OpenAI's; clip-anytorch ships OpenAI's MIT licence next to it)
    os.makedirs(ASSETS, exist_ok=True)
    shutil.copyfile(gz, os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz"))
    lic = None
    try:
        from importlib.metadata import distribution

        d = distribution("clip-anytorch")
        for f in d.files or []:
            if f.name == "LICENSE":
                lic = f.read_text()
    except Exception:  # pragma: no cover
        pass
    if lic is None:
        sys.exit("clip-anytorch (for the OpenAI MIT licence text) is required: pip install clip-anytorch")
    with open(os.path.join(ASSETS, "LICENSE-CLIP-BPE"), "w") as f:
        f.write(
            "bpe_simple_vocab_16e6.txt.gz is the byte-pair-encoding vocabulary of OpenAI CLIP\n"
            "(https://github.com/openai/CLIP, clip/bpe_simple_vocab_16e6.txt.gz), redistributed unchanged\n"
            "(sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a, identical in the PyPI\n"
            "packages clip-anytorch 2.6.0 and open-clip-torch 3.3.0) under the following licence:\n\n"
        )
        f.write(lic)

    tok_dir = os.path.join(TINY_DIR, "tokenizer")
    write_tokenizer_dir(tok_dir, vocab, merges)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 49408, len(tok)
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS and tok.pad_token_id == EOS, (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )

    import open_clip

    oc = open_clip.SimpleTokenizer()  # pads with 0; we compare up to and including EOS
    oa = load_openai_simple_tokenizer()

    cases = []
    n_diff = 0
    n_diff_oa = 0
    for p in PROMPTS:
        ids = tok(p, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        assert len(ids) == MAX_LEN and ids[0] == BOS
        n_real = ids.index(EOS)  # first EOS; everything after is EOS padding
        assert all(i == EOS for i in ids[n_real:])
        full = tok(p, truncation=False).input_ids
        oc_ids = [int(x) for x in oc([p])[0].tolist()]
        oc_trim = oc_ids[: oc_ids.index(EOS) + 1]
        case = {
            "prompt": p,
            "ids": ids,
            "n_tokens_untruncated": len(full) - 2,
            "truncated": len(full) > MAX_LEN,
            "tokens": tok.convert_ids_to_tokens(ids[: n_real + 1]),
        }
        if oc_trim != ids[: n_real + 1]:
            n_diff += 1
            case["open_clip_ids_differ"] = True
            case["open_clip_ids"] = oc_trim
        oa_ids = [BOS] + oa.encode(p)[: MAX_LEN - 2] + [EOS]
        if oa_ids != ids[: n_real + 1]:
            n_diff_oa += 1
            case["openai_clip_ids_differ"] = True
            case["openai_clip_ids"] = oa_ids
        cases.append(case)

    print(f"tokenizer: {len(PROMPTS)} prompts, {n_diff} differ from open_clip, {n_diff_oa} from OpenAI clip "
          "(expected: html entities / ftfy / literal special tokens)", file=sys.stderr)
    write_json(
        "tokenizer.json",
        {
            "description": "ids = transformers CLIPTokenizer(vocab.json+merges.txt built from bpe_simple_vocab_16e6.txt.gz)"
            "(prompt, padding='max_length', max_length=77, truncation=True).input_ids. BOS 49406, EOS 49407, "
            "padded with EOS 49407. 'tokens' = the token strings up to the first EOS. When open_clip's "
            "SimpleTokenizer (ftfy.fix_text + html.unescape x2 + whitespace clean + lower) gives different ids, "
            "'open_clip_ids' holds its ids up to EOS (open_clip itself pads with 0). Likewise 'openai_clip_ids' for "
            "OpenAI's original clip.simple_tokenizer (same cleaning as open_clip, but it also maps the literal "
            "strings <|startoftext|>/<|endoftext|> to 49406/49407, as HF does).",
            "versions": versions(),
            "vocab_size": len(vocab),
            "num_merges": len(merges),
            "bos": BOS,
            "eos": EOS,
            "pad": EOS,
            "max_length": MAX_LEN,
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
