#!/usr/bin/env python3
"""triton_peer.py - the Triton fused-MoE peer that the CUDA backend is compared against.

It times one MoE layer forward, written in Triton the way vLLM's fused_moe
computes it, on the five model shapes of bench/bench_models.c, timed the way
bench/bench_cuda.cu times moe_layer_forward: the whole forward captured in
one CUDA graph, CUDA events around each replay, L2 evicted (256 MiB fill)
before every replay, median of 50 after 10 warm-up. Run it on the same GPU
in the same session as `moe_bench --backend cuda` and compare the rows.

The forward, per token count T (slots s = t*k + j):
  1. route + align: a Triton kernel routes (softmax or sigmoid, grouped
     top-k, correction bias, renormalize, scaling: the rule of
     core/routing_logic.h), then the slots are sorted by expert and each
     expert's run is padded to BLOCK_M (sorted_token_ids, expert_ids,
     num_tokens_post_padded). No host sync, so the graph can hold it.
  2. GEMM1 + SwiGLU: rows gathered by sorted token id, h = act(x @ w13^T
     + b13) written in bf16 per slot (gate and up tiles of the same
     columns, so the activation is the epilogue).
  3. GEMM2: y[s] = bf16(w_s * (h[s] @ w2^T + b2)), the routed weight fused.
  4. reduce: out[t] = sum_j y[t*k + j] (fp32 sum, bf16 out).
Two steps are fused where vLLM launches more kernels, so the peer is if
anything stronger: the activation is GEMM1's epilogue (vLLM writes gate|up
in bf16 and runs silu_and_mul), and for small T one program routes and
aligns. Numerics follow the library's layer: fp32 accumulation, h and y
rounded to bf16.
The GEMM tiles (BLOCK_M/N/K, GROUP_M, warps, stages) are picked per
(model, T) by timing up to six candidates as graphs of the whole forward.

    python3 bench/triton_peer.py --model all --tokens 1,4,16,64,256,1024,4096,16384 --json peer.json
    python3 bench/triton_peer.py --check              # vs float64 torch; non-zero exit on failure
    python3 bench/triton_peer.py --device cpu --check # the kernels under TRITON_INTERPRET=1

Needs only torch, triton and the standard library. The interpreter
(--device cpu) needs numpy < 2.4: with 2.4, triton 3.6's interpreter fails
on range() over a runtime integer.
"""
import argparse
import datetime
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass

# The interpreter must be chosen before triton is imported.
if "--device=cpu" in sys.argv or any(a == "--device" and b == "cpu"
                                     for a, b in zip(sys.argv, sys.argv[1:])):
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from peer_models import MODEL_BY_NAME, MODELS, Model  # noqa: E402
from peer_random import bench_random_f32, random_normal  # noqa: E402

L2_FLUSH_BYTES = 256 << 20
TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]


def next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------
# Kernels: routing and align
# ---------------------------------------------------------------------------

