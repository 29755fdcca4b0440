#!/usr/bin/env python3
"""make_metaspace_cases.py: small SentencePiece-style tokenizers (Metaspace, byte fallback
and their decoders), with the tokenizers library's ids and decoded text for fixed texts.

Usage: pip install tokenizers && python3 make_metaspace_cases.py mixtral/tokenizer.json.gz \\
           metaspace_cases.json.gz

The vocabulary is part of Mixtral's (tests/tokenizer/mixtral, see make_mixtral.py): its
first 600 ids (<unk>, <s>, </s>, the 256 <0xNN> byte tokens, then the most frequent
pieces), the pieces of up to three characters below id 1500, the ASCII characters and "▁",
with the merges among them; each case changes the normalizer, pre-tokenizer,
decoder or added tokens (Metaspace's prepend_scheme "always", "first", "never", split or
not, the older add_prefix_space spelling, Metaspace after a Split, decoders Metaspace,
Strip, ByteFallback, Replace in either order). The tokenizer is stored as written, not as
the library writes it back. Output: the format of cases.json.gz (see make_cases.py)."""
import copy
import gzip
import json
import sys

from tokenizers import Tokenizer

from make_cases import TEXTS

SP = "\u2581"
MORE = [
    "<s>[INST] Hi there [/INST]", "Hi</s><s> again", " <s> x", f"{SP}already {SP}marked",
    f"a{SP}{SP}b", "<0x41> is text", SP, "x  <unk>  y", "[INST]x[INST] y", "12 34 5",
    "\U0001F600\U0001F600 \u00e9t\u00e9", "  lead and trail  ",
]


def metaspace(scheme, split=True):
    return {"type": "Metaspace", "replacement": SP, "prepend_scheme": scheme, "split": split}


def metaspace_decoder(scheme):
    return {"type": "Metaspace", "replacement": SP, "prepend_scheme": scheme, "split": True}


def replace(a, b):
    return {"type": "Replace", "pattern": {"String": a}, "content": b}


def strip(content, start, stop):
    return {"type": "Strip", "content": content, "start": start, "stop": stop}


SEQUENCE_DECODER = {"type": "Sequence", "decoders": [
    replace(SP, " "), {"type": "ByteFallback"}, {"type": "Fuse"}, strip(" ", 1, 0)]}


def added(content, id, special, normalized=False):
    return {"id": id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": normalized, "special": special}


def base(path):
    full = json.loads(gzip.open(path, "rt", encoding="utf-8").read())
    vocab = {k: v for k, v in full["model"]["vocab"].items()
             if v < 600 or (v < 1500 and len(k) <= 3) or (len(k) == 1 and k.isascii()) or k == SP}
    merges = [m for m in full["model"]["merges"]
              if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    t = copy.deepcopy(full)
    t["model"]["vocab"] = vocab
    t["model"]["merges"] = merges
    t["normalizer"] = None
    t["pre_tokenizer"] = None
    t["decoder"] = SEQUENCE_DECODER
    return t


def cases(b):
    # the library numbers an added token that is not in the vocabulary itself (the model's
    # vocabulary size, then up), whatever id the file gives it; the real files agree
    inst = len(b["model"]["vocab"])
    out = {}
    t = copy.deepcopy(b)
    t["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SP}, replace(" ", SP)]}
    t["added_tokens"] += [added("[INST]", inst, False)]
    out["legacy-normalizer"] = t
    for scheme in ["first", "always", "never"]:
        for split in [False, True]:
            t = copy.deepcopy(b)
            t["pre_tokenizer"] = metaspace(scheme, split)
            t["added_tokens"] += [added("[INST]", inst, False)]
            out[f"metaspace-{scheme}-{'split' if split else 'whole'}"] = t
            t = copy.deepcopy(t)
            t["decoder"] = metaspace_decoder(scheme)
            out[f"metaspace-{scheme}-{'split' if split else 'whole'}-decoder"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = {"type": "Metaspace", "replacement": SP, "add_prefix_space": True,
                          "str_rep": SP}
    t["decoder"] = {"type": "Metaspace", "replacement": SP, "add_prefix_space": True}
    out["metaspace-add-prefix-space"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, metaspace("first")]}
    out["digits-then-metaspace-first"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False},
        metaspace("first")]}
    out["split-removed-then-metaspace-first"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = metaspace("first", False)
    t["added_tokens"] += [added(f"{SP}[INST]", inst, False, normalized=True)]
    out["metaspace-normalized-added"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = metaspace("always")
    t["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, strip(SP, 2, 2), replace(SP, "_")]}
    out["decoder-bytefallback-strip-replace"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = metaspace("first")
    t["decoder"] = {"type": "Sequence", "decoders": [
        replace(SP, " "), {"type": "Fuse"}, {"type": "ByteFallback"}, strip(" ", 0, 1)]}
    out["decoder-fuse-before-bytefallback"] = t
    t = copy.deepcopy(b)
    t["pre_tokenizer"] = metaspace("first")
    t["decoder"] = {"type": "ByteFallback"}
    out["decoder-bytefallback-alone"] = t
    return out


def main():
    result = []
    for name, t in cases(base(sys.argv[1])).items():
        tok = Tokenizer.from_str(json.dumps(t))
        texts = []
        for text in TEXTS + MORE:
            ids = tok.encode(text).ids
            try:
                decoded = tok.decode(ids)
            except BaseException:  # pyo3's PanicException
                # tokenizers 0.23.3's Strip indexes before the token's start when `stop`
                # exceeds its length (fixed later with a min()): no answer to compare with
                continue
            texts.append({"text": text, "ids": ids, "decoded": decoded})
        result.append({"name": name, "tokenizer": t, "texts": texts})
    with gzip.GzipFile(sys.argv[2], "wb", mtime=0) as f:
        f.write(json.dumps(result, ensure_ascii=False).encode())


if __name__ == "__main__":
    main()
