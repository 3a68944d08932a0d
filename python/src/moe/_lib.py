"""_lib.py - ctypes bindings of libmoe (include/moe.h, include/moe_cuda.h).

The library ships inside the package (python/CMakeLists.txt installs it
next to this file); MOE_LIBRARY names another build of it (for example the
repository's build/libmoe.so). Every call's status goes through check(),
which raises MoeError with moe_last_error's message.
"""
import ctypes
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# moe_status codes (include/moe.h).
SUCCESS = 0
ERROR_INVALID_ARGUMENT = -1
ERROR_NULL_POINTER = -2
ERROR_UNSUPPORTED = -3
ERROR_BUFFER_TOO_SMALL = -4
ERROR_CONTEXT_MISMATCH = -5
ERROR_NOT_RESERVED = -6
ERROR_OUT_OF_MEMORY = -7
ERROR_BACKEND_UNAVAILABLE = -8
ERROR_DEVICE = -9
ERROR_INTERNAL = -10
ERROR_TUNING_MISMATCH = -11

BACKEND_AUTO, BACKEND_CPU, BACKEND_CUDA, BACKEND_OPENCL = 0, 1, 2, 3
SCORING_SOFTMAX, SCORING_SIGMOID = 0, 1
GROUP_SCORING_MAX, GROUP_SCORING_TOP2_SUM = 0, 1
ACTIVATION_SWIGLU, ACTIVATION_GEGLU, ACTIVATION_SWIGLU_CLAMP = 0, 1, 2
LAYOUT_OUT_IN, LAYOUT_IN_OUT = 0, 1
ROUTER_WEIGHT_ON_OUTPUT, ROUTER_WEIGHT_ON_INPUT = 0, 1


class MoeError(RuntimeError):
    """A failing libmoe call: .status is the moe_status code, .status_name
    its name, and the message is moe_last_error's."""

    def __init__(self, status, name, message):
        super().__init__(f"{name}: {message}")
        self.status = status
        self.status_name = name
        self.message = message


class Config(ctypes.Structure):
    """moe_config, field for field."""

    _fields_ = [
        ("hidden_size", ctypes.c_int64),
        ("intermediate_size", ctypes.c_int64),
        ("num_experts", ctypes.c_int32),
        ("num_local_experts", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("scoring", ctypes.c_int),
        ("renormalize", ctypes.c_int32),
        ("num_groups", ctypes.c_int32),
        ("topk_groups", ctypes.c_int32),
        ("group_scoring", ctypes.c_int),
        ("routed_scaling_factor", ctypes.c_float),
        ("activation", ctypes.c_int),
        ("swiglu_alpha", ctypes.c_float),
        ("swiglu_limit", ctypes.c_float),
        ("weight_layout", ctypes.c_int),
        ("router_weight", ctypes.c_int),
    ]


class Weights(ctypes.Structure):
    """moe_weights: host pointers, read during moe_layer_create only."""

    _fields_ = [
        ("w13", ctypes.c_void_p),
        ("w2", ctypes.c_void_p),
        ("w13_bias", ctypes.c_void_p),
        ("w2_bias", ctypes.c_void_p),
        ("correction_bias", ctypes.c_void_p),
        ("expert_map", ctypes.c_void_p),
    ]


def _library_path():
    env = os.environ.get("MOE_LIBRARY")
    if env:
        return env
    return os.path.join(_HERE, "libmoe.so")


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I64 = ctypes.c_int64
_SZ = ctypes.c_size_t

lib = ctypes.CDLL(_library_path())

_SIGNATURES = {
    "moe_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "moe_last_error": (ctypes.c_char_p, [_P]),
    "moe_context_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, _PP]),
    "moe_context_destroy": (None, [_P]),
    "moe_context_backend": (ctypes.c_int, [_P]),
    "moe_context_device_name": (ctypes.c_char_p, [_P]),
    "moe_context_synchronize": (ctypes.c_int, [_P]),
    "moe_buffer_wrap_host": (ctypes.c_int, [_P, _P, _SZ, _PP]),
    "moe_buffer_destroy": (None, [_P]),
    "moe_config_init": (None, [ctypes.POINTER(Config)]),
    "moe_layer_create": (ctypes.c_int, [_P, ctypes.POINTER(Config), ctypes.POINTER(Weights), _PP]),
    "moe_layer_destroy": (None, [_P]),
    "moe_layer_reserve": (ctypes.c_int, [_P, _I64]),
    "moe_layer_set_chunking": (ctypes.c_int, [_P, ctypes.c_int]),
    "moe_layer_forward": (ctypes.c_int, [_P, _I64, _P, _P, _P]),
    "moe_layer_forward_capture": (ctypes.c_int, [_P, _I64, _P, _P, _P, _P, _P]),
    "moe_layer_forward_routed": (ctypes.c_int, [_P, _I64, _P, _P, _P, _P]),
}
# Present only in a build with the CUDA backend.
_CUDA_SIGNATURES = {
    "moe_cuda_context_create_on_stream": (ctypes.c_int, [ctypes.c_int, _P, _PP]),
    "moe_cuda_buffer_wrap": (ctypes.c_int, [_P, _P, _SZ, _PP]),
}

for _name, (_res, _args) in _SIGNATURES.items():
    _fn = getattr(lib, _name)
    _fn.restype = _res
    _fn.argtypes = _args

HAVE_CUDA = all(hasattr(lib, name) for name in _CUDA_SIGNATURES)
if HAVE_CUDA:
    for _name, (_res, _args) in _CUDA_SIGNATURES.items():
        _fn = getattr(lib, _name)
        _fn.restype = _res
        _fn.argtypes = _args


def check(status, ctx=None):
    """Raises MoeError for a failing status; ctx is the context whose
    moe_last_error holds the message (None: the thread's message)."""
    if status == SUCCESS:
        return
    name = lib.moe_status_string(status).decode()
    message = (lib.moe_last_error(ctx) or b"").decode()
    raise MoeError(status, name, message)
