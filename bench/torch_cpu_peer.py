#!/usr/bin/env python3
"""torch_cpu_peer.py - the PyTorch CPU peer that the CPU backend is compared against.

It times one MoE layer forward written the way PyTorch model code runs it on
a CPU (a loop over the experts that got tokens: gather the rows, per-expert
bf16 F.linear for gate|up, SwiGLU, F.linear for down, then a weighted
index_add into an fp32 output), on the model shapes of bench/bench_models.c,
timed the way moe_bench times the CPU backend: host clock around one whole
forward (routing included), the caches flushed before each forward (reading
a buffer of three times the last-level cache), one warm-up, then about one
second of forwards (3..30), median and fastest. Run it on the same machine,
with the same OMP_NUM_THREADS, right after `moe_bench --backend cpu` and
compare the rows; --json writes moe_bench's row layout.

    python3 bench/torch_cpu_peer.py --model qwen3-30b-a3b --tokens 1,16,128 --json peer.json
    python3 bench/torch_cpu_peer.py --check      # vs float64; non-zero exit on failure

Routing is the rule of core/routing_logic.h (softmax or sigmoid, grouped
top-k, correction bias for selection only, renormalize, scaling), in torch.
Inputs are drawn as moe_bench draws them (approximately normal, weights
scaled by 1/sqrt(fan-in)), not the same bits.

Torch: if it is missing, the script installs it with pip from PyPI into the
running interpreter (use a virtual environment). PyPI has no CPU-only torch
wheel for Linux x86-64: the default wheel brings the CUDA libraries, about
5 GB installed (72 s on the 2-vCPU development machine, 2026-12-05), and
runs on the CPU without a GPU. --no-install refuses instead; with any torch
already installed (a CPU-only build included) nothing is installed.
"""
import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

from peer_models import MODEL_BY_NAME, MODELS, Model
from peer_random import bench_random_f32, random_normal

TOKENS = [1, 16, 512]  # moe_bench's CPU default


def import_torch(allow_install):
    try:
        return importlib.import_module("torch")
    except ImportError:
        pass
    if not allow_install:
        sys.exit("torch_cpu_peer: torch is not installed (and --no-install was given): "
                 "pip install torch, then run again")
    print("torch_cpu_peer: torch is missing; installing it from PyPI with pip (the default "
          "Linux wheel carries CUDA libraries: about 5 GB)", flush=True)
    rc = subprocess.call([sys.executable, "-m", "pip", "install", "torch"])
    importlib.invalidate_caches()
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        sys.exit(f"torch_cpu_peer: pip install torch exited {rc} and torch still does not "
                 f"import ({exc})")


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------

