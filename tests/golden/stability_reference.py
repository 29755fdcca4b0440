#!/usr/bin/env python3
"""An independent implementation of select.bootstrap (src/stability.h) for
tests/test_stability.c: the same synthetic per-sample statistics, the same seeded
resampling order (xoshiro256** seeded by splitmix64, rng_below without modulo bias),
the selection rule of src/select.h, with numpy for the sums. Prints the expected figures
as C initialisers; paste them into tests/test_stability.c.

    python3 tests/golden/stability_reference.py
"""
import numpy as np

MASK = (1 << 64) - 1
S, LM, E, K = 40, 3, 8, 2
SEED = 20261126
B = 50
TOP_P = 0.4
FRACTIONS = [0.125, 0.25, 0.5, 1.0]


class Rng:
    def __init__(self, seed):
        x = seed & MASK
        self.s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & MASK
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            self.s.append(z ^ (z >> 31))

    @staticmethod
    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & MASK

    def next(self):
        s = self.s
        result = (self.rotl((s[1] * 5) & MASK, 7) * 9) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self.rotl(s[3], 45)
        return result

    def below(self, n):
        if n <= 1:
            return 0
        limit = MASK - MASK % n
        while True:
            x = self.next()
            if x < limit:
                return x % n


def samples():
    """The synthetic statistics: tokens[S], count[S, LM, E], gate[S, LM, E]."""
    tokens = np.array([10 + (i * 7) % 13 for i in range(S)], dtype=np.int64)
    count = np.zeros((S, LM, E), dtype=np.int64)
    gate = np.zeros((S, LM, E))
    for i in range(S):
        for l in range(LM):
            w = [1 + (i * 3 + l * 5 + e * e + (i * e) % 5) % 7 for e in range(E)]
            slots = K * int(tokens[i])
            c = [slots * w[e] // sum(w) for e in range(E)]
            c[0] += slots - sum(c)
            for e in range(E):
                count[i, l, e] = c[e]
                gate[i, l, e] = c[e] * (0.5 + 0.01 * ((i + e + l) % 5))
    return tokens, count, gate


def select_layer(scores):
    order = sorted(range(E), key=lambda e: (-scores[e], e))
    reach = TOP_P * (1.0 - 1e-12)
    total, chosen = 0.0, []
    for e in order:
        if chosen and total >= reach:
            break
        chosen.append(e)
        total += scores[e]
    return chosen


def selection(tokens_sum, count_sum):
    """token score, per layer"""
    out = []
    for l in range(LM):
        scores = [float(count_sum[l, e]) / (K * float(tokens_sum)) for e in range(E)]
        out.append(select_layer(scores))
    return out


def jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def main():
    tokens, count, gate = samples()
    full = selection(tokens.sum(), count.sum(axis=0))
    rng = Rng(SEED)
    layer_j = [0.0] * LM
    inclusion = [[0.0] * E for _ in range(LM)]
    frac_tokens, frac_j = [], []
    for fi, f in enumerate(FRACTIONS):
        n = max(1, int(np.floor(f * S + 0.5)))
        jsum, tsum = 0.0, 0.0
        for _ in range(B):
            rows = [rng.below(S) for _ in range(n)]
            t = int(tokens[rows].sum())
            c = count[rows].sum(axis=0)
            tsum += t
            chosen = selection(t, c)
            for l in range(LM):
                j = jaccard(full[l], chosen[l])
                jsum += j
                if fi == len(FRACTIONS) - 1:
                    layer_j[l] += j / B
                    for e in chosen[l]:
                        inclusion[l][e] += 1.0 / B
        frac_tokens.append(tsum / B)
        frac_j.append(jsum / (B * LM))
    mean_j = sum(x / LM for x in layer_j)
    fmt = lambda xs: ", ".join(repr(float(x)) for x in xs)
    print("full selection:", full)
    print(f"static const double want_layer_jaccard[{LM}] = {{{fmt(layer_j)}}};")
    print(f"static const double want_mean_jaccard = {mean_j!r};")
    print(f"static const double want_fraction_tokens[4] = {{{fmt(frac_tokens)}}};")
    print(f"static const double want_fraction_jaccard[4] = {{{fmt(frac_j)}}};")
    print(f"static const double want_inclusion[{LM}][{E}] = {{")
    for l in range(LM):
        print(f"    {{{fmt(inclusion[l])}}},")
    print("};")


if __name__ == "__main__":
    main()
