"""layer.py - MoELayer: a libmoe layer built from torch tensors, run on the
tensor's device (CUDA on torch's current stream through moe_cuda.h, the
CPU backend otherwise), writing into torch tensors without copies: every
tensor is wrapped as a moe_buffer around its data pointer.

The calls are torch.library custom ops (moe::forward, moe::forward_routed,
moe::forward_capture) with fake implementations, so torch.compile traces
them as single nodes; the layer travels as an integer handle.
"""
import ctypes
import threading

import torch

from . import _lib
from ._lib import check, lib

_ACTIVATIONS = {
    "swiglu": _lib.ACTIVATION_SWIGLU,
    "silu": _lib.ACTIVATION_SWIGLU,
    "geglu": _lib.ACTIVATION_GEGLU,
    "gelu_tanh": _lib.ACTIVATION_GEGLU,
    "swiglu_clamp": _lib.ACTIVATION_SWIGLU_CLAMP,
}

_lock = threading.Lock()
_contexts = {}  # ("cpu",) or ("cuda", device, stream) -> moe_context *


def _context(device):
    """The context of a torch device: one CPU context; for CUDA one per
    (device, stream), created on torch's current stream of that device."""
    if device.type == "cpu":
        key = ("cpu",)
    elif device.type == "cuda":
        if not _lib.HAVE_CUDA:
            raise _lib.MoeError(
                _lib.ERROR_BACKEND_UNAVAILABLE,
                "MOE_ERROR_BACKEND_UNAVAILABLE",
                "this libmoe was built without the CUDA backend (reinstall with nvcc and a "
                'GPU present, or -C cmake.define.MOE_BACKEND="cpu;cuda")',
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream
        key = ("cuda", index, stream)
    else:
        raise ValueError(f"moe: tensors on {device} are not supported (cpu or cuda)")
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = ctypes.c_void_p()
            if key[0] == "cpu":
                check(lib.moe_context_create(_lib.BACKEND_CPU, 0, ctypes.byref(ctx)))
            else:
                check(lib.moe_cuda_context_create_on_stream(key[1], key[2], ctypes.byref(ctx)))
            _contexts[key] = ctx
        return key, ctx


class _Wrapped:
    """moe_buffers around tensors' memory, freed (handles only) on exit."""

    def __init__(self, ctx, cuda):
        self.ctx, self.cuda, self.buffers = ctx, cuda, []

    def __call__(self, tensor):
        if tensor.numel() == 0:
            raise ValueError("moe: empty tensors are handled before wrapping")
        buf = ctypes.c_void_p()
        nbytes = tensor.numel() * tensor.element_size()
        wrap = lib.moe_cuda_buffer_wrap if self.cuda else lib.moe_buffer_wrap_host
        check(wrap(self.ctx, tensor.data_ptr(), nbytes, ctypes.byref(buf)), self.ctx)
        self.buffers.append(buf)
        return buf

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for buf in self.buffers:
            lib.moe_buffer_destroy(buf)


def _host(t, dtype):
    return None if t is None else t.detach().to(device="cpu", dtype=dtype).contiguous()


def _ptr(t):
    return None if t is None else t.data_ptr()


class MoELayer:
    """A MoE feed-forward block on libmoe.

    w13: bf16 [E][2I][H] (rows 0..I-1 gate, I..2I-1 up), or [E][H][2I] with
         layout="in_out"; w2: bf16 [E][H][I] (or [E][I][H] with "in_out").
         Any device: the weights are converted once, on the host, into the
         layer of each device it runs on.
    top_k, renormalize, scoring ("softmax"|"sigmoid"), num_groups,
    topk_groups, group_scoring ("max"|"top2_sum"), routed_scaling_factor,
    activation ("swiglu"|"geglu"|"swiglu_clamp"), swiglu_alpha,
    swiglu_limit, router_weight_on_input: as moe_config (include/moe.h).
    w13_bias [E][2I], w2_bias [E][H], correction_bias [E] (fp32), and
    expert_map [num_experts] (router id -> local id or -1) are optional.
    max_tokens: the reservation; larger batches run in chunks of it.
    """

    _registry = {}
    _next_handle = 1

    def __init__(self, w13, w2, top_k, *, num_experts=None, renormalize=False,
                 scoring="softmax", num_groups=0, topk_groups=0, group_scoring="max",
                 routed_scaling_factor=1.0, activation="swiglu", swiglu_alpha=1.702,
                 swiglu_limit=7.0, router_weight_on_input=False, layout="out_in",
                 w13_bias=None, w2_bias=None, correction_bias=None, expert_map=None,
                 max_tokens=1024):
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError("moe: w13 and w2 must be 3-D [E][..][..]")
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"moe: layout {layout!r} is not 'out_in' or 'in_out'")
        in_out = layout == "in_out"
        EL = w13.shape[0]
        H = w13.shape[1] if in_out else w13.shape[2]
        two_i = w13.shape[2] if in_out else w13.shape[1]
        if two_i % 2:
            raise ValueError(f"moe: w13 has {two_i} gate|up rows, not an even number")
        I = two_i // 2
        want_w2 = (EL, I, H) if in_out else (EL, H, I)
        if tuple(w2.shape) != want_w2:
            raise ValueError(f"moe: w2 has shape {tuple(w2.shape)}, w13 implies {want_w2}")
        cfg = _lib.Config()
        lib.moe_config_init(ctypes.byref(cfg))
        cfg.hidden_size, cfg.intermediate_size = H, I
        cfg.num_experts = num_experts if num_experts is not None else (
            expert_map.shape[0] if expert_map is not None else EL)
        cfg.num_local_experts = EL
        cfg.top_k = top_k
        cfg.scoring = {"softmax": _lib.SCORING_SOFTMAX, "sigmoid": _lib.SCORING_SIGMOID}[scoring]
        cfg.renormalize = int(bool(renormalize))
        cfg.num_groups, cfg.topk_groups = num_groups, topk_groups
        cfg.group_scoring = {"max": _lib.GROUP_SCORING_MAX,
                             "top2_sum": _lib.GROUP_SCORING_TOP2_SUM}[group_scoring]
        cfg.routed_scaling_factor = routed_scaling_factor
        if activation not in _ACTIVATIONS:
            raise ValueError(f"moe: activation {activation!r} is not one of {list(_ACTIVATIONS)}")
        cfg.activation = _ACTIVATIONS[activation]
        cfg.swiglu_alpha, cfg.swiglu_limit = swiglu_alpha, swiglu_limit
        cfg.weight_layout = _lib.LAYOUT_IN_OUT if in_out else _lib.LAYOUT_OUT_IN
        cfg.router_weight = (_lib.ROUTER_WEIGHT_ON_INPUT if router_weight_on_input
                             else _lib.ROUTER_WEIGHT_ON_OUTPUT)
        self.cfg = cfg
        self.hidden_size, self.intermediate_size = H, I
        self.num_experts, self.top_k = cfg.num_experts, top_k
        self.max_tokens = max_tokens
        # The caller's tensors, converted on the host when a device's layer
        # is created (lazily, at its first call) and dropped right after:
        # no second copy of a model's experts stays in host memory.
        self._src = {"w13": w13, "w2": w2, "w13_bias": w13_bias, "w2_bias": w2_bias,
                     "correction_bias": correction_bias, "expert_map": expert_map}
        self._layers = {}  # context key -> (ctx, moe_layer *)
        with _lock:
            self.handle = MoELayer._next_handle
            MoELayer._next_handle += 1
            MoELayer._registry[self.handle] = self

    def _layer(self, device):
        key, ctx = _context(device)
        entry = self._layers.get(key)
        if entry is None:
            types = {"w13": torch.bfloat16, "w2": torch.bfloat16, "expert_map": torch.int32}
            h = {n: _host(t, types.get(n, torch.float32)) for n, t in self._src.items()}
            weights = _lib.Weights(*(_ptr(h[n]) for n in (
                "w13", "w2", "w13_bias", "w2_bias", "correction_bias", "expert_map")))
            layer = ctypes.c_void_p()
            check(lib.moe_layer_create(ctx, ctypes.byref(self.cfg), ctypes.byref(weights),
                                       ctypes.byref(layer)), ctx)
            try:
                check(lib.moe_layer_reserve(layer, self.max_tokens), ctx)
                check(lib.moe_layer_set_chunking(layer, 1), ctx)
            except _lib.MoeError:
                lib.moe_layer_destroy(layer)
                raise
            entry = (ctx, layer)
            self._layers[key] = entry
        return entry

    def close(self):
        """Frees the library's layers (also done when the object is collected)."""
        for ctx, layer in self._layers.values():
            if ctx is not None:
                lib.moe_context_synchronize(ctx)
            lib.moe_layer_destroy(layer)
        self._layers = {}
        MoELayer._registry.pop(self.handle, None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- the calls, as custom ops ------------------------------------------

    def forward(self, x, router_logits):
        """out[T][H] (bf16) for x[T][H] (bf16) and router_logits[T][E]."""
        return torch.ops.moe.forward(x, router_logits, self.handle)

    def forward_capture(self, x, router_logits):
        """(out, topk_ids int32 [T][k], topk_weights fp32 [T][k]): the forward
        and the picks it routed by, for forward_routed."""
        return torch.ops.moe.forward_capture(x, router_logits, self.handle)

    def forward_routed(self, x, topk_ids, topk_weights):
        """out for the given picks: topk_ids [T][k] (router ids, -1 = none;
        int32 or int64) and topk_weights [T][k], used as given."""
        return torch.ops.moe.forward_routed(x, topk_ids, topk_weights, self.handle)

    __call__ = forward

    # ---- the eager bodies ----------------------------------------------------

    def _check_x(self, x):
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"moe: x has shape {tuple(x.shape)}, want [T][{self.hidden_size}]")
        return x.to(torch.bfloat16).contiguous()

    def _run(self, x, logits=None, ids=None, weights=None, capture=False):
        x = self._check_x(x)
        T, k = x.shape[0], self.top_k
        out = torch.empty_like(x)
        cap_ids = torch.empty((T, k), dtype=torch.int32, device=x.device) if capture else None
        cap_w = torch.empty((T, k), dtype=torch.float32, device=x.device) if capture else None
        if logits is not None:
            logits = logits.to(device=x.device, dtype=torch.float32).contiguous()
            if tuple(logits.shape) != (T, self.num_experts):
                raise ValueError(f"moe: router_logits has shape {tuple(logits.shape)}, want "
                                 f"[{T}][{self.num_experts}]")
        else:
            ids = ids.to(device=x.device, dtype=torch.int32).contiguous()
            weights = weights.to(device=x.device, dtype=torch.float32).contiguous()
            for name, t in (("topk_ids", ids), ("topk_weights", weights)):
                if tuple(t.shape) != (T, k):
                    raise ValueError(f"moe: {name} has shape {tuple(t.shape)}, want [{T}][{k}]")
        if T == 0:
            return (out, cap_ids, cap_w) if capture else out
        ctx, layer = self._layer(x.device)
        with _Wrapped(ctx, x.device.type == "cuda") as wrap:
            if logits is None:
                st = lib.moe_layer_forward_routed(layer, T, wrap(x), wrap(ids), wrap(weights),
                                                  wrap(out))
            elif capture:
                st = lib.moe_layer_forward_capture(layer, T, wrap(x), wrap(logits), wrap(out),
                                                   wrap(cap_ids), wrap(cap_w))
            else:
                st = lib.moe_layer_forward(layer, T, wrap(x), wrap(logits), wrap(out))
            check(st, ctx)
        return (out, cap_ids, cap_w) if capture else out


