"""apply_esft_adapter: esft's ESFT adapter put into a transformers 5 model, in place.

esft's adapter (RUN.OUTPUT_DIR/adapter/adapter.safetensors) holds the trained tensors
under their checkpoint names, a routed expert's matrices one per tensor:
model.layers.L.mlp.experts.E.gate_proj.weight (mixtral: block_sparse_moe.experts.E.w1).
transformers 5 holds a layer's routed experts fused (its conversion_mapping.py fuses them
on load): experts.gate_up_proj [E, 2I, H], gate rows first then up, and experts.down_proj
[E, H, I]; so an expert's matrix is a slice of a parameter, which no state_dict key names.
This function writes each adapter tensor into its slice (gate -> gate_up_proj[E, :I],
up -> gate_up_proj[E, I:], down -> down_proj[E]) and every other tensor into the
parameter of its name (mixtral's block_sparse_moe is transformers' mlp).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("BASE", dtype="auto")
    apply_esft_adapter(model, "out/run/adapter/adapter.safetensors")

The same model results from `esft --apply-adapter ADAPTER DECK` (a merged checkpoint that
from_pretrained loads). Families: qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v2,
deepseek_v3, glm4_moe; others (gpt_oss: its fused experts are transposed and gate/up
interleaved) are refused: use the merged checkpoint there.
"""

import re

import torch
from safetensors.torch import load_file

# per family: the MoE module's checkpoint name, each expert matrix's name -> (fused
# parameter, half of gate_up_proj: 0 gate rows, 1 up rows, None the whole expert)
_QWEN_STYLE = ("mlp", {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                       "down_proj": ("down_proj", None)})
EXPERT_LAYOUT = {
    "qwen2_moe": _QWEN_STYLE,
    "qwen3_moe": _QWEN_STYLE,
    "olmoe": _QWEN_STYLE,
    "deepseek_v2": _QWEN_STYLE,
    "deepseek_v3": _QWEN_STYLE,
    "glm4_moe": _QWEN_STYLE,
    "mixtral": ("block_sparse_moe", {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
                                     "w2": ("down_proj", None)}),
}
# checkpoint name -> module parameter name, where transformers 5 renames on load
RENAMES = {"mixtral": [(".block_sparse_moe.", ".mlp.")]}


def apply_esft_adapter(model, adapter_path):
    """Writes the adapter's tensors over model's weights (in the model's dtype) and returns
    how many it wrote; raises ValueError for a family it does not know, a name the model
    does not have, or a shape that differs."""
    family = model.config.model_type
    if family not in EXPERT_LAYOUT:
        raise ValueError(f"apply_esft_adapter: model_type {family!r} is not supported "
                         f"(supported: {', '.join(sorted(EXPERT_LAYOUT))}); load the merged "
                         f"checkpoint of `esft --apply-adapter` instead")
    moe, parts = EXPERT_LAYOUT[family]
    expert = re.compile(rf"^(.*\.layers\.\d+)\.{moe}\.experts\.(\d+)\.(\w+)\.weight$")
    params = dict(model.named_parameters())
    adapter = load_file(adapter_path)
    with torch.no_grad():
        for name, tensor in adapter.items():
            m = expert.match(name)
            if m and m.group(3) in parts:
                fused, half = parts[m.group(3)]
                key = f"{m.group(1)}.mlp.experts.{fused}"
                if key not in params:
                    raise ValueError(f"apply_esft_adapter: {name}: the model has no {key}")
                target = params[key][int(m.group(2))]
                if half is not None:
                    width = target.shape[0] // 2
                    target = target[half * width:(half + 1) * width]
            else:
                key = name
                for old, new in RENAMES.get(family, []):
                    key = key.replace(old, new)
                if key not in params:
                    raise ValueError(f"apply_esft_adapter: {name} is not a parameter of the "
                                     f"{family} model")
                target = params[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"apply_esft_adapter: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(target.shape)}")
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
    return len(adapter)
