"""moe - PyTorch bindings of the portable BF16 Mixture-of-Experts library.

MoELayer runs one MoE block through libmoe (CPU backend, or CUDA on torch's
current stream); patch_transformers_moe swaps the MoE blocks of a loaded
Hugging Face transformers model for it. Errors raise MoeError carrying the
library's moe_last_error message.
"""
from ._lib import MoeError
from .layer import MoELayer
from .hf import patch_transformers_moe

__all__ = ["MoeError", "MoELayer", "patch_transformers_moe"]
__version__ = "0.1.0"
