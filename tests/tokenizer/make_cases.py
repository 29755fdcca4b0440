#!/usr/bin/env python3
"""make_cases.py: small tokenizers, one per construct, with the tokenizers library's ids
and decoded text for a fixed list of texts.

Usage: pip install tokenizers && python3 make_cases.py cases.json.gz

A byte-level BPE of 600 tokens is trained on the texts below; each case then changes one
part of its tokenizer.json (Split behavior and invert, a string pattern, Digits, ByteLevel
options, normalizers, added-token flags, TemplateProcessing, byte_fallback, unk with and
without fuse_unk, ignore_merges). Output: a JSON list of {"name", "tokenizer", "texts":
[{"text", "ids", "decoded"}]} where ids = Tokenizer.encode(text).ids and decoded =
Tokenizer.decode(ids)."""
import copy
import gzip
import json
import sys

from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

TEXTS = [
    "", " ", "  ", "a", "Hello world", "Hello  world  ", " leading space", "trailing space ",
    "tabs\tand\nnewlines\r\nhere", "numbers 12345 and 3.14 and ½ and ٣٤", "x1y22z333",
    "it's they're WE'VE I'm", "naïve café Straße", "e\u0301 decomposed", "Привет мир",
    "你好世界", "emoji 😀👍🏽 here", "a<s>b</s>c", " <s> spaced </s> ", "word<mask>word",
    "word <mask> word", "[SEP]x[SEP]", "new  <pad>  line\n<pad>\n", "<s><s></s>",
    "the quick brown fox jumps over the lazy dog", "mixed 中文 and English 123",
    "   many     spaces   ", "punctuation!!! ??? ... ---", "\u00a0nbsp\u3000ideographic",
    # marks of characters newer than Unicode 9.0 (the library's NFC tables): no reordering
    "a\u0308\U00010f46 o\u031b\ua82c x\u0313\U00011943 m\u036b\U00016ff1 \U00011935\U00011930",
    # letters and digits newer than Debian's Oniguruma tables (Unicode 15 and later)
    "1\U0001d2c5\U0001d2c6 2 x\U00031350\U00031351y \U0002ebf0z \U00011f04\U00011f05 kawi",
]

TRAIN = TEXTS * 20 + ["the then there these those this that thing think thought"] * 50


def base():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    return json.loads(tok.to_str())


def byte_level(prefix=False, regex=False):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": False,
            "use_regex": regex}


def split(pattern, behavior, invert):
    return {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert}


def added(content, id, special=False, normalized=False, lstrip=False, rstrip=False,
          single_word=False):
    return {"id": id, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": normalized, "special": special}


def cases(b):
    n = max(b["model"]["vocab"].values()) + 1
    out = {}
    for behavior in ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]:
        for invert in [False, True]:
            t = copy.deepcopy(b)
            t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
                split({"Regex": r"\s+|\d"}, behavior, invert), byte_level()]}
            out[f"split-{behavior}-{'invert' if invert else 'plain'}"] = t
    for behavior in ["Removed", "MergedWithNext"]:
        t = copy.deepcopy(b)
        t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            split({"String": " "}, behavior, False), byte_level()]}
        out[f"split-string-{behavior}"] = t
    for individual in [False, True]:
        t = copy.deepcopy(b)
        t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": individual}, byte_level()]}
        out[f"digits-{individual}"] = t
    for prefix, regex in [(True, True), (True, False), (False, True)]:
        t = copy.deepcopy(b)
        t["pre_tokenizer"] = byte_level(prefix, regex)
        out[f"bytelevel-prefix-{prefix}-regex-{regex}"] = t
    t = copy.deepcopy(b)
    t["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "_"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "_"}]}
    out["normalizer-prepend-replace"] = t
    t = copy.deepcopy(b)
    t["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}]}
    out["normalizer-nfc-replace-regex"] = t
    t = copy.deepcopy(b)
    t["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "<pad>"}, "content": "<s>"}, {"type": "NFC"}]}
    t["added_tokens"] = [
        added("<s>", n, special=True), added("</s>", n + 1, special=True),
        added("<mask>", n + 2, special=True, lstrip=True, rstrip=True),
        added("[SEP]", n + 3, single_word=True), added("<pad>", n + 4, normalized=True),
        added("  ", n + 5, normalized=True), added("word", n + 6, single_word=True),
        added("<s><s>", n + 7)]
    out["added-tokens"] = t
    t = copy.deepcopy(out["added-tokens"])
    t["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "</s>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<s>": {"id": "<s>", "ids": [n], "tokens": ["<s>"]},
                            "</s>": {"id": "</s>", "ids": [n + 1], "tokens": ["</s>"]}}}]}
    out["template"] = t
    t = copy.deepcopy(b)
    t["model"]["ignore_merges"] = True
    out["ignore-merges"] = t
    # no ByteLevel: characters outside a small vocabulary
    small = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz HEWLOD.")}
    small["<unk>"] = len(small)
    for byte in range(256):
        small[f"<0x{byte:02X}>"] = len(small)
    small["he"] = len(small)
    small["hel"] = len(small)
    plain = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
             "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
             "model": {"type": "BPE", "dropout": None, "unk_token": None,
                       "continuing_subword_prefix": None, "end_of_word_suffix": None,
                       "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                       "vocab": small, "merges": [["h", "e"], ["he", "l"]]}}
    out["byte-fallback"] = plain
    for fuse in [False, True]:
        t = copy.deepcopy(plain)
        t["model"]["vocab"] = {k: v for k, v in small.items() if not k.startswith("<0x")}
        t["model"]["byte_fallback"] = False
        t["model"]["unk_token"] = "<unk>"
        t["model"]["fuse_unk"] = fuse
        out[f"unk-fuse-{fuse}"] = t
    t = copy.deepcopy(out["unk-fuse-True"])
    t["model"]["unk_token"] = None
    out["no-unk"] = t
    return out


def main():
    result = []
    for name, t in cases(base()).items():
        tok = Tokenizer.from_str(json.dumps(t))
        texts = []
        for text in TEXTS:
            ids = tok.encode(text).ids
            texts.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
        result.append({"name": name, "tokenizer": json.loads(tok.to_str()), "texts": texts})
    with gzip.GzipFile(sys.argv[1], "wb", mtime=0) as f:
        f.write(json.dumps(result, ensure_ascii=False).encode())


if __name__ == "__main__":
    main()
