#!/usr/bin/env python3
"""The sequence-level balance loss of the ESFT reference's DeepSeek code, written out by hand,
on the deepseek_v2 golden fixtures: its value and its gradient with respect to every weight.

Run from the repository root:   python3 tests/golden/seq_aux_reference.py
Needs torch, transformers (5.x), safetensors. Reads tests/golden/{deepseek_v2,deepseek_v2_grouped}/ and writes
seq_aux.safetensors beside each fixture's expected.safetensors.

The formula (deepseek-ai/ESFT, deepseek/modeling_deepseek.py, MoEGate.forward with seq_aux, in training): per MoE
layer, with the router's softmax scores s [B, T, E] (unmasked, also under group_limited_greedy) and the chosen
experts of every token (K per token) of each of the B sequences of T tokens,
    ce[b, e]  = (number of the sequence's T*K choices that are e) / (T*K / E)
    aux_layer = alpha * mean_b sum_e ce[b, e] * mean_t s[b, t, e]
ce carries no gradient; the loss is CE + sum over MoE layers of aux_layer. Here alpha = 1 and the sequences are
the fixture's two rows of 13 tokens (row 1 packs two samples: a sequence is a row, whatever it packs), and every
token runs as the fixtures' independent reference does (each packed sample its own forward pass).
"""

import os
import sys

import torch
import transformers
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as G  # noqa: E402

torch.set_num_threads(1)
FIXTURES = ["deepseek_v2", "deepseek_v2_grouped"]


def main():
    inp = G.make_inputs()
    for name in FIXTURES:
        d = os.path.join(HERE, name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
        model.eval()
        captured = {}
        hooks = []
        for mname, mod in model.named_modules():
            if mname.endswith(".mlp.gate") and type(mod).__name__.endswith("TopkRouter"):
                layer = int(mname.split(".")[2])

                def hook(_mod, _inp, out, layer=layer):
                    logits, _weights, ids = out
                    captured.setdefault(layer, []).append((logits, ids))
                hooks.append(mod.register_forward_hook(hook))
        for b, segs in enumerate(G.SEGMENTS):
            for start, n in segs:
                model(input_ids=inp["input_ids"][b:b + 1, start:start + n],
                      position_ids=torch.arange(n)[None], use_cache=False)
        for h in hooks:
            h.remove()
        E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
        total = 0.0
        for layer in sorted(captured):
            logits = torch.cat([c[0] for c in captured[layer]], 0)          # [B*T, E], in token order
            ids = torch.cat([c[1] for c in captured[layer]], 0)             # [B*T, K]
            scores = logits.float().softmax(dim=-1).view(G.B, G.T, E)
            ce = torch.zeros(G.B, E)
            ce.scatter_add_(1, ids.view(G.B, -1), torch.ones(G.B, G.T * K)).div_(G.T * K / E)
            total = total + (ce * scores.mean(dim=1)).sum(dim=1).mean()
        names = [n for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(total, [p for _, p in model.named_parameters()], allow_unused=True)
        out = {"seq_aux_loss": total.detach().float().reshape(())}
        for n, g in G.to_checkpoint_names(name, {n: (g if g is not None else torch.zeros_like(p))
                                                 for (n, p), g in zip(model.named_parameters(), grads)}).items():
            out[f"grad_seq_aux.{n}"] = g.detach().float().contiguous()
        save_file(out, os.path.join(d, "seq_aux.safetensors"), metadata={"format": "pt"})
        print(f"{name}: seq aux {total.item():.7f} over {len(captured)} MoE layers, {len(names)} gradients")


if __name__ == "__main__":
    main()
