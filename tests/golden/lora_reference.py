#!/usr/bin/env python3
"""LoRA golden fixtures for esft: PEFT adapters on the golden models, their gradients by autograd.

Run from the repository root (after tests/golden/generate.py made the fixtures):
    python3 tests/golden/lora_reference.py
Needs torch, transformers (5.x), peft (0.17 or later), safetensors. For each fixture in
FIXTURES it loads tests/golden/<name>/ with transformers, wraps it with PEFT's LoRA on
every q/k/v/o projection, dense MLP and shared-expert projection, sets A and B to seeded
random values (B nonzero, so that A has a gradient), runs the golden batch as
generate.py's reference does (each packed sample its own forward pass) and writes
tests/golden/<name>/lora_expected.safetensors:
    lora.r, lora.alpha, lora.rslora     scalars (float32)
    lora.attention_only                 1: only the attention's projections adapted
    <PEFT name>                         the adapter, e.g.
                                        base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    grad.<PEFT name>                    d loss / d adapter, loss = mean CE over the labels
    loss                                that loss
    merged.logits                       [N, V] PEFT's merge_and_unload model on the batch
and the adapter itself as PEFT saves it (save_pretrained) in tests/golden/<name>/lora_adapter/
(lora_experts_adapter/ for the expert fixtures below).
and, for each fixture in EXPERT_FIXTURES, tests/golden/<name>/lora_experts_expected.safetensors,
the same with the routed experts adapted too (esft's targets [attention, dense_mlp,
shared_experts, experts]): PEFT's target_parameters on mlp.experts.gate_up_proj [E, 2I, H]
and mlp.experts.down_proj [E, H, I], saved as PEFT saves them,
    base_model.model.model.layers.L.mlp.experts.base_layer.lora_A.weight  [E r, H]  (gate_up)
    base_model.model.model.layers.L.mlp.experts.base_layer.lora_B.weight  [2I, r E]
    base_model.model.model.layers.L.mlp.experts.lora_A.weight             [E r, I]  (down)
    base_model.model.model.layers.L.mlp.experts.lora_B.weight             [H, r E]
with their gradients under grad.<name>.

    python3 tests/golden/lora_reference.py --check-adapter ADAPTER_DIR BASE_DIR DATA_JSON
loads an adapter esft wrote (adapter_model.safetensors + adapter_config.json) with
PeftModel.from_pretrained on BASE_DIR and prints the mean cross-entropy over the samples
of DATA_JSON ({"samples": [{"tokens": [...], "loss_mask": [...]}, ...]}, one forward per
sample, target t+1 counted when loss_mask[t+1] is 1), which the test compares with esft's
eval loss of the merged model on the same samples. DATA may also be esft's prepared
data.h5 (its tokens, offsets and loss_mask datasets; needs h5py).
"""

import json
import os
import sys

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as G  # noqa: E402  (the golden batch and loss conventions)

# one rsLoRA case; different ranks and alphas so a wrong scale shows
FIXTURES = {
    "qwen2_moe": dict(r=4, alpha=8.0, rslora=False),
    "qwen3_moe": dict(r=3, alpha=5.0, rslora=True),
    "olmoe": dict(r=4, alpha=16.0, rslora=False),
    # multi-head latent attention: q_proj (q_lora_rank null) and q_a_proj / q_b_proj; the
    # attention alone (lora.attention_only 1): on deepseek (and qwen3_moe, olmoe, glm4_moe)
    # PEFT 0.21 on transformers 5 turns every target named gate_proj / up_proj / down_proj
    # into target_parameters on the fused experts (peft/utils/transformers_weight_conversion.py,
    # _convert_peft_config_moe), so it cannot adapt their dense MLP or shared experts
    "deepseek_v2": dict(r=3, alpha=6.0, rslora=False, attention_only=True),
    "deepseek_v3": dict(r=2, alpha=3.0, rslora=True, attention_only=True),
}
# esft's train.lora.targets [attention, dense_mlp, shared_experts] as module paths
ATTENTION = r"self_attn\.([qkvo]|q_a|q_b|kv_b)_proj|self_attn\.kv_a_proj_with_mqa"
TARGETS = rf".*\.({ATTENTION}|mlp\.(gate|up|down)_proj|mlp\.shared_experts?\.(gate|up|down)_proj)"
A_STD, B_STD, SEED = 0.2, 0.1, 4242
# the routed experts too (transformers 5's fused expert parameters)
EXPERT_FIXTURES = {
    "qwen2_moe": dict(r=2, alpha=6.0, rslora=False),
    "mixtral": dict(r=3, alpha=4.0, rslora=True),
}
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

