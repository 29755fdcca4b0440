#!/usr/bin/env python3
"""make_family_tokenizers.py: small byte-level BPE tokenizers, trained by the `tokenizers`
library, with the exact pipeline of model families whose real tokenizer.json cannot be
had offline: GLM-4.5 and gpt-oss (see README for where each fact comes from).

Usage: pip install tokenizers && python3 make_family_tokenizers.py FAMILY corpus.bin.gz OUT.json
       FAMILY: glm45 | gpt-oss

The vocabulary is the library's BpeTrainer run on the test corpus (records decoded with
errors="replace") through the family's own pre-tokenizer, so that every merge is one the
family's split could produce; it is small (VOCAB_SIZE) and is not the real table. What is
real: the normalizer, the Split regex and its behavior, the ByteLevel settings, the
post-processor, the decoder, the BPE flags, and the added tokens with their real ids,
flags and contents, at their real ids: the library gives an added token that is not in
the model's vocabulary the next free id whatever the file says, so the vocabulary is filled
up to the first added id with placeholder tokens ("\ue000" and a number: the private-use
character is outside ByteLevel's alphabet, so no text can produce them)."""
import gzip
import json
import sys

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

VOCAB_SIZE = 6000

# GLM-4 tiktoken split (ChatGLM4Tokenizer.pat_str; llama.cpp LLAMA_VOCAB_PRE_TYPE_CHATGLM4,
# the pre-tokenizer llama.cpp assigns to GLM-4.5/GLM-4.5-Air).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GLM-4.5 added tokens from 151329, in id order; the first 18 are the tokenizer_config's
# special tokens, the rest (thinking, tool-call and box markers) are written as text.
GLM45_SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                 "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                 "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>", "<|begin_of_audio|>", "<|end_of_audio|>",
                 "<|begin_of_transcription|>", "<|end_of_transcription|>"]
GLM45_TEXT = ["<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>", "<think>", "</think>",
              "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
              "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>"]

# tiktoken o200k_base (and o200k_harmony) pat_str, tiktoken_ext/openai_public.py.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# Harmony special tokens as transformers' GptOssConverter writes them: the named ones,
# <|reserved_N|> in the free slots up to 200017, <|endofprompt|> at 200018.
HARMONY_NAMED = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>",
                 200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>",
                 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
                 200018: "<|endofprompt|>"}


def added(token_id, content, special):
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special}


def family(name):
    """The family's pattern, added tokens (the first at the base vocabulary's size) and BPE
    ignore_merges flag."""
    if name == "glm45":
        tokens = [added(151329 + i, c, c in GLM45_SPECIAL)
                  for i, c in enumerate(GLM45_SPECIAL + GLM45_TEXT)]
        return GLM4_PATTERN, tokens, False
    if name == "gpt-oss":
        tokens = [added(i, HARMONY_NAMED.get(i, f"<|reserved_{i}|>"), True)
                  for i in range(199998, 200019)]
        return O200K_PATTERN, tokens, True
    sys.exit(f"unknown family {name!r} (glm45, gpt-oss)")


def main():
    pattern, tokens, ignore_merges = family(sys.argv[1])
    records = gzip.open(sys.argv[2], "rb").read().split(b"\x1e")[:-1]
    texts = [r.decode("utf-8", errors="replace") for r in records]

    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = trained["vocab"]
    for i in range(len(vocab), tokens[0]["id"]):
        vocab["\ue000%d" % i] = i

    split_json = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                  "invert": False}
    out = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": tokens,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split_json, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                         "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True,
                           "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": trained["merges"]},
    }
    text = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
    library = Tokenizer.from_str(text)  # the library must take the ids as written
    for t in tokens:
        assert library.token_to_id(t["content"]) == t["id"], t
    with open(sys.argv[3], "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
