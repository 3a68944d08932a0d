"""peer_random.py - the inputs the peers (triton_peer.py, torch_cpu_peer.py)
draw, shared so that both draw them the same way as moe_bench:

- random_normal: weights and activations, N(0, scale^2) as bench_random.c
  shapes it (the sum of four uniforms), from torch's generator. Only the
  distribution matches moe_bench, not the values: speed does not depend on
  the values of the weights.
- bench_random_f32: bench_random.c's bench_random_f32 bit for bit, for the
  router logits (moe_bench's seed + 7) and DeepSeek's correction bias
  (seed + 5). Routing does depend on these values: with the same logits
  both sides route the same tokens to the same experts and read the same
  weight bytes.

torch is imported by the callers (torch_cpu_peer.py may install it first),
so it is imported here only inside the functions.
"""
import math

M32, M64 = (1 << 32) - 1, (1 << 64) - 1


def random_normal(shape, scale, gen, dtype, device="cpu"):
    """Approximately N(0, scale^2): the sum of four uniforms (Irwin-Hall of
    order 4) rescaled to unit variance. Filled in chunks so that the fp32
    temporaries stay small next to the weights."""
    import torch

    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    chunk = 1 << 24
    for begin in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - begin)
        u = torch.rand((4, n), generator=gen, device=device, dtype=torch.float32).sum(0)
        flat[begin:begin + n] = ((u - 2.0) * (math.sqrt(3.0) * scale)).to(dtype)
    return out


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _keyed_hash(x, lo, hi):
    """bench_random.c's keyed_hash on int64 tensors holding uint32 values
    (the products wrap, their low 32 bits are the C ones)."""
    x = x ^ lo
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ hi
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def bench_random_f32(count, scale, seed):
    """The values of bench_random.c's bench_random_f32(count, scale, seed),
    bit for bit, as a float32 CPU tensor."""
    import torch

    chunk = 1 << 16
    out = torch.empty(count, dtype=torch.float32)
    step = torch.tensor(1.7320508, dtype=torch.float32) / 65536.0
    for c in range((count + chunk - 1) // chunk):
        key = _splitmix64(seed ^ _splitmix64(c))
        lo, hi = key & M32, key >> 32
        n = min(chunk, count - c * chunk)
        j = torch.arange(n, dtype=torch.int64)
        a, b = _keyed_hash(2 * j, lo, hi), _keyed_hash(2 * j + 1, lo, hi)
        total = (a & 0xFFFF) + (a >> 16) + (b & 0xFFFF) + (b >> 16)
        normal = (total - 131070).to(torch.float32) * step
        out[c * chunk:c * chunk + n] = torch.tensor(scale, dtype=torch.float32) * normal
    return out
