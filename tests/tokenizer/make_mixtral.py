#!/usr/bin/env python3
"""make_mixtral.py: Mixtral-8x7B's tokenizer.json in both forms Hugging Face files come in,
converted from the SentencePiece model by transformers' own converter.

Usage: pip install "transformers<5" sentencepiece protobuf
       pip download --no-deps mistral-common==1.13.1   (then unzip the wheel)
       python3 make_mixtral.py tokenizer.model.v1 OUT_LEGACY.json OUT_METASPACE.json

tokenizer.model.v1 is mistral_common/data/tokenizer.model.v1 of the PyPI package
mistral-common 1.13.1 (Apache-2.0; sha256 dadfd56d...5e134055): the SentencePiece model of
Mistral-7B-v0.1 and Mixtral-8x7B-v0.1. LlamaTokenizerFast(add_prefix_space=True, from_slow=True) runs
transformers' LlamaConverter (4.57.6 when generated; 5.x no longer converts this way),
which writes
 - with legacy=True: normalizer Sequence[Prepend("▁"), Replace(" " -> "▁")], no
   pre-tokenizer (the form of Mixtral's file on the Hugging Face hub);
 - with legacy=False: no normalizer, pre-tokenizer Metaspace(prepend_scheme "first",
   split false).
Both get the decoder Sequence[Replace("▁" -> " "), ByteFallback, Fuse, Strip(" ", 1, 0)]
and the post-processor TemplateProcessing "<s> $A" (add_bos_token, no eos)."""
import json
import sys
import tempfile

from transformers import LlamaTokenizerFast


def main():
    model = sys.argv[1]
    for legacy, path in [(True, sys.argv[2]), (False, sys.argv[3])]:
        tok = LlamaTokenizerFast(vocab_file=model, legacy=legacy, add_prefix_space=True,
                                 from_slow=True)
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            data = json.load(open(d + "/tokenizer.json", encoding="utf-8"))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main()
