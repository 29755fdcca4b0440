#!/usr/bin/env python3
"""ESFT-adapter golden fixtures: an adapter as esft's train phase writes it, applied to the
transformers 5 model by apply_esft_adapter.py, and the logits that gives.

Run from the repository root (after tests/golden/generate.py made the fixtures):
    python3 tests/golden/esft_adapter_reference.py
Needs torch, transformers (5.x), safetensors. For each fixture in FIXTURES it writes
tests/golden/<name>/esft_adapter/:
    adapter.safetensors   the base checkpoint's tensors of 2-3 routed experts per MoE layer
                          (gate, up, down) and of the last MoE layer's router, perturbed
                          (N(0, 0.05) added, seeded), under their checkpoint names, as
                          esft's export_adapter names them; float32 like the base
    expected.safetensors  the golden batch (input_ids, position_ids, segment_ids, labels)
                          and `logits`: the transformers model with the adapter applied by
                          apply_esft_adapter, each packed sample its own forward pass
                          (generate.py's reference)
and, for gpt_oss (which apply_esft_adapter refuses), the same files with the adapter put
by hand into transformers' fused layout (gpt_oss_fixture); and checks, before writing, that
  - those logits equal (within 1e-5) the logits of transformers loading, with its own
    from_pretrained, a merged checkpoint made by overwriting the base checkpoint's
    tensors with the adapter's (so the function is checked against transformers' loader);
  - they differ from the base model's (the adapter changed something);
  - no router has a near-tie (consecutive sorted probabilities of the top k+1 apart by
    more than 1e-3; else the perturbation seed is raised);
  - apply_esft_adapter refuses a family it does not know (gpt_oss).
"""

import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as G  # noqa: E402  (the golden batch and its reference forward)
from apply_esft_adapter import EXPERT_LAYOUT, apply_esft_adapter  # noqa: E402

FIXTURES = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral"]
# the other families apply_esft_adapter knows: checked against from_pretrained(merged) the
# same way, no fixture written (esft's test covers its own loader through FIXTURES)
CHECK_ONLY = ["deepseek_v2", "deepseek_v3", "glm4_moe"]
SEED, STD = 5150, 0.05
torch.set_num_threads(1)


def load(d):
    return transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()


def make_adapter(base, family, num_layers, seed):
    """The perturbed tensors: experts (2l+1, 2l+4) mod E of each MoE layer l, expert
    (l+3) mod E too in the first one, and the last MoE layer's router (layers past
    num_hidden_layers, multi-token prediction, are not the model's)."""
    moe, parts = EXPERT_LAYOUT[family]
    layers = sorted({int(n.split(".")[2]) for n in base if f".{moe}.experts." in n})
    layers = [l for l in layers if l < num_layers]
    experts = 1 + max(int(n.split(".")[5]) for n in base if f".{moe}.experts." in n)
    g = torch.Generator().manual_seed(seed)
    names = []
    for l in layers:
        chosen = [(2 * l + 1) % experts, (2 * l + 4) % experts] + ([(l + 3) % experts] if l == layers[0] else [])
        for e in chosen:
            names += [f"model.layers.{l}.{moe}.experts.{e}.{part}.weight" for part in parts]
    names.append(f"model.layers.{layers[-1]}.{moe}.gate.weight")
    return {n: (base[n] + STD * torch.randn(base[n].shape, generator=g)).contiguous() for n in names}


def merged_logits(d, adapter, inp):
    """transformers' from_pretrained of the base checkpoint with the adapter's tensors put
    over it by name (the independent route), per-sample logits."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(d):
            if f in ("config.json", "generation_config.json"):
                shutil.copy(os.path.join(d, f), tmp)
        base, _ = G.read_checkpoint(d)
        assert adapter.keys() <= base.keys()
        base.update(adapter)
        save_file(base, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with torch.no_grad():
            return G.per_sample_logits(load(tmp), inp)


def make_fixture(name, index, inp, write=True):
    d = os.path.join(HERE, name)
    config = transformers.AutoConfig.from_pretrained(d)
    family = config.model_type
    base, _ = G.read_checkpoint(d)
    with torch.no_grad():
        base_logits = G.per_sample_logits(load(d), inp)
    for attempt in range(50):
        seed = SEED + 100 * index + attempt
        adapter = make_adapter(base, family, config.num_hidden_layers, seed)
        model = load(d)
        applied = apply_esft_adapter_from(model, adapter)
        margin = G.min_margin(G.forward_routers(model, inp))
        if margin > G.MIN_MARGIN:
            break
        print(f"  {name}: adapter seed {seed} has a router near-tie ({margin:.2e}), reseeding")
    else:
        raise RuntimeError(f"{name}: no adapter seed without router near-ties")
    with torch.no_grad():
        logits = G.per_sample_logits(model, inp)
    reloaded = merged_logits(d, adapter, inp)
    diff = G.maxdiff(logits, reloaded)
    assert diff <= G.TOL, f"{name}: apply_esft_adapter vs from_pretrained(merged): {diff}"
    moved = G.maxdiff(logits, base_logits)
    assert moved > 1e-2, f"{name}: the adapter moved the logits by only {moved}"
    if not write:
        print(f"{name} (checked, not written): {applied} adapter tensors; logits vs "
              f"from_pretrained(merged) {diff:.1e}, vs the base model {moved:.2f}")
        return

    write_fixture(d, adapter, logits, inp)
    print(f"{name}: seed {seed}, {applied} adapter tensors, router margin {margin:.2e}; logits vs "
          f"from_pretrained(merged) {diff:.1e}, vs the base model {moved:.2f}")


def apply_esft_adapter_from(model, adapter):
    """apply_esft_adapter reads a file: the tensors go through one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        save_file(adapter, path, metadata={"format": "pt"})
        return apply_esft_adapter(model, path)


