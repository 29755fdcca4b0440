#!/usr/bin/env python3
"""make_chat_corpus.py: writes the second tokenizer test corpus, chat.bin.gz (deterministic:
a fixed seed), records in the same form as corpus.bin.gz (see make_corpus.py).

Usage: python3 make_chat_corpus.py chat.bin.gz

corpus.bin.gz holds only OLMoE's and Qwen's special tokens; this one puts every fixture
family's added tokens (DeepSeek-V2/V3, GLM-4.5, gpt-oss harmony, Qwen, OLMoE) inside text:
in each family's chat layout, next to each other, glued to words and spaces, cut short
(a prefix of a token is plain text), and mixed with make_corpus.py's fragments."""
import gzip
import random
import sys

from make_corpus import fragment

SPECIAL = [
    # DeepSeek-V2 / V3
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
    "<｜Assistant｜>", "<｜place▁holder▁no▁7｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>",
    "<｜fim▁hole｜>", "<think>", "</think>",
    # GLM-4.5
    "[gMASK]", "<sop>", "<eop>", "[MASK]", "[sMASK]", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|code_middle|>", "<tool_call>",
    "</tool_call>", "<arg_key>", "</arg_value>", "<tool_response>", "/nothink",
    "<|begin_of_box|>", "<|image|>",
    # gpt-oss harmony
    "<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>",
    "<|return|>", "<|call|>", "<|constrain|>", "<|reserved_200010|>", "<|endofprompt|>",
    # Qwen, OLMoE
    "<|im_start|>", "<|im_end|>", "<|padding|>", "|||EMAIL_ADDRESS|||",
]
CHATS = [
    "<｜begin▁of▁sentence｜>User: {q}\n\nAssistant: {a}<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>{s}<｜User｜>{q}<｜Assistant｜><think>\n{a}\n</think>\n\n{a}"
    "<｜end▁of▁sentence｜>",
    "[gMASK]<sop><|system|>\n{s}<|user|>\n{q}<|assistant|>\n<think>{a}</think>\n{a}"
    "<|observation|>\n<tool_response>\n{a}\n</tool_response>",
    "[gMASK]<sop><|user|>\n{q}/nothink<|assistant|>\n<think></think>\n<tool_call>f\n"
    "<arg_key>x</arg_key>\n<arg_value>{a}</arg_value>\n</tool_call>",
    "<|start|>system<|message|>{s}<|end|><|start|>user<|message|>{q}<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>{a}<|end|>"
    "<|start|>assistant<|channel|>final<|message|>{a}<|return|>",
    "<|start|>assistant<|channel|>commentary to=functions.get <|constrain|>json<|message|>"
    "{{\"q\": \"{q}\"}}<|call|>",
    "<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
    "<|im_start|>assistant\n{a}<|im_end|>\n",
]


def text(rng):
    return b"".join(fragment(rng) for _ in range(rng.randrange(1, 4))) \
        .decode("utf-8", "replace").replace("\x1e", " ")


def record(rng):
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(CHATS).format(s=text(rng), q=text(rng), a=text(rng)).encode()
    parts = []
    for _ in range(rng.randrange(1, 10)):
        k = rng.random()
        token = rng.choice(SPECIAL)
        if k < 0.4:
            parts.append(token.encode())
        elif k < 0.5:
            parts.append(token[:rng.randrange(1, len(token))].encode())
        elif k < 0.6:
            parts.append(rng.choice([" ", "  ", "\n", "x", "\t"]).encode())
        else:
            parts.append(fragment(rng))
    return b"".join(parts).replace(b"\x1e", b" ")


def main():
    rng = random.Random(29)
    records = [s.encode() for s in SPECIAL] + [record(rng) for _ in range(700)]
    with gzip.GzipFile(sys.argv[1], "wb", mtime=0) as f:
        for r in records:
            f.write(r + b"\x1e")


if __name__ == "__main__":
    main()
