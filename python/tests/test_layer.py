"""test_layer.py - moe.MoELayer on each device: the forward against float64,
capture and replay giving the same bits, -1 ids, ids outside the experts,
chunks past max_tokens, both weight layouts with biases and an expert map,
errors as MoeError with the library's message, the custom ops under
torch.library.opcheck and torch.compile, and (CUDA) graph capture."""
import pytest
import torch

import moe
from moe import MoeError, _lib

from conftest import reference_moe, rel_error, softmax_topk

E, H, I, K = 8, 64, 48, 2


def make(seed=0, E=E, H=H, I=I):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    return w13, w2, g


def test_forward_matches_float64(device):
    w13, w2, g = make(1)
    layer = moe.MoELayer(w13.to(device), w2.to(device), K, renormalize=True)
    x = torch.randn(37, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(37, E, generator=g)
    out = layer.forward(x.to(device), logits.to(device))
    assert out.device.type == device.type and out.dtype == torch.bfloat16
    ids, w = softmax_topk(logits, K, True)
    ref = reference_moe(x, w13, w2, ids, w)
    assert rel_error(out, ref) <= 1e-2


def test_capture_replay_is_bitwise(device):
    w13, w2, g = make(2)
    layer = moe.MoELayer(w13, w2, K, renormalize=True)
    x = torch.randn(20, H, generator=g).to(torch.bfloat16).to(device)
    logits = torch.randn(20, E, generator=g).to(device)
    plain = layer.forward(x, logits)
    out, ids, w = layer.forward_capture(x, logits)
    assert torch.equal(out, plain)
    ref_ids, ref_w = softmax_topk(logits.cpu(), K, True)
    assert torch.equal(ids.cpu().long(), ref_ids)
    assert torch.allclose(w.cpu(), ref_w, rtol=1e-5, atol=1e-7)
    assert torch.equal(layer.forward_routed(x, ids, w), plain)
    # int64 ids (torch.topk's) are accepted too.
    assert torch.equal(layer.forward_routed(x, ids.long(), w), plain)


def test_minus_one_ids_add_nothing(device):
    w13, w2, g = make(3)
    layer = moe.MoELayer(w13, w2, K)
    x = torch.randn(6, H, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[0, -1], [-1, -1], [3, 3], [7, -1], [-1, 2], [5, 6]], dtype=torch.int32)
    w = torch.rand(6, K, generator=g)
    out = layer.forward_routed(x.to(device), ids.to(device), w.to(device))
    assert torch.all(out[1] == 0)
    assert rel_error(out, reference_moe(x, w13, w2, ids, w)) <= 1e-2


def test_out_of_range_ids(device):
    w13, w2, g = make(4)
    layer = moe.MoELayer(w13, w2, K)
    x = torch.randn(3, H, generator=g).to(torch.bfloat16).to(device)
    w = torch.rand(3, K, generator=g).to(device)
    ids = torch.tensor([[0, 1], [2, E], [4, 5]], dtype=torch.int32, device=device)
    if device.type == "cpu":
        with pytest.raises(MoeError) as info:
            layer.forward_routed(x, ids, w)
        assert info.value.status == _lib.ERROR_INVALID_ARGUMENT
        assert "topk_ids[1][1] = 8" in str(info.value)
    else:  # GPUs skip such ids on the device (include/moe.h)
        minus = ids.clone()
        minus[1, 1] = -1
        assert torch.equal(layer.forward_routed(x, ids, w), layer.forward_routed(x, minus, w))


def test_chunks_past_max_tokens(device):
    w13, w2, g = make(5)
    layer = moe.MoELayer(w13, w2, K, renormalize=True, max_tokens=4)
    x = torch.randn(11, H, generator=g).to(torch.bfloat16).to(device)
    logits = torch.randn(11, E, generator=g).to(device)
    whole = layer.forward(x, logits)
    parts = torch.cat([layer.forward(x[i:i + 4], logits[i:i + 4]) for i in range(0, 11, 4)])
    assert torch.equal(whole, parts)


def test_in_out_layout_biases_and_expert_map(device):
    w13, w2, g = make(6, E=4)
    b13 = torch.randn(4, 2 * I, generator=g) * 0.1
    b2 = torch.randn(4, H, generator=g) * 0.1
    emap = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)  # 8 router ids
    layer = moe.MoELayer(w13.transpose(1, 2), w2.transpose(1, 2), K, layout="in_out",
                         w13_bias=b13, w2_bias=b2, expert_map=emap)
    assert layer.num_experts == 8
    x = torch.randn(9, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(9, 8, generator=g)
    out, ids, w = layer.forward_capture(x.to(device), logits.to(device))
    local = emap[ids.cpu().long()]
    ref = reference_moe(x, w13, w2, local, w.cpu(), b13, b2)
    assert rel_error(out, ref) <= 1e-2


def test_errors_raise_moe_error():
    w13, w2, _ = make(7)
    with pytest.raises(ValueError):
        moe.MoELayer(w13, w2[:, :, :5], K)
    with pytest.raises(MoeError) as info:
        moe.MoELayer(w13, w2, E + 1)._layer(torch.device("cpu"))
    assert info.value.status == _lib.ERROR_INVALID_ARGUMENT
    assert "top_k" in info.value.message


def test_empty_batch(device):
    w13, w2, _ = make(8)
    layer = moe.MoELayer(w13, w2, K)
    x = torch.empty(0, H, dtype=torch.bfloat16, device=device)
    assert layer.forward(x, torch.empty(0, E, device=device)).shape == (0, H)


def test_opcheck_and_compile(device):
    w13, w2, g = make(9)
    layer = moe.MoELayer(w13, w2, K, renormalize=True)
    x = torch.randn(5, H, generator=g).to(torch.bfloat16).to(device)
    logits = torch.randn(5, E, generator=g).to(device)
    torch.library.opcheck(torch.ops.moe.forward, (x, logits, layer.handle),
                          test_utils=("test_schema", "test_faketensor"))
    _, ids, w = layer.forward_capture(x, logits)
    torch.library.opcheck(torch.ops.moe.forward_routed, (x, ids, w, layer.handle),
                          test_utils=("test_schema", "test_faketensor"))

    def block(x, logits):
        return layer.forward(x * 1, logits) + 0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, logits), layer.forward(x, logits))


@pytest.mark.skipif("cuda" not in __import__("conftest").DEVICES, reason="no CUDA device or backend")
def test_cuda_graph_capture():
    w13, w2, g = make(10)
    layer = moe.MoELayer(w13, w2, K, renormalize=True, max_tokens=64)
    x = torch.randn(16, H, generator=g).to(torch.bfloat16).cuda()
    logits = torch.randn(16, E, generator=g).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        want = layer.forward(x, logits)  # creates this stream's layer (allocates)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = layer.forward(x, logits)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
