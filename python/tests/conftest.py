"""conftest.py - what the package's tests share: the devices to run on (the
CPU always; CUDA when torch sees a GPU and libmoe has the CUDA backend),
seeded data, and the float64 reference of a MoE block."""
import pytest
import torch

import moe
from moe import _lib

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _lib.HAVE_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_error(got, ref):
    """Relative Frobenius error of got against ref, in float64."""
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def reference_moe(x, w13, w2, ids, weights, w13_bias=None, w2_bias=None, act="swiglu"):
    """out[t] = sum_j w[t][j] * (down_e(act(gate_e) * up_e)) in float64 on the
    picks (ids, weights); ids of -1 add nothing. w13 [E][2I][H], w2 [E][H][I]."""
    x, w13, w2 = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    ids, weights = ids.cpu(), weights.double().cpu()
    I = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = w13[e] @ x[t]
            if w13_bias is not None:
                gu = gu + w13_bias[e].double().cpu()
            gate, up = gu[:I], gu[I:]
            assert act == "swiglu"
            h = torch.nn.functional.silu(gate) * up
            h = h.to(torch.bfloat16).double()  # the library's bf16 h
            y = w2[e] @ h
            if w2_bias is not None:
                y = y + w2_bias[e].double().cpu()
            out[t] += weights[t, j] * y
    return out


def softmax_topk(logits, k, renormalize):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w
