#!/usr/bin/env python3
"""bench_tokenizer_hf.py: the Hugging Face `tokenizers` library's encode throughput on the
records of a corpus, single-threaded, printed like bench_tokenizer's line beside it.

Usage: pip install tokenizers &&
       python3 bench_tokenizer_hf.py TOKENIZER.json[.gz] CORPUS.bin.gz [SECONDS]

Each record (ended by byte 0x1E) is decoded with errors="replace" and given to
Tokenizer.encode(text) one at a time (RAYON_NUM_THREADS=1; encode of one text does not
use threads), the corpus repeated until SECONDS (default 3) have passed. Bytes counted are
the records' raw bytes, as bench_tokenizer counts them."""
import gzip
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer  # noqa: E402


def main():
    path, corpus = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    t0 = time.perf_counter()
    if path.endswith(".gz"):
        tok = Tokenizer.from_str(gzip.open(path, "rt", encoding="utf-8").read())
    else:
        tok = Tokenizer.from_file(path)
    load_s = time.perf_counter() - t0
    records = gzip.open(corpus, "rb").read().split(b"\x1e")[:-1]
    texts = [r.decode("utf-8", errors="replace") for r in records]
    raw = sum(len(r) for r in records)
    nbytes = tokens = passes = 0
    t0 = time.perf_counter()
    while True:
        for text in texts:
            tokens += len(tok.encode(text).ids)
        nbytes += raw
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    print(f"tokenizers {path:<40} load {load_s:.2f} s  encode {nbytes / elapsed / 1e6:.2f} MB/s  "
          f"{tokens / elapsed:.0f} tokens/s  ({len(texts)} records x {passes}, 1 thread)")


if __name__ == "__main__":
    main()