class Layer:
    """bf16 weights in [out][in] layout (w13[E][2I][H]: gate rows, then up;
    w2[E][H][I]), fp32 biases, and the inputs of the largest token count."""

    def __init__(self, torch, m, max_tokens, seed):
        self.torch, self.m = torch, m
        gen = torch.Generator()
        gen.manual_seed(seed)
        bf16, f32 = torch.bfloat16, torch.float32
        in_h, in_i = 1.0 / math.sqrt(m.H), 1.0 / math.sqrt(m.I)
        self.w13 = random_normal((m.E, 2 * m.I, m.H), in_h, gen, bf16)
        self.w2 = random_normal((m.E, m.H, m.I), in_i, gen, bf16)
        self.b13 = self.b2 = self.correction = None
        if m.biases:
            self.b13 = random_normal((m.E, 2 * m.I), in_h, gen, f32)
            self.b2 = random_normal((m.E, m.H), in_i, gen, f32)
        if m.correction:
            self.correction = bench_random_f32(m.E, 0.1, seed + 5)  # moe_bench's seed + 5
        self.x = random_normal((max_tokens, m.H), 1.0, gen, bf16)
        # moe_bench's logits (seed + 7): the same routing, so the same bytes.
        self.logits = bench_random_f32(max_tokens * m.E, 1.0, seed + 7).view(max_tokens, m.E)
        # F.linear on bf16 activations takes a bf16 bias.
        self.b13_bf16 = self.b13.to(bf16) if self.b13 is not None else None
        self.b2_bf16 = self.b2.to(bf16) if self.b2 is not None else None

    def route(self, logits):
        """core/routing_logic.h in fp32: ids [T][k] (int64) and weights."""
        torch, m = self.torch, self.m
        score = torch.sigmoid(logits) if m.sigmoid else torch.softmax(logits, dim=-1)
        if m.correction or (m.groups > 1 and m.group_top2):
            key = score + (self.correction if self.correction is not None else 0.0)
        else:
            key = logits.clone()
        if m.groups > 1:
            T = logits.shape[0]
            top = torch.topk(key.view(T, m.groups, -1), 2, dim=-1).values
            gscore = top[..., 0] + top[..., 1] if m.group_top2 else top[..., 0]
            keep = torch.sort(gscore, dim=-1, descending=True, stable=True).indices
            allowed = torch.zeros_like(gscore, dtype=torch.bool)
            allowed.scatter_(1, keep[:, :m.topk_groups], True)
            key = key.masked_fill(~allowed.repeat_interleave(m.E // m.groups, dim=1),
                                  float("-inf"))
        ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :m.k]
        w = score.gather(1, ids)
        if m.renormalize:
            s = w.sum(-1, keepdim=True)
            w = w / torch.where(s > 0, s, torch.ones_like(s))
        return ids, w * m.scaling

    def activation(self, gu):
        torch, m = self.torch, self.m
        g, u = gu[:, :m.I], gu[:, m.I:]
        if m.clamp:
            g = g.clamp(max=m.limit)
            u = u.clamp(-m.limit, m.limit)
            return g * torch.sigmoid(m.alpha * g) * (u + 1)
        return torch.nn.functional.silu(g) * u

    def forward(self, T):
        """The peer: bf16 per-expert F.linear, fp32 weighted index_add."""
        torch, m = self.torch, self.m
        F = torch.nn.functional
        x = self.x[:T]
        ids, w = self.route(self.logits[:T])
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=m.E).tolist()
        w_flat = w.reshape(-1)
        out = torch.zeros((T, m.H), dtype=torch.float32)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[start:start + n]
            start += n
            tok = slots // m.k
            gu = F.linear(x[tok], self.w13[e],
                          self.b13_bf16[e] if self.b13_bf16 is not None else None)
            h = self.activation(gu)
            y = F.linear(h, self.w2[e], self.b2_bf16[e] if self.b2_bf16 is not None else None)
            out.index_add_(0, tok, y.float() * w_flat[slots, None])
        return out.to(torch.bfloat16), ids

    def reference(self, T, ids, w):
        """The layer in float64 with the given routing."""
        torch, m = self.torch, self.m
        x = self.x[:T].double()
        out = torch.zeros((T, m.H), dtype=torch.float64)
        for e in torch.unique(ids).tolist():
            tok, j = torch.nonzero(ids == e, as_tuple=True)
            gu = x[tok] @ self.w13[e].double().T
            if self.b13 is not None:
                gu += self.b13[e].double()
            h = self.activation(gu)
            y = h @ self.w2[e].double().T
            if self.b2 is not None:
                y += self.b2[e].double()
            out.index_add_(0, tok, y * w[tok, j].double()[:, None])
        return out


# ---------------------------------------------------------------------------
# Timing as moe_bench does on the CPU
# ---------------------------------------------------------------------------

def llc_bytes():
    for index in (3, 2):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    return 0


