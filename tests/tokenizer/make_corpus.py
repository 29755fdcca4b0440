#!/usr/bin/env python3
"""make_corpus.py: writes the tokenizer test corpus (deterministic: a fixed seed).

Usage: python3 make_corpus.py corpus.bin.gz [MEGABYTES]

The corpus is a sequence of records, each ended by the byte 0x1E (ASCII record
separator, which no record contains). A record mixes fragments: English, German, French,
Russian, Greek, Arabic, Hebrew, Hindi, Chinese, Japanese, Korean, Thai, source code,
numbers and digit runs, runs of spaces and tabs, LF/CR/CRLF line ends, emoji (with ZWJ and
skin tones), combining marks in decomposed form (NFC changes them), contractions in both
cases, special tokens of both fixtures written inside the text, and raw bytes that are not
UTF-8 (a lone continuation byte, a truncated sequence, an overlong form, a surrogate, 0xFF),
and runs of arbitrary code points of planes 0-3 (new scripts, unassigned ones).

Invalid UTF-8: the tokenizers library takes Python str, so bytes reach it decoded with
bytes.decode("utf-8", errors="replace"), which puts U+FFFD for each maximal invalid
subpart; esft's encode applies the same rule to the bytes it is given."""
import gzip
import random
import sys

WORDS = {
    "en": "the quick brown fox jumps over lazy dog it's we're they've I'm you'll he'd "
          "DON'T CAN'T WON'T I'LL SHE'D Hello World tokenizer merges byte-level".split(),
    "de": "Straße Größe Übermäßig Fußgängerübergänge schön Ärger öffentlich".split(),
    "fr": "élève à côté déjà naïve œuvre garçon coïncidence".split(),
    "ru": "Привет мир съешь же ещё этих мягких французских булок".split(),
    "el": "Καλημέρα κόσμε ξεσκεπάζω ψυχοφθόρα βδελυγμία".split(),
    "ar": "مرحبا بالعالم اللغة العربية جميلة جدا".split(),
    "he": "שלום עולם עברית".split(),
    "hi": "नमस्ते दुनिया हिन्दी भाषा".split(),
    "zh": "你好世界中文分词测试机器学习模型的专家混合".split(),
    "ja": "こんにちは世界カタカナひらがな漢字テスト".split(),
    "ko": "안녕하세요 세계 한국어 토큰".split(),
    "th": "สวัสดีชาวโลก ภาษาไทย".split(),
}
CODE = [
    "def f(x):\n    return x**2 + 1\n",
    "for (int i = 0; i < n; i++) { sum += a[i]; }\n",
    "if __name__ == '__main__':\n\tmain()\n",
    "#include <stdio.h>\r\nint main(void) { printf(\"%d\\n\", 42); }\r\n",
    "<div class=\"x\">&amp;&lt;</div>",
    "SELECT id, name FROM users WHERE age >= 18;",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪", "❤️", "🤖", "✨🔥💯"]
DECOMPOSED = ["e\u0301", "A\u030a", "n\u0303", "o\u0308", "\u1100\u1161\u11a8", "a\u0323\u0302"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
           "<tool_call>", "<|padding|>", "|||EMAIL_ADDRESS|||", "|||IP_ADDRESS|||",
           "|||PHONE_NUMBER|||", "<|endoftext|", "<|im_start|><|im_end|>"]
INVALID = [b"\x80", b"\xc3", b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"\xf0\x9f\x98",
           b"\xf4\x90\x80\x80", b"\xfe\xfe"]
SPACES = [" ", "  ", "   ", "    ", "\t", " \t ", "\n", "\r\n", "\r", "\n\n", "  \n  ",
          " " * 9, " " * 25, "\u3000", "\u00a0", "\u2009"]


def number(rng):
    kind = rng.randrange(5)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 15)))
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(6)}f}"
    if kind == 2:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 3:
        return "".join(rng.choice("٠١٢٣٤٥٦٧٨٩") for _ in range(rng.randrange(1, 6)))
    return "½ ² ⅷ 1,234,567.89 3e-10"


def fragment(rng):
    kind = rng.randrange(100)
    if kind < 45:
        words = WORDS[rng.choice(list(WORDS))]
        return " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12))).encode()
    if kind < 55:
        return rng.choice(CODE).encode()
    if kind < 63:
        return number(rng).encode()
    if kind < 73:
        return rng.choice(SPACES).encode()
    if kind < 80:
        return rng.choice(EMOJI).encode()
    if kind < 85:
        return rng.choice(DECOMPOSED).encode()
    if kind < 92:
        return rng.choice(SPECIAL).encode()
    if kind < 96:
        return rng.choice(INVALID)
    if kind < 98:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 8))) \
            .encode("utf-8", "replace")
    # any code point of planes 0-3 (new scripts, marks and ideographs, unassigned ones),
    # mixed with combining marks, spaces and letters: the Unicode tables of NFC and of the
    # regex properties must be the library's
    out = []
    for _ in range(rng.randrange(1, 20)):
        k = rng.random()
        if k < 0.6:
            c = rng.randrange(0x20, 0x40000)
        elif k < 0.8:
            c = rng.randrange(0x300, 0x370)
        else:
            c = rng.choice([0x20, 0x0A, 0x0D, 0x09, 0xA0, 0x3000, 0x2028, 0x85, 0x27, 0x73])
        out.append(chr(0x41 if 0xD800 <= c < 0xE000 or c == 0x1E else c))
    return "".join(out).encode()


def record(rng):
    parts = []
    for _ in range(rng.randrange(1, 12)):
        parts.append(fragment(rng))
        if rng.random() < 0.6:
            parts.append(b" ")
    data = b"".join(parts)
    return data.replace(b"\x1e", b" ")


def main():
    rng = random.Random(13)
    target = float(sys.argv[2] if len(sys.argv) > 2 else 1.1) * 1e6
    records = [b"", b" ", b"Hello world", "  leading and trailing  ".encode(), b"\r\n",
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n".encode()]
    size = sum(len(r) for r in records)
    while size < target:
        records.append(record(rng))
        size += len(records[-1]) + 1
    with gzip.GzipFile(sys.argv[1], "wb", mtime=0) as f:
        for r in records:
            f.write(r + b"\x1e")


if __name__ == "__main__":
    main()
