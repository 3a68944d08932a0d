"""peer_models.py - the model shapes of bench/bench_models.c, shared by the
peers (triton_peer.py, torch_cpu_peer.py) so that both time the same
layers as moe_bench under the same names."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    H: int
    I: int
    E: int
    k: int
    sigmoid: bool = False  # scoring: softmax unless sigmoid
    renormalize: bool = True
    groups: int = 1  # grouped top-k when > 1
    topk_groups: int = 1
    group_top2: bool = False  # a group scores the sum of its best two keys
    scaling: float = 1.0
    clamp: bool = False  # gpt-oss SwiGLU: min/clamp at limit, sigmoid(alpha g), (up + 1)
    alpha: float = 1.702
    limit: float = 7.0
    biases: bool = False  # per-expert w13/w2 biases
    correction: bool = False  # selection-only bias (DeepSeek-V3)


MODELS = [
    Model("mixtral-8x7b", 4096, 14336, 8, 2),
    Model("qwen3-30b-a3b", 2048, 768, 128, 8),
    Model("deepseek-v3", 7168, 2048, 256, 8, sigmoid=True, groups=8, topk_groups=4,
          group_top2=True, scaling=2.5, correction=True),
    Model("ernie-4.5-21b-a3b", 2560, 1536, 64, 6),
    Model("gpt-oss-20b", 2880, 2880, 32, 4, clamp=True, biases=True),
]
MODEL_BY_NAME = {m.name: m for m in MODELS}
