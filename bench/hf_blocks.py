"""hf_blocks.py - times transformers' own MoE blocks against the same blocks
patched by moe.patch_transformers_moe, at real model shapes (Qwen3-30B-A3B:
H 2048, I 768, 128 experts, top 8; Mixtral-8x7B: H 4096, I 14336, 8
experts, top 2), random bf16 weights, for 1, 16 and 512 tokens. CUDA:
median of CUDA-event timings over repeated calls after warm-up (the
patched block also as a CUDA graph replay); CPU: wall clock.

    python bench/hf_blocks.py [--device cuda] [--tokens 1 16 512] [--iters 50]
"""
import argparse
import copy
import statistics
import time

import torch
import transformers

import moe

SHAPES = {
    "qwen3-30b-a3b": lambda: transformers.Qwen3MoeConfig(
        hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True),
    "mixtral-8x7b": lambda: transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2),
}


def make_block(name):
    cfg = SHAPES[name]()
    if name.startswith("qwen3"):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
    with torch.device("meta"):
        block = B(cfg)
    block = block.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return block.eval()


def time_calls(fn, device, iters):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = ap.parse_args()
    dev = args.device
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print("| block | tokens | transformers (us) | moe (us) | moe graph (us) | speedup | rel diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        theirs = make_block(name).to(dev)
        ours = copy.deepcopy(theirs)
        holder = torch.nn.ModuleDict({"mlp": ours})
        moe.patch_transformers_moe(holder, max_tokens=max(args.tokens))
        for T in args.tokens:
            x = torch.randn(1, T, theirs.gate.weight.shape[1], device=dev).to(torch.bfloat16)
            with torch.no_grad():
                t_theirs = time_calls(lambda: theirs(x), dev, args.iters)
                t_ours = time_calls(lambda: ours(x), dev, args.iters)
                diff = ((ours(x).float() - theirs(x).float()).norm() /
                        theirs(x).float().norm()).item()
                t_graph = float("nan")
                if dev == "cuda":
                    stream = torch.cuda.Stream()
                    with torch.cuda.stream(stream):
                        ours(x)  # this stream's context and layer exist before capture
                        torch.cuda.synchronize()
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, stream=stream):
                            ours(x)
                    t_graph = time_calls(graph.replay, dev, args.iters)
            print(f"| {name} | {T} | {t_theirs:.1f} | {t_ours:.1f} | {t_graph:.1f} | "
                  f"{t_theirs / t_ours:.2f}x | {diff:.1e} |")
        del theirs, ours, holder
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
