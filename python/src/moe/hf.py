"""hf.py - patch_transformers_moe: replaces the forward of the MoE blocks of
a loaded Hugging Face transformers model with a MoELayer, converting each
block's expert weights once (at the block's first call, on its device).

Known blocks (transformers 5.x, tested with the version in README.md); each
also keeps what transformers' forward returns (a tensor, or a tuple).
Qwen3-MoE (Qwen3MoeSparseMoeBlock) and Mixtral (MixtralSparseMoeBlock):
a router linear `gate.weight` [E][H], fused experts `experts.gate_up_proj`
[E][2I][H] (gate rows, then up) and `experts.down_proj` [E][H][I], softmax
top-k (renormalized: Mixtral always, Qwen3 by norm_topk_prob), SiLU gate.
The router logits are computed as transformers does (a bf16 linear of the
block's input), then routing and experts run in libmoe.

gpt-oss (GptOssMLP): router with a bias, top-k of the logits then a
softmax over the k (the same as libmoe's softmax, top-k and renormalize),
experts `gate_up_proj` [E][H][2I] with gate and up interleaved (even and odd
columns: de-interleaved once into the [in][out] layout, gate block first),
biases, the clamped SwiGLU (alpha, limit); it returns (out, router_scores),
the scores being the captured routing weights.

DeepSeek-V3 (DeepseekV3MoE): fp32 router logits, sigmoid scores, the
correction bias (selection only), groups scored by their top two
(n_group, topk_group), norm_topk_prob, routed_scaling_factor; the routed
experts run in libmoe and the block's own shared_experts are added.

Llama-4 (Llama4TextMoe): top-k of the logits, sigmoid of the picks applied
to the expert input (MOE_ROUTER_WEIGHT_ON_INPUT), experts `gate_up_proj`
[E][H][2I] (gate half, then up: the [in][out] layout as it is), plus the
block's shared_expert; it returns (out, router_logits).
"""
import types

import torch

from .layer import MoELayer

_KNOWN = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock", "GptOssMLP", "DeepseekV3MoE",
          "Llama4TextMoe")


def _moe_blocks(model):
    """(name, module) of every module whose class name looks like a MoE block."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in _KNOWN or (cls.endswith(("SparseMoeBlock", "MoeBlock", "MoE", "Moe"))
                             and hasattr(module, "experts")):
            yield name, module


def _layer_for(module, max_tokens):
    cls = type(module).__name__
    if cls not in _KNOWN:
        raise NotImplementedError(
            f"moe.patch_transformers_moe: {cls} is not a MoE block this package knows "
            f"(known: {', '.join(_KNOWN)}); pass skip_unknown=True to leave it as it is")
    experts = module.experts
    if cls == "GptOssMLP":
        gu, gu_bias = experts.gate_up_proj.data, experts.gate_up_proj_bias.data
        w13 = torch.cat([gu[..., ::2], gu[..., 1::2]], dim=-1)  # [E][H][2I], gate block first
        b13 = torch.cat([gu_bias[..., ::2], gu_bias[..., 1::2]], dim=-1)
        return MoELayer(w13, experts.down_proj.data, module.router.top_k, layout="in_out",
                        renormalize=True, activation="swiglu_clamp",
                        swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit),
                        w13_bias=b13, w2_bias=experts.down_proj_bias.data, max_tokens=max_tokens)
    if cls == "Llama4TextMoe":
        return MoELayer(experts.gate_up_proj.data, experts.down_proj.data, module.router.top_k,
                        layout="in_out", scoring="sigmoid", router_weight_on_input=True,
                        max_tokens=max_tokens)
    gate = module.gate
    if cls == "DeepseekV3MoE":
        groups = int(gate.num_group)
        return MoELayer(experts.gate_up_proj.data, experts.down_proj.data, gate.top_k,
                        scoring="sigmoid", renormalize=bool(gate.norm_topk_prob),
                        num_groups=groups if groups > 1 else 0,
                        topk_groups=int(gate.topk_group) if groups > 1 else 0,
                        group_scoring="top2_sum",
                        routed_scaling_factor=float(gate.routed_scaling_factor),
                        correction_bias=gate.e_score_correction_bias.data, max_tokens=max_tokens)
    act = getattr(experts, "act_fn", None)
    act_name = type(act).__name__ if act is not None else "SiLU"
    if act_name not in ("SiLU", "SiLUActivation"):
        raise NotImplementedError(f"moe.patch_transformers_moe: {cls} uses {act_name}, "
                                  "not SiLU")
    renormalize = True if cls == "MixtralSparseMoeBlock" else bool(gate.norm_topk_prob)
    return MoELayer(experts.gate_up_proj.data, experts.down_proj.data, gate.top_k,
                    renormalize=renormalize, activation="swiglu", max_tokens=max_tokens)


def _patched_forward(self, hidden_states):
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = torch.nn.functional.linear(x, self.gate.weight)
    out = self._moe_layer.forward(x.to(torch.bfloat16), logits)
    return out.to(hidden_states.dtype).reshape(shape)


def _patched_gpt_oss_forward(self, hidden_states):
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = torch.nn.functional.linear(x, self.router.weight, self.router.bias)
    out, _, scores = self._moe_layer.forward_capture(x.to(torch.bfloat16), logits)
    return out.to(hidden_states.dtype).reshape(shape), scores.to(hidden_states.dtype)


def _patched_deepseek_v3_forward(self, hidden_states):
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = torch.nn.functional.linear(x.float(), self.gate.weight.float())
    out = self._moe_layer.forward(x.to(torch.bfloat16), logits)
    return out.to(hidden_states.dtype).reshape(shape) + self.shared_experts(hidden_states)


def _patched_llama4_forward(self, hidden_states):
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.router.weight, self.router.bias)
    out = self._moe_layer.forward(x.to(torch.bfloat16), logits).to(x.dtype)
    return self.shared_expert(x) + out, logits


_FORWARDS = {"GptOssMLP": _patched_gpt_oss_forward, "DeepseekV3MoE": _patched_deepseek_v3_forward,
             "Llama4TextMoe": _patched_llama4_forward}


def patch_transformers_moe(model, *, max_tokens=1024, skip_unknown=False):
    """Replaces the forward of every MoE block of model (in place) with a
    libmoe layer; returns the list of patched module names. A block of an
    unknown kind raises NotImplementedError naming it (before anything is
    patched), unless skip_unknown is True."""
    blocks = list(_moe_blocks(model))
    layers = []
    for name, module in blocks:
        try:
            layers.append((name, module, _layer_for(module, max_tokens)))
        except NotImplementedError:
            if not skip_unknown:
                raise
    for name, module, layer in layers:
        module._moe_layer = layer
        forward = _FORWARDS.get(type(module).__name__, _patched_forward)
        module.forward = types.MethodType(forward, module)
    return [name for name, _, _ in layers]