torch.set_num_threads(1)


def load(d):
    return transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()


def peft_name(n):
    return n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def reference(model, inp):
    """Each packed sample its own forward (generate.run_reference's way); loss as generate.ce_loss."""
    return G.ce_loss(model, G.per_sample_logits(model, inp), inp["labels"])


def make_fixture(name, spec, index, inp, experts=False):
    d = os.path.join(HERE, name)
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], use_rslora=spec["rslora"], lora_dropout=0.0,
                     target_modules=rf".*\.({ATTENTION})" if spec.get("attention_only") else TARGETS,
                     bias="none", task_type="CAUSAL_LM",
                     target_parameters=EXPERT_PARAMETERS if experts else None)
    model = get_peft_model(load(d), cfg)
    g = torch.Generator().manual_seed(SEED + index)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in sorted(lora.items()):
            p.copy_((A_STD if ".lora_A." in n else B_STD) * torch.randn(p.shape, generator=g))
    loss = reference(model.base_model.model, inp)
    grads = torch.autograd.grad(loss, list(lora.values()))
    out = {"lora.r": torch.tensor(float(spec["r"])), "lora.alpha": torch.tensor(float(spec["alpha"])),
           "lora.rslora": torch.tensor(1.0 if spec["rslora"] else 0.0), "loss": loss.detach().reshape(()),
           "lora.attention_only": torch.tensor(1.0 if spec.get("attention_only") else 0.0)}
    for (n, p), gr in zip(lora.items(), grads):
        out[peft_name(n)] = p.detach().contiguous()
        out["grad." + peft_name(n)] = gr.contiguous()
    # the adapter as PEFT saves it, and the logits of PEFT's merged model (merge_and_unload)
    # on the batch: what esft's eval.adapter folds in must give them
    adapter_dir = os.path.join(d, "lora_experts_adapter" if experts else "lora_adapter")
    model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))  # PEFT's model card, not needed
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = f"tests/golden/{name}"  # not this checkout's path
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with torch.no_grad():
        merged = model.merge_and_unload()
        out["merged.logits"] = G.per_sample_logits(merged, inp).reshape(-1, merged.config.vocab_size)
    out_name = "lora_experts_expected.safetensors" if experts else "lora_expected.safetensors"
    save_file(out, os.path.join(d, out_name), metadata={"format": "pt"})
    print(f"{name}: {len(lora)} adapter tensors, loss {loss.item():.6f}")


def read_samples(path):
    if not path.endswith(".h5"):
        return json.load(open(path))["samples"]
    import h5py
    with h5py.File(path, "r") as f:
        tokens, offsets, mask = f["tokens"][:], f["offsets"][:], f["loss_mask"][:]
    return [{"tokens": tokens[a:b].tolist(), "loss_mask": mask[a:b].tolist()}
            for a, b in zip(offsets[:-1], offsets[1:])]


def check_adapter(adapter_dir, base_dir, data_json):
    model = PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
    loaded = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    samples = read_samples(data_json)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor(s["tokens"])[None]
            logits = model(input_ids=ids, use_cache=False).logits[0].double()
            mask = torch.tensor(s["loss_mask"][1:], dtype=torch.bool)
            targets = ids[0, 1:]
            logp = torch.log_softmax(logits[:-1], -1).gather(1, targets[:, None])[:, 0]
            total += -logp[mask].sum().item()
            count += int(mask.sum())
    print(json.dumps({"adapter_tensors": loaded, "targets": count, "loss": total / count}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--check-adapter":
        check_adapter(*sys.argv[2:5])
        return
    inp = G.make_inputs()
    names = sys.argv[1:]  # only these fixtures (default: all); --experts: the expert ones
    for index, (name, spec) in enumerate(FIXTURES.items()):
        if not names or name in names:
            make_fixture(name, spec, index, inp)
    for index, (name, spec) in enumerate(EXPERT_FIXTURES.items()):
        if not names or "--experts" in names:
            make_fixture(name, spec, 10 + index, inp, experts=True)


if __name__ == "__main__":
    main()