class Flusher:
    """Reads three times the last-level cache (at least 32 MiB), as
    bench_cpu_flush_caches does, so each forward reads cold weights."""

    def __init__(self, torch):
        n = max(3 * llc_bytes(), 32 << 20)
        self.buf = torch.ones(n // 8, dtype=torch.int64)

    def __call__(self):
        return int(self.buf.sum())


def time_point(layer, T, flusher, warmup, reps):
    seconds = 0.0
    for _ in range(warmup):
        flusher()
        t0 = time.perf_counter()
        layer.forward(T)
        seconds = time.perf_counter() - t0
    if reps <= 0:  # about one second of timed forwards, 3..30
        reps = min(30, max(3, math.ceil(1.0 / seconds))) if warmup > 0 and seconds > 0 else 5
    times = []
    ids = None
    for _ in range(reps):
        flusher()
        t0 = time.perf_counter()
        _, ids = layer.forward(T)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, min(times) * 1e6, reps, ids


def cpu_model_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def fits_in_memory(m, max_tokens):
    weights = 3.0 * m.E * m.H * m.I * 2
    activations = 4.0 * max_tokens * m.k * (m.H + 2 * m.I) * 4
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True, weights
    return weights + activations < 0.7 * total, weights


def run_bench(torch, args, models, tokens):
    device = cpu_model_name()
    threads = torch.get_num_threads()
    now = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    timing = (f"host clock around forward, median, {args.warmup} warm-up, caches flushed "
              f"before each forward")
    kernels = f"torch {torch.__version__} per-expert bf16 F.linear"
    print(f"torch_cpu_peer  {now}")
    print(f"device          \"{device}\", {threads} torch threads, {kernels}")
    print(f"timing          {timing}\n")
    print(f"{'model':<18} {'tokens':>6} {'experts':>7} {'median_us':>11} {'min_us':>11} "
          f"{'TFLOP/s':>9} {'GB/s':>8}", flush=True)
    flusher = Flusher(torch)
    rows = []
    doc = {"command": " ".join(sys.argv), "date": now, "backend": "torch-cpu-peer",
           "device": device, "kernels": kernels, "timing": timing, "threads": threads,
           "rooflines": None, "rows": rows}
    for mi, m in enumerate(models):
        ok, weight_bytes = fits_in_memory(m, max(tokens))
        if not ok:
            print(f"{m.name:<18} skipped: {weight_bytes / 2**30:.1f} GiB of weights do not fit "
                  f"this machine's memory", flush=True)
            continue
        layer = Layer(torch, m, max(tokens), seed=args.seed * 1000003 + mi * 16)
        for T in tokens:
            median_us, min_us, reps, ids = time_point(layer, T, flusher, args.warmup, args.reps)
            touched = int(torch.unique(ids).numel())
            flops = 2.0 * T * m.k * 3 * m.H * m.I
            nbytes = touched * 3.0 * m.H * m.I * 2
            row = dict(model=m.name, hidden=m.H, intermediate=m.I, experts=m.E, top_k=m.k,
                       tokens=T, experts_touched=touched, flops=flops, bytes=nbytes,
                       median_us=round(median_us, 3), min_us=round(min_us, 3), reps=reps,
                       tflops=flops / median_us * 1e-6, gbps=nbytes / median_us * 1e-3)
            rows.append(row)
            print(f"{m.name:<18} {T:>6} {touched:>7} {median_us:>11.1f} {min_us:>11.1f} "
                  f"{row['tflops']:>9.4f} {row['gbps']:>8.1f}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(doc, f, indent=1)
        del layer
    return 0


def run_check(torch, args):
    """Every model at reduced width (the routing and activation of each,
    H and I cut), T = 1, 5, 33: the peer against float64, relative
    Frobenius error under the library's test bound of 1e-2."""
    failures = 0
    for mi, full in enumerate(MODELS):
        m = Model(**{**full.__dict__, "H": 96, "I": 64})
        layer = Layer(torch, m, 33, seed=args.seed + mi)
        for T in (1, 5, 33):
            out, _ = layer.forward(T)
            ids, w = layer.route(layer.logits[:T])
            ref = layer.reference(T, ids, w)
            rel = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
            ok = rel < 1e-2 and bool(torch.isfinite(out).all())
            failures += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {m.name:<18} T={T:<3} rel={rel:.2e}", flush=True)
    print(f"{'FAILED' if failures else 'passed'}: {failures} failing case(s)")
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", help="NAME[,NAME...] or all: " +
                   ", ".join(m.name for m in MODELS))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts")
    p.add_argument("--reps", type=int, default=0,
                   help="timed forwards per point (default: about 1 s of them, 3..30)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the rows as JSON (moe_bench's layout)")
    p.add_argument("--check", action="store_true", help="compare with float64 and exit")
    p.add_argument("--no-install", action="store_true",
                   help="fail instead of installing torch from PyPI when it is missing")
    args = p.parse_args()
    names = [m.name for m in MODELS] if args.model == "all" else args.model.split(",")
    unknown = [n for n in names if n not in MODEL_BY_NAME]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    if min(tokens) < 1:
        p.error("token counts must be positive")

    torch = import_torch(not args.no_install)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    torch.set_grad_enabled(False)
    if args.check:
        return run_check(torch, args)
    return run_bench(torch, args, [MODEL_BY_NAME[n] for n in names], tokens)


if __name__ == "__main__":
    sys.exit(main())