def _layer_of(handle):
    layer = MoELayer._registry.get(handle)
    if layer is None:
        raise ValueError(f"moe: no live MoELayer with handle {handle}")
    return layer


@torch.library.custom_op("moe::forward", mutates_args=())
def _forward_op(x: torch.Tensor, router_logits: torch.Tensor, handle: int) -> torch.Tensor:
    return _layer_of(handle)._run(x, logits=router_logits)


@_forward_op.register_fake
def _(x, router_logits, handle):
    return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)


@torch.library.custom_op("moe::forward_capture", mutates_args=())
def _forward_capture_op(x: torch.Tensor, router_logits: torch.Tensor,
                        handle: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_of(handle)._run(x, logits=router_logits, capture=True)


@_forward_capture_op.register_fake
def _(x, router_logits, handle):
    k = _layer_of(handle).top_k
    return (torch.empty(x.shape, dtype=torch.bfloat16, device=x.device),
            x.new_empty((x.shape[0], k), dtype=torch.int32),
            x.new_empty((x.shape[0], k), dtype=torch.float32))


@torch.library.custom_op("moe::forward_routed", mutates_args=())
def _forward_routed_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       handle: int) -> torch.Tensor:
    return _layer_of(handle)._run(x, ids=topk_ids, weights=topk_weights)


@_forward_routed_op.register_fake
def _(x, topk_ids, topk_weights, handle):
    return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
