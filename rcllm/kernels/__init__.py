"""Kernels of the block-aware forward pass.

Each name below is the implementation the engine calls. These are the torch references, used
on CPU and CUDA alike; a faster version (e.g. Triton) replaces one by changing its import line
here, and is tested against the reference it replaces.
"""

from rcllm.kernels.attention import selective_attention
from rcllm.kernels.kv import place_blocks, scatter_kv
from rcllm.kernels.rope import apply_rope, rerotate, rope_angles

__all__ = ["apply_rope", "place_blocks", "rerotate", "rope_angles", "scatter_kv", "selective_attention"]
