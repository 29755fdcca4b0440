#!/usr/bin/env python3
"""make_expected.py: the tokenizers library's ids and decoded text for every corpus record.

Usage: pip install tokenizers && python3 make_expected.py TOKENIZER.json[.gz] corpus.bin.gz OUT.gz

Each record of the corpus (see make_corpus.py) is decoded from bytes with
errors="replace" and encoded with Tokenizer.encode(text) (add_special_tokens=True); its
ids are decoded with Tokenizer.decode(ids) (skip_special_tokens=True, the default). OUT
holds one line per record: the ids separated by spaces, a tab, then "=" where the decoded
text is the record's own bytes, else the decoded text as a JSON string."""
import gzip
import json
import sys

from tokenizers import Tokenizer


def main():
    path = sys.argv[1]
    if path.endswith(".gz"):
        tokenizer = Tokenizer.from_str(gzip.open(path, "rt", encoding="utf-8").read())
    else:
        tokenizer = Tokenizer.from_file(path)
    records = gzip.open(sys.argv[2], "rb").read().split(b"\x1e")[:-1]
    with gzip.GzipFile(sys.argv[3], "wb", mtime=0) as out:
        for data in records:
            text = data.decode("utf-8", errors="replace")
            ids = tokenizer.encode(text).ids
            decoded = tokenizer.decode(ids)
            shown = "=" if decoded.encode() == data else json.dumps(decoded, ensure_ascii=True)
            out.write((" ".join(map(str, ids)) + "\t" + shown + "\n").encode())


if __name__ == "__main__":
    main()