@triton.jit
def _route_tile(logits_ptr, bias_ptr, rows, T, scaling, E: tl.constexpr, EP: tl.constexpr,
                K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, SIGMOID: tl.constexpr,
                RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_IS_SCORE: tl.constexpr,
                GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr):
    """Routes BT tokens; returns ids and weights [BT, KP] in rank order."""
    cols = tl.arange(0, EP)
    rmask = rows < T
    cmask = cols < E
    lg = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
                 mask=rmask[:, None] & cmask[None, :], other=0.0)
    lg = tl.where(cmask[None, :], lg, float("-inf"))
    if SIGMOID:
        score = 1.0 / (1.0 + tl.exp(-lg))
    else:
        p = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        score = p / tl.sum(p, axis=1)[:, None]
    # The ranking key: the logit (same order as the score), or score + bias
    # when a bias or a top-2 group sum makes the score itself matter.
    if KEY_IS_SCORE:
        key = score
        if HAS_BIAS:
            key = key + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    else:
        key = lg
    key = tl.where(cmask[None, :], key, float("-inf"))

    if GROUPS > 1:
        GS: tl.constexpr = EP // GROUPS
        kg = tl.reshape(key, (BT, GROUPS, GS))
        gi = tl.arange(0, GS)[None, None, :]
        top1 = tl.max(kg, axis=2)
        gscore = top1
        if GROUP_TOP2:
            first = tl.min(tl.where(kg == top1[:, :, None], gi, GS), axis=2)
            gscore = top1 + tl.max(tl.where(gi == first[:, :, None], float("-inf"), kg), axis=2)
        gidx = tl.arange(0, GROUPS)[None, :]
        allowed = tl.zeros((BT, GROUPS), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.max(gscore, axis=1)
            pick = tl.min(tl.where(gscore == best[:, None], gidx, GROUPS), axis=1)
            hit = gidx == pick[:, None]
            allowed = tl.where(hit, 1, allowed)
            gscore = tl.where(hit, float("-inf"), gscore)
        allowed_e = tl.reshape(tl.broadcast_to(allowed[:, :, None], (BT, GROUPS, GS)), (BT, EP))
        key = tl.where(allowed_e != 0, key, float("-inf"))

    # k rounds of argmax, ties to the lower index as in routing_logic.h.
    eidx = cols[None, :]
    kidx = tl.arange(0, KP)[None, :]
    ids = tl.zeros((BT, KP), dtype=tl.int32)
    ws = tl.zeros((BT, KP), dtype=tl.float32)
    wsum = tl.zeros((BT,), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(key, axis=1)
        pick = tl.min(tl.where(key == best[:, None], eidx, EP), axis=1)
        hit = eidx == pick[:, None]
        w = tl.sum(tl.where(hit, score, 0.0), axis=1)
        ids = tl.where(kidx == j, pick[:, None], ids)
        ws = tl.where(kidx == j, w[:, None], ws)
        wsum += w
        key = tl.where(hit, float("-inf"), key)
    if RENORM:
        ws = ws / tl.where(wsum > 0.0, wsum, 1.0)[:, None]
    ws = ws * scaling
    return ids, ws


@triton.jit
def _onehot_rank(ids, valid, EP: tl.constexpr):
    """One-hot [S, EP] of the slots' experts, the per-expert counts, and
    each slot's rank among the earlier slots of its expert."""
    oh = ((ids[:, None] == tl.arange(0, EP)[None, :]) & valid[:, None]).to(tl.int32)
    cnt = tl.sum(oh, axis=0)
    rank = tl.sum(oh * tl.cumsum(oh, axis=0), axis=1) - 1
    return oh, cnt, rank


@triton.jit
def _write_layout(cnt, sorted_ptr, eids_ptr, npp_ptr, num_slots, EP: tl.constexpr,
                  BLOCK_M: tl.constexpr, PADW: tl.constexpr, NBW: tl.constexpr):
    """From the per-expert counts: each expert's padded start, the padding
    entries (sentinel num_slots), expert_ids per block, the padded total.
    Returns the starts."""
    padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(npp_ptr, tl.sum(padded, axis=0))
    # Only the padding tail of each expert is written here; the real slots
    # are written by the scatter, so nothing races and nothing is filled twice.
    fill = starts + cnt
    gap = padded - cnt
    for j0 in tl.static_range(0, BLOCK_M, PADW):
        j = j0 + tl.arange(0, PADW)
        tl.store(sorted_ptr + fill[:, None] + j[None, :],
                 tl.zeros((EP, PADW), dtype=tl.int32) + num_slots, mask=j[None, :] < gap[:, None])
    nb = padded // BLOCK_M
    first = starts // BLOCK_M
    experts = tl.arange(0, EP)
    for i0 in range(0, tl.max(nb, axis=0), NBW):
        i = i0 + tl.arange(0, NBW)
        tl.store(eids_ptr + first[:, None] + i[None, :],
                 experts[:, None] + tl.zeros((EP, NBW), dtype=tl.int32),
                 mask=i[None, :] < nb[:, None])
    return starts


@triton.jit(do_not_specialize=["T"])
def route_kernel(logits_ptr, bias_ptr, ids_ptr, tw_ptr, counts_ptr, sorted_ptr, eids_ptr, npp_ptr,
                 T, scaling, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                 KP: tl.constexpr, BT: tl.constexpr, SIGMOID: tl.constexpr,
                 RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_IS_SCORE: tl.constexpr,
                 GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr,
                 SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, PADW: tl.constexpr,
                 NBW: tl.constexpr):
    """Routes BT tokens per program. SINGLE (one program owns every slot,
    the decode case): also the whole align, so route + align is one launch.
    Else: adds this block's expert histogram into counts for align_offsets."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ids, ws = _route_tile(logits_ptr, bias_ptr, rows, T, scaling, E, EP, K, KP, BT, SIGMOID,
                          RENORM, HAS_BIAS, KEY_IS_SCORE, GROUPS, TOPK_GROUPS, GROUP_TOP2)
    kidx = tl.arange(0, KP)[None, :]
    smask = (rows[:, None] < T) & (kidx < K)
    slots = rows[:, None] * K + kidx
    tl.store(ids_ptr + slots, ids, mask=smask)
    tl.store(tw_ptr + slots, ws, mask=smask)
    ids_f = tl.reshape(ids, (BT * KP,))
    valid_f = tl.reshape(smask, (BT * KP,))
    oh, cnt, rank = _onehot_rank(ids_f, valid_f, EP)
    if SINGLE:
        starts = _write_layout(cnt, sorted_ptr, eids_ptr, npp_ptr, T * K, EP, BLOCK_M, PADW, NBW)
        pos = tl.sum(oh * starts[None, :], axis=1) + rank
        tl.store(sorted_ptr + pos, tl.reshape(slots, (BT * KP,)), mask=valid_f)
    else:
        tl.atomic_add(counts_ptr + tl.arange(0, EP), cnt, mask=cnt > 0)


@triton.jit(do_not_specialize=["num_slots"])
def align_offsets_kernel(counts_ptr, cursor_ptr, sorted_ptr, eids_ptr, npp_ptr, num_slots,
                         EP: tl.constexpr, BLOCK_M: tl.constexpr, PADW: tl.constexpr,
                         NBW: tl.constexpr):
    """One program: the layout from the counts; cursors start at each
    expert's start. Zeroes the counts for the next forward (no memset node)."""
    e = tl.arange(0, EP)
    cnt = tl.load(counts_ptr + e)
    starts = _write_layout(cnt, sorted_ptr, eids_ptr, npp_ptr, num_slots, EP, BLOCK_M, PADW, NBW)
    tl.store(cursor_ptr + e, starts)
    tl.store(counts_ptr + e, tl.zeros((EP,), dtype=tl.int32))


@triton.jit(do_not_specialize=["num_slots"])
def align_scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, num_slots, EP: tl.constexpr,
                         S: tl.constexpr):
    """S slots per program: one atomic per expert reserves this chunk's run
    in the expert's rows, the rank inside the chunk places each slot. (The
    order of chunks within an expert varies run to run; every row of a tile
    is computed independently, so the results do not.)"""
    slot = tl.program_id(0) * S + tl.arange(0, S)
    valid = slot < num_slots
    ids = tl.load(ids_ptr + slot, mask=valid, other=0)
    oh, cnt, rank = _onehot_rank(ids, valid, EP)
    base = tl.atomic_add(cursor_ptr + tl.arange(0, EP), cnt, mask=cnt > 0)
    base = tl.where(cnt > 0, base, 0)
    pos = tl.sum(oh * base[None, :], axis=1) + rank
    tl.store(sorted_ptr + pos, slot, mask=valid)


# ---------------------------------------------------------------------------
# Kernels: the grouped GEMMs
# ---------------------------------------------------------------------------

@triton.jit
def _tile_of(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each column sweep (L2 reuse)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["num_slots", "num_pid_m"])
def gemm1_kernel(x_ptr, w_ptr, b_ptr, h_ptr, sorted_ptr, eids_ptr, npp_ptr, num_slots, num_pid_m,
                 I, H, top_k, alpha, limit, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                 EVEN_K: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """h[s, n] = act(gate, up) for BLOCK_N columns n of I: the gate rows n
    and the up rows I + n of w13[e] are two tiles of the same program, so
    the activation runs on the accumulators and only h goes to memory."""
    pid_m, pid_n = _tile_of(tl.program_id(0), num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(npp_ptr):
        return
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slot < num_slots
    tok = (slot // top_k).to(tl.int64)
    expert = tl.load(eids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_w = cols % I  # wrapped columns load real data; their results are not stored
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * H + ks[None, :]
    g_ptrs = w_ptr + expert * 2 * I * H + cols_w[None, :].to(tl.int64) * H + ks[:, None]
    u_ptrs = g_ptrs + I * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            kmask = ks < H - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=kmask[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + expert * 2 * I + cols_w)[None, :]
        acc_u += tl.load(b_ptr + expert * 2 * I + I + cols_w)[None, :]
    if CLAMP:  # activation_logic.h, moe_act_swiglu_clamp
        gate = tl.minimum(acc_g, limit)
        up = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    else:
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out = h_ptr + slot[:, None].to(tl.int64) * I + cols[None, :]
    tl.store(out, h.to(tl.bfloat16), mask=valid[:, None] & (cols[None, :] < I))


@triton.jit(do_not_specialize=["num_slots", "num_pid_m"])
def gemm2_kernel(h_ptr, w_ptr, b_ptr, tw_ptr, y_ptr, sorted_ptr, eids_ptr, npp_ptr, num_slots,
                 num_pid_m, H, I, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[s, n] = bf16(w_s * (h[s] @ w2[e]^T + b2[e])) for BLOCK_N columns of H."""
    pid_m, pid_n = _tile_of(tl.program_id(0), num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(npp_ptr):
        return
    slot = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slot < num_slots
    slot64 = slot.to(tl.int64)
    expert = tl.load(eids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_w = cols % H
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + slot64[:, None] * I + ks[None, :]
    b_ptrs = w_ptr + expert * H * I + cols_w[None, :].to(tl.int64) * I + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(I, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            kmask = ks < I - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * H + cols_w)[None, :]
    acc = acc * tl.load(tw_ptr + slot, mask=valid, other=0.0)[:, None]
    out = y_ptr + slot64[:, None] * H + cols[None, :]
    tl.store(out, acc.to(tl.bfloat16), mask=valid[:, None] & (cols[None, :] < H))


# ---------------------------------------------------------------------------
# GEMM configurations and the candidates per regime
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    bm: int  # BLOCK_M: rows (slots) per tile, also the align padding
    bn: int  # BLOCK_N: output columns per tile (GEMM1: gate + up halves)
    bk: int
    group_m: int
    warps: int
    stages: int

    def name(self):
        return f"M{self.bm}-N{self.bn}-K{self.bk}-G{self.group_m}-w{self.warps}-s{self.stages}"


def C(bm, bn, bk, g, w, s):
    return Config(bm, bn, bk, g, w, s)


# By rows per expert (T*k/E on average); the first of each list is the
# --quick pick. GEMM1's BLOCK_N counts gate and up columns together, so one
# config gives both GEMMs the same accumulator size.
CANDIDATES = [
    (4, [C(16, 64, 128, 1, 4, 4), C(16, 128, 128, 1, 4, 3), C(16, 64, 256, 1, 4, 3),
         C(16, 128, 64, 1, 4, 4), C(16, 256, 64, 1, 8, 4), C(16, 32, 256, 1, 4, 4)]),
    (24, [C(32, 128, 64, 1, 4, 4), C(16, 128, 128, 1, 4, 3), C(32, 64, 128, 1, 4, 4),
          C(16, 64, 128, 1, 4, 4), C(32, 128, 128, 1, 4, 3), C(64, 128, 64, 1, 4, 4)]),
    (128, [C(64, 128, 64, 8, 4, 4), C(32, 128, 64, 8, 4, 4), C(64, 64, 128, 8, 4, 4),
           C(64, 128, 128, 8, 4, 3), C(64, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 3)]),
    (None, [C(128, 128, 64, 8, 8, 4), C(128, 256, 64, 8, 8, 3), C(128, 128, 64, 8, 4, 4),
            C(64, 256, 64, 8, 4, 4), C(128, 256, 64, 8, 8, 4), C(64, 128, 64, 8, 4, 5)]),
]


def candidates_for(model, T):
    rows = T * model.k / model.E
    for limit, configs in CANDIDATES:
        if limit is None or rows <= limit:
            return configs
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# The layer and its forward
# ---------------------------------------------------------------------------

class Layer:
    """The weights of one model (bf16, vLLM's [out][in] layout: w13[E][2I][H]
    with gate rows 0..I-1 and up rows I..2I-1, w2[E][H][I]) and the inputs
    for the largest token count, as moe_bench draws them."""

    def __init__(self, model, max_tokens, device, seed, placeholder=False):
        m = model
        self.model = m
        self.device = device
        if placeholder:  # only for compiling: tiny tensors of the right dtypes
            bf16 = torch.empty(16, dtype=torch.bfloat16, device=device)
            f32 = torch.empty(16, dtype=torch.float32, device=device)
            self.w13 = self.w2 = self.x = bf16
            self.logits = f32
            self.b13 = self.b2 = f32 if m.biases else None
            self.correction = f32 if m.correction else None
            return
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        bf16, f32 = torch.bfloat16, torch.float32
        in_h, in_i = 1.0 / math.sqrt(m.H), 1.0 / math.sqrt(m.I)  # N(0,1)/sqrt(fan-in)
        self.w13 = random_normal((m.E, 2 * m.I, m.H), in_h, gen, bf16, device)
        self.w2 = random_normal((m.E, m.H, m.I), in_i, gen, bf16, device)
        self.b13 = self.b2 = self.correction = None
        if m.biases:
            self.b13 = random_normal((m.E, 2 * m.I), in_h, gen, f32, device)
            self.b2 = random_normal((m.E, m.H), in_i, gen, f32, device)
        if m.correction:  # moe_bench's seed + 5
            self.correction = bench_random_f32(m.E, 0.1, seed + 5).to(device)
        self.x = random_normal((max_tokens, m.H), 1.0, gen, bf16, device)
        # moe_bench's logits (seed + 7): the same routing, so the same bytes.
        self.logits = bench_random_f32(max_tokens * m.E, 1.0, seed + 7).view(max_tokens, m.E).to(device)


class Forward:
    """Every buffer of one forward of T tokens with one GEMM config, and the
    launches. Nothing here reads device memory on the host, so __call__ can
    be captured into a CUDA graph; the buffers stay put across replays."""

    def __init__(self, layer, T, cfg, force_multi=False, placeholder=False):
        m, dev = layer.model, layer.device
        self.layer, self.T, self.cfg = layer, T, cfg
        self.slots = slots = T * m.k
        # At most min(E, slots) experts are non-empty, each padded by < BLOCK_M.
        self.num_pid_m = triton.cdiv(slots + min(m.E, slots) * (cfg.bm - 1), cfg.bm)

        def buf(shape, dtype):  # placeholder: tiny, for compiling only
            return torch.zeros(16 if placeholder else shape, dtype=dtype, device=dev)

        i32 = torch.int32
        self.sorted_ids = buf(self.num_pid_m * cfg.bm, i32)
        self.expert_ids = buf(self.num_pid_m, i32)
        self.npp = buf(1, i32)
        self.topk_ids = buf((T, m.k), i32)
        self.topk_w = buf((T, m.k), torch.float32)
        self.h = buf((slots, m.I), torch.bfloat16)
        self.y = buf((slots, m.H), torch.bfloat16)
        self.out = buf((T, m.H), torch.bfloat16)
        self.x, self.logits = layer.x[:T], layer.logits[:T]

        self.EP, self.KP = next_pow2(m.E), next_pow2(m.k)
        if m.groups > 1:
            assert m.E == self.EP and m.E % m.groups == 0 and m.groups == next_pow2(m.groups)
        # One program routes and aligns everything while its one-hot tile
        # [T*k, E] stays small; else a route grid, one offsets program and a
        # scatter grid.
        self.single = next_pow2(T) * self.KP * self.EP <= 8192 and not force_multi
        if self.single:
            self.route_bt = next_pow2(T)
        else:
            self.route_bt = max(1, min(64, 4096 // self.EP, 8192 // (self.KP * self.EP)))
            self.scatter_s = max(16, 8192 // self.EP)
        self.counts = buf(self.EP, i32)  # zero; align_offsets zeroes it again
        self.cursor = buf(self.EP, i32)
        self.padw = min(cfg.bm, 32)
        self.nbw = max(1, min(256, 4096 // self.EP))

    def __call__(self, warm=False):
        """Launches the forward; warm=True only compiles (kernel.warmup)."""
        m, cfg, T, lay = self.layer.model, self.cfg, self.T, self.layer

        def go(kernel, grid, *args, **kw):
            if warm:
                kernel.warmup(*args, grid=grid, **kw)
            else:
                kernel[grid](*args, **kw)

        dummy = self.counts  # stands for absent optional tensors (never read)
        bias = lay.correction if lay.correction is not None else dummy
        route_grid = (triton.cdiv(T, self.route_bt),)
        go(route_kernel, route_grid, self.logits, bias, self.topk_ids, self.topk_w, self.counts,
           self.sorted_ids, self.expert_ids, self.npp, T, float(m.scaling), E=m.E, EP=self.EP,
           K=m.k, KP=self.KP, BT=self.route_bt, SIGMOID=m.sigmoid, RENORM=m.renormalize,
           HAS_BIAS=m.correction, KEY_IS_SCORE=m.correction or (m.groups > 1 and m.group_top2),
           GROUPS=m.groups, TOPK_GROUPS=m.topk_groups, GROUP_TOP2=m.group_top2,
           SINGLE=self.single, BLOCK_M=cfg.bm, PADW=self.padw, NBW=self.nbw, num_warps=4)
        if not self.single:
            go(align_offsets_kernel, (1,), self.counts, self.cursor, self.sorted_ids,
               self.expert_ids, self.npp, self.slots, EP=self.EP, BLOCK_M=cfg.bm, PADW=self.padw,
               NBW=self.nbw, num_warps=4)
            go(align_scatter_kernel, (triton.cdiv(self.slots, self.scatter_s),), self.topk_ids,
               self.cursor, self.sorted_ids, self.slots, EP=self.EP, S=self.scatter_s, num_warps=4)

        tiles = dict(UPCAST=INTERPRET, BLOCK_M=cfg.bm, BLOCK_K=cfg.bk, GROUP_M=cfg.group_m,
                     num_warps=cfg.warps, num_stages=cfg.stages)
        half = cfg.bn // 2
        go(gemm1_kernel, (self.num_pid_m * triton.cdiv(m.I, half),), self.x, lay.w13,
           lay.b13 if lay.b13 is not None else dummy, self.h, self.sorted_ids, self.expert_ids,
           self.npp, self.slots, self.num_pid_m, m.I, m.H, m.k, float(m.alpha), float(m.limit),
           HAS_BIAS=lay.b13 is not None, CLAMP=m.clamp, EVEN_K=m.H % cfg.bk == 0, BLOCK_N=half,
           **tiles)
        go(gemm2_kernel, (self.num_pid_m * triton.cdiv(m.H, cfg.bn),), self.h, lay.w2,
           lay.b2 if lay.b2 is not None else dummy, self.topk_w, self.y, self.sorted_ids,
           self.expert_ids, self.npp, self.slots, self.num_pid_m, m.H, m.I,
           HAS_BIAS=lay.b2 is not None, EVEN_K=m.I % cfg.bk == 0, BLOCK_N=cfg.bn, **tiles)
        if not warm:
            torch.sum(self.y.view(T, m.k, m.H), dim=1, out=self.out)
        return self.out


# ---------------------------------------------------------------------------
# Timing, as bench_cuda.cu times moe_layer_forward
# ---------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)

    def median_us(self, graph, warmup, reps):
        for _ in range(warmup):
            graph.replay()
        times = []
        for i in range(reps):
            self.flush.fill_(i & 0xFF)  # evict L2, outside the timed region
            self.start.record()
            graph.replay()
            self.stop.record()
            self.stop.synchronize()
            times.append(self.start.elapsed_time(self.stop) * 1e3)
        return statistics.median(times)


def capture(fwd):
    """The forward as one CUDA graph (run once eagerly first: compiles)."""
    fwd()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd()
    return graph


def _compile_jobs(jobs):
    """Worker process: compiles the kernels of each (model, T, config) into
    Triton's on-disk cache, with tiny placeholder tensors (the kernels'
    specializations depend on dtypes, alignment and H, I, k, not on sizes)."""
    done = 0
    for name, T, cfg in jobs:
        model = MODEL_BY_NAME[name]
        try:
            layer = Layer(model, T, "cuda", 0, placeholder=True)
            Forward(layer, T, cfg, placeholder=True)(warm=True)
            done += 1
        except Exception:  # e.g. a tile over the shared memory: the sweep skips it
            pass
    return done


def precompile(jobs, processes):
    """Compiles every kernel the run will launch, in parallel processes
    (Triton compiles under the GIL, so threads do not help). The timing
    process then loads them from the on-disk cache. Any failure here only
    costs time: the timing process compiles whatever is missing itself."""
    if processes <= 1 or not jobs:
        return
    # One worker per config keeps equal GEMM kernels in one process.
    by_cfg = {}
    for job in jobs:
        by_cfg.setdefault(job[2], []).append(job)
    groups = sorted(by_cfg.values(), key=len, reverse=True)
    t0 = time.time()
    processes = min(processes, len(groups))
    try:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            done = sum(pool.map(_compile_jobs, groups, chunksize=1))
        print(f"compiled the kernels of {done} of {len(jobs)} (model, tokens, config) in "
              f"{time.time() - t0:.0f} s with {processes} processes\n", flush=True)
    except Exception as exc:
        print(f"parallel compile failed ({exc!r}); compiling on demand\n", flush=True)


def bench_point(layer, T, configs, timer, args):
    """Times each candidate config (fewer reps), then the best one with the
    full warm-up and reps. Returns (us, config, touched experts)."""
    best = None
    tried = []
    for cfg in configs:
        try:
            fwd = Forward(layer, T, cfg)
            graph = capture(fwd)
        except Exception as exc:  # e.g. out of shared memory for this tile
            tried.append(f"{cfg.name()}: {type(exc).__name__}")
            continue
        us = timer.median_us(graph, 3, args.sweep_reps) if len(configs) > 1 else None
        tried.append(f"{cfg.name()}: {us:.1f}" if us is not None else cfg.name())
        if best is None or (us is not None and us < best[0]):
            best = (us, cfg, fwd, graph)
        else:
            del graph
    if best is None:
        raise RuntimeError("no config ran: " + "; ".join(tried))
    _, cfg, fwd, graph = best
    us = timer.median_us(graph, args.warmup, args.reps)
    touched = int(torch.unique(fwd.topk_ids).numel())
    if args.verbose and len(configs) > 1:
        print(f"    {layer.model.name} T={T}: " + "; ".join(tried), flush=True)
    return us, cfg, touched


def run_bench(args, models, tokens):
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"triton_peer  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    print(f"device       {name}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"timing       CUDA events around CUDA-graph replays, median of {args.reps}, "
          f"{args.warmup} warm-up, L2 flushed (256 MiB) before each replay")
    tuning = "one heuristic config per point (--quick)" if args.quick else \
        f"best of up to 6 configs per point, {args.sweep_reps} reps each"
    print(f"tuning       {tuning}\n")
    t0 = time.time()
    plan = [(model, [(T, candidates_for(model, T)[:1 if args.quick else 6]) for T in tokens])
            for model in models]
    precompile([(model.name, T, cfg) for model, points in plan for T, configs in points
                for cfg in configs], args.compile_processes)
    print(f"{'model':<18} {'tokens':>6} {'experts':>7} {'median us':>11} {'TFLOP/s':>9} "
          f"{'GB/s':>8}  config", flush=True)
    timer = Timer(dev)
    rows = []
    for mi, (model, points) in enumerate(plan):
        layer = Layer(model, max(tokens), dev, seed=args.seed * 1000003 + mi * 16)
        for T, configs in points:
            us, cfg, touched = bench_point(layer, T, configs, timer, args)
            flops = 2.0 * T * model.k * 3 * model.H * model.I
            nbytes = touched * 3.0 * model.H * model.I * 2
            row = dict(model=model.name, hidden=model.H, intermediate=model.I, experts=model.E,
                       top_k=model.k, tokens=T, experts_touched=touched, us=us, median_us=us,
                       reps=args.reps, flops=flops, bytes=nbytes, tflops=flops / us * 1e-6,
                       gbps=nbytes / us * 1e-3, config=cfg.name())
            rows.append(row)
            print(f"{model.name:<18} {T:>6} {touched:>7} {us:>11.1f} {row['tflops']:>9.2f} "
                  f"{row['gbps']:>8.1f}  {row['config']}", flush=True)
            if args.json:
                write_json(args, name, rows)
        del layer
        torch.cuda.empty_cache()
    print(f"\n{len(rows)} points in {time.time() - t0:.0f} s")


def write_json(args, device_name, rows):
    doc = {
        "command": " ".join(sys.argv),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
        "backend": "triton-peer",
        "device": device_name,
        "kernels": f"triton {triton.__version__} (torch {torch.__version__})",
        "timing": f"CUDA events around CUDA-graph replays, median, {args.warmup} warm-up",
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)


# ---------------------------------------------------------------------------
# Correctness: against torch in float64
# ---------------------------------------------------------------------------

def reference_route(m, logits, correction):
    """The routing rule of core/routing_logic.h in torch (fp32, as the kernel
    computes it). Returns ids, weights and the keys that ranked them."""
    lg = logits.float()
    score = torch.sigmoid(lg) if m.sigmoid else torch.softmax(lg, dim=-1)
    if m.correction or (m.groups > 1 and m.group_top2):
        key = score + (correction if correction is not None else 0.0)
    else:
        key = lg.clone()
    if m.groups > 1:
        T = lg.shape[0]
        kg = key.view(T, m.groups, -1)
        top = torch.topk(kg, 2, dim=-1).values
        gscore = top[..., 0] + top[..., 1] if m.group_top2 else top[..., 0]
        order = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :m.topk_groups]
        allowed = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, order, True)
        key = key.masked_fill(~allowed.repeat_interleave(m.E // m.groups, dim=1), float("-inf"))
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :m.k]
    w = score.gather(1, ids)
    if m.renormalize:
        s = w.sum(-1, keepdim=True)
        w = w / torch.where(s > 0, s, torch.ones_like(s))
    return ids.to(torch.int32), w * m.scaling, key


def reference_forward(layer, T, ids, tw):
    """The layer in float64 with the given routing."""
    m = layer.model
    x = layer.x[:T].double()
    out = torch.zeros((T, m.H), dtype=torch.float64, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, j = torch.nonzero(ids == e, as_tuple=True)
        gu = x[tok] @ layer.w13[e].double().T
        if layer.b13 is not None:
            gu += layer.b13[e].double()
        g, u = gu[:, :m.I], gu[:, m.I:]
        if m.clamp:
            g = g.clamp(max=m.limit)
            u = u.clamp(-m.limit, m.limit)
            h = g * torch.sigmoid(m.alpha * g) * (u + 1)
        else:
            h = g * torch.sigmoid(g) * u
        y = h @ layer.w2[e].double().T
        if layer.b2 is not None:
            y += layer.b2[e].double()
        out.index_add_(0, tok, y * tw[tok, j].double()[:, None])
    return out


def check_align(fwd):
    """The sorted layout: every slot once, each block one expert's, padding
    sentinels, the padded total."""
    m = fwd.layer.model
    ids = fwd.topk_ids.flatten().long().cpu()
    npp = int(fwd.npp.item())
    sorted_ids = fwd.sorted_ids[:npp].long().cpu()
    eids = fwd.expert_ids[:npp // fwd.cfg.bm].long().cpu()
    counts = torch.bincount(ids, minlength=m.E)
    padded = (counts + fwd.cfg.bm - 1) // fwd.cfg.bm * fwd.cfg.bm
    problems = []
    if npp != int(padded.sum()):
        problems.append(f"num_tokens_post_padded {npp} != {int(padded.sum())}")
    real = sorted_ids[sorted_ids < fwd.slots]
    if not torch.equal(torch.sort(real).values, torch.arange(fwd.slots)):
        problems.append("the real entries are not a permutation of the slots")
    if int((sorted_ids != fwd.slots).sum()) != fwd.slots:
        problems.append("padding entries are not the sentinel")
    block_of = torch.arange(npp) // fwd.cfg.bm
    mask = sorted_ids < fwd.slots
    if npp and not torch.equal(ids[sorted_ids[mask]], eids[block_of[mask]]):
        problems.append("a slot sits in a block of another expert")
    return problems


def routing_mismatches(m, fwd, logits, correction):
    """Tokens whose Triton picks differ from torch's, other than near-ties
    (equal keys to 1e-5, where fp32 rounding may pick either)."""
    ids_ref, w_ref, key = reference_route(m, logits, correction)
    ids = fwd.topk_ids.long()
    bad = 0
    for t in torch.nonzero((ids != ids_ref.long()).any(-1)).flatten().tolist():
        mine = key[t, ids[t]].sort(descending=True).values
        theirs = key[t, ids_ref[t].long()].sort(descending=True).values
        if not torch.allclose(mine, theirs, rtol=0, atol=1e-5):
            bad += 1
    same = (ids == ids_ref.long()).all(-1)
    werr = (fwd.topk_w[same] - w_ref[same]).abs().max().item() if same.any() else 0.0
    return bad, werr


def run_check(args):
    dev = torch.device(args.device)
    tiny = [
        (Model("tiny-softmax", 64, 48, 8, 2), [1, 5, 37]),
        (Model("tiny-norenorm", 72, 40, 8, 3, renormalize=False), [3, 19]),
        (Model("tiny-grouped", 96, 40, 16, 4, sigmoid=True, groups=4, topk_groups=2,
               group_top2=True, scaling=2.5, correction=True), [2, 29]),
        (Model("tiny-clamp", 80, 64, 8, 3, clamp=True, biases=True), [2, 33]),
    ]
    configs = [C(16, 32, 32, 1, 4, 2), C(32, 64, 64, 2, 4, 2), C(64, 64, 32, 4, 4, 2)]
    real = [] if INTERPRET else [(MODEL_BY_NAME["qwen3-30b-a3b"], [1, 64, 1024]),
                                 (MODEL_BY_NAME["gpt-oss-20b"], [4, 256]),
                                 (MODEL_BY_NAME["deepseek-v3"], [16])]
    worst, failures = 0.0, 0
    print(f"check on {args.device}{' (TRITON_INTERPRET=1)' if INTERPRET else ''}: "
          f"relative error ||out - ref|| / ||ref|| vs float64 torch, limit 2e-2")
    for model, token_counts in tiny + real:
        layer = Layer(model, max(token_counts), dev, seed=args.seed)
        if model.clamp and model.name.startswith("tiny"):
            layer.x.mul_(4.0)  # push some gates and ups past the clamp limit
        for T in token_counts:
            if model.name.startswith("tiny"):
                cases = [(cfg, force) for cfg in configs for force in (False, True)]
            else:  # the regime's default tile and the largest wgmma tile
                cases = [(candidates_for(model, T)[0], False), (C(128, 256, 64, 8, 8, 4), False)]
            for cfg, force_multi in cases:
                fwd = Forward(layer, T, cfg, force_multi=force_multi)
                out = fwd().double()
                problems = check_align(fwd)
                if dev.type == "cuda":
                    # Replays of the captured forward (twice: the align
                    # state must reset itself) give the eager bytes.
                    graph = capture(fwd)
                    for _ in range(2):
                        fwd.out.zero_()
                        graph.replay()
                    torch.cuda.synchronize()
                    if not torch.equal(fwd.out.double(), out):
                        problems.append("graph replay differs from the eager forward")
                    del graph
                bad, werr = routing_mismatches(model, fwd, layer.logits[:T], layer.correction)
                ref = reference_forward(layer, T, fwd.topk_ids.long(), fwd.topk_w)
                rel = ((out - ref).norm() / ref.norm()).item()
                worst = max(worst, rel)
                ok = rel <= 2e-2 and not problems and bad == 0 and werr <= 1e-5 \
                    and bool(torch.isfinite(out).all()) and ref.norm() > 0
                failures += not ok
                path = "single" if fwd.single else "multi"
                print(f"  {'ok  ' if ok else 'FAIL'} {model.name:<18} T={T:<5} {cfg.name():<26} "
                      f"align={path:<6} rel={rel:.2e} route_mismatch={bad} weight_err={werr:.1e}"
                      + (f" {'; '.join(problems)}" if problems else ""), flush=True)
        del layer
    print(f"{'FAILED' if failures else 'passed'}: {failures} failing case(s), worst relative "
          f"error {worst:.2e}")
    return 1 if failures else 0


# ---------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", help="NAME[,NAME...] or all: " +
                   ", ".join(m.name for m in MODELS))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts")
    p.add_argument("--json", help="also write the rows as JSON (moe_bench's layout)")
    p.add_argument("--reps", type=int, default=50, help="timed replays of the best config")
    p.add_argument("--warmup", type=int, default=10, help="untimed replays first")
    p.add_argument("--sweep-reps", type=int, default=10, help="timed replays per candidate")
    p.add_argument("--quick", action="store_true", help="one heuristic config per point, no sweep")
    p.add_argument("--check", action="store_true", help="compare with float64 torch and exit")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the Triton interpreter on tiny shapes (implies --check)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--compile-processes", type=int, default=min(12, os.cpu_count() or 1),
                   help="parallel Triton compiles before timing (1: compile on demand)")
    p.add_argument("--verbose", action="store_true", help="print every candidate's time")
    args = p.parse_args()

    if args.device == "cpu" or args.check:
        return run_check(args)
    if not torch.cuda.is_available():
        print("triton_peer: no CUDA device (use --device cpu --check for the interpreter)",
              file=sys.stderr)
        return 2
    names = [m.name for m in MODELS] if args.model == "all" else args.model.split(",")
    unknown = [n for n in names if n not in MODEL_BY_NAME]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    if min(tokens) < 1:
        p.error("token counts must be positive")
    run_bench(args, [MODEL_BY_NAME[n] for n in names], tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
