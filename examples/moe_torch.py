"""moe_torch.py - the Python package in a few lines: a MoE layer from torch
tensors, a forward that captures its routing, the replay of that routing,
and a Hugging Face Qwen3-MoE block patched to run on the library.
Run after `pip install ./python`: python examples/moe_torch.py
"""
import torch
import transformers

import moe

E, H, I, K, T = 16, 256, 128, 4, 8
device = "cuda" if torch.cuda.is_available() and moe._lib.HAVE_CUDA else "cpu"
w13 = (torch.randn(E, 2 * I, H) / H**0.5).to(torch.bfloat16)  # [E][2I][H]: gate rows, then up
w2 = (torch.randn(E, H, I) / I**0.5).to(torch.bfloat16)  # [E][H][I]
layer = moe.MoELayer(w13, w2, top_k=K, renormalize=True)

x = torch.randn(T, H, device=device).to(torch.bfloat16)
logits = torch.randn(T, E, device=device)
out, ids, weights = layer.forward_capture(x, logits)  # routing out
assert torch.equal(layer.forward_routed(x, ids, weights), out)  # routing in: same bits
print(f"{device}: out {tuple(out.shape)}, token 0 -> experts {ids[0].tolist()}")

# A transformers block (random weights here; any loaded model works the same).
cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                  num_experts_per_tok=K, norm_topk_prob=True)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

block = Qwen3MoeSparseMoeBlock(cfg).to(torch.bfloat16)
torch.nn.init.normal_(block.experts.gate_up_proj, std=H**-0.5)
torch.nn.init.normal_(block.experts.down_proj, std=I**-0.5)
torch.nn.init.normal_(block.gate.weight, std=H**-0.5)
wrapper = torch.nn.ModuleDict({"mlp": block}).to(device)
h = torch.randn(1, T, H, device=device).to(torch.bfloat16)
with torch.no_grad():
    want = block(h)
    print("patched:", moe.patch_transformers_moe(wrapper))
    got = block(h)
print(f"relative difference to transformers' bf16 forward: "
      f"{((got.float() - want.float()).norm() / want.float().norm()).item():.2e}")