def gpt_oss_fixture(inp):
    """gpt_oss, which apply_esft_adapter refuses: the same adapter choice (experts and their
    gate, up, down matrices as esft names them, [I, H], [I, H], [H, I]; bf16 values, the
    base checkpoint's dtype, as esft writes them) put by hand into transformers' fused
    layout (gate_up_proj [E, H, 2I], gate columns even and up odd; down_proj [E, I, H]),
    for esft --apply-adapter's merged checkpoint to match; no router perturbed."""
    import generate_gpt_oss as GO
    d = os.path.join(HERE, "gpt_oss")
    with torch.no_grad():
        base_logits = G.per_sample_logits(load(d), inp)
    for attempt in range(50):
        seed = SEED + 900 + attempt
        g = torch.Generator().manual_seed(seed)
        model = load(d)
        adapter = {}
        with torch.no_grad():
            for l, layer in enumerate(model.model.layers):
                fused = layer.mlp.experts
                experts = fused.gate_up_proj.shape[0]
                for e in [(2 * l + 1) % experts, (2 * l + 4) % experts]:
                    pre = f"model.layers.{l}.mlp.experts.{e}"
                    old = {"gate": fused.gate_up_proj[e][:, ::2].T, "up": fused.gate_up_proj[e][:, 1::2].T,
                           "down": fused.down_proj[e].T}
                    new = {k: (v + STD * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in old.items()}
                    for k, v in new.items():
                        adapter[f"{pre}.{k}_proj.weight"] = v.contiguous()
                    fused.gate_up_proj[e][:, ::2] = new["gate"].float().T
                    fused.gate_up_proj[e][:, 1::2] = new["up"].float().T
                    fused.down_proj[e] = new["down"].float().T
        margin, _ = GO.probe(model, inp)
        if margin > G.MIN_MARGIN:
            break
        print(f"  gpt_oss: adapter seed {seed} has a router near-tie ({margin:.2e}), reseeding")
    else:
        raise RuntimeError("gpt_oss: no adapter seed without router near-ties")
    with torch.no_grad():
        logits = G.per_sample_logits(model, inp)
    moved = G.maxdiff(logits, base_logits)
    assert moved > 1e-2, f"gpt_oss: the adapter moved the logits by only {moved}"
    write_fixture(d, adapter, logits, inp)
    print(f"gpt_oss: seed {seed}, {len(adapter)} adapter tensors (by hand into the fused layout), "
          f"router logit margin {margin:.2e}; vs the base model {moved:.2f}")


def write_fixture(d, adapter, logits, inp):
    out = os.path.join(d, "esft_adapter")
    os.makedirs(out, exist_ok=True)
    save_file(adapter, os.path.join(out, "adapter.safetensors"), metadata={"format": "pt"})
    t = {k: inp[k].contiguous() for k in ("input_ids", "position_ids", "segment_ids", "labels")}
    t["logits"] = logits.float().contiguous()
    save_file(t, os.path.join(out, "expected.safetensors"), metadata={"fixture": os.path.basename(d)})
    for f in os.listdir(out):
        os.chmod(os.path.join(out, f), 0o644)


def check_refusal():
    d = os.path.join(HERE, "gpt_oss")
    if not os.path.isdir(d):
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    try:
        apply_esft_adapter_from(model, {"lm_head.weight": model.lm_head.weight.detach().clone()})
    except ValueError as e:
        assert "gpt_oss" in str(e), e
        print(f"gpt_oss refused: {e}")
        return
    raise AssertionError("apply_esft_adapter accepted a gpt_oss model")


def main():
    inp = G.make_inputs()
    for index, name in enumerate(FIXTURES):
        make_fixture(name, index, inp)
    for index, name in enumerate(CHECK_ONLY):
        make_fixture(name, len(FIXTURES) + index, inp, write=False)
    gpt_oss_fixture(inp)
    check_refusal()


if __name__ == "__main__":
    main()
