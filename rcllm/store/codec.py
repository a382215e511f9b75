"""One block as it is stored: its KV in the stored dtype, a checksum, and as bytes for a peer.

A cache stores KV as ``fp32``, ``bf16``, ``fp16`` or ``int8`` (``rcllm build-cache --kv-dtype``),
whatever dtype the model computes in; reading a block gives it back in the dtype it was
computed in, so the engine only ever sees ordinary tensors.

The stored tensors of a block, beside ``ids`` (int64 token ids):

- fp32 / bf16 / fp16: ``k`` and ``v`` [layers, kv_heads, n, head_dim] in that dtype;
- int8: ``k_q`` and ``v_q`` (int8, same shape) with ``k_scale`` and ``v_scale`` (float16).
  Symmetric quantisation, ``x ~ q * scale`` with ``|q| <= 127``, one scale per channel and head
  over the block's tokens for keys ([layers, kv_heads, 1, head_dim]) and one per token and head
  for values ([layers, kv_heads, n, 1]): keys have outlier channels (RoPE's slow frequency
  pairs), which a per-token scale would spend its range on (KIVI; measured in
  benchmarks/kv_dtype.py). Decoding broadcasts ``q * scale`` whatever axis the scale runs along.

int8 blocks use other tensor names than float blocks on purpose: a reader that knows only
``k``/``v`` fails on an int8 block instead of placing its integers as if they were floats.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rcllm.engine.blocks import BlockKV

BLOCK_FORMAT = "rcllm-block/1"
FLOAT_KV = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KV_DTYPES = (*FLOAT_KV, "int8")
KV_DTYPE_HELP = "fp32 | bf16 | fp16 | int8"
SCALE_DTYPE = torch.float16
# Scales are clamped to float16's smallest normal number, whose rounding stays within 2**-11
# (relative); below it a subnormal scale would round too coarsely for the bound below to hold.
_SCALE_MIN = 2.0**-14
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max
# Every tensor a stored block may hold, in checksum order (float blocks: k, v, ids, as before int8).
PARTS = ("k", "v", "k_q", "k_scale", "v_q", "v_scale", "ids")
INT8_PARTS = {"k_q", "k_scale", "v_q", "v_scale", "ids"}
FLOAT_PARTS = {"k", "v", "ids"}
AXES = ("token", "channel")
KEY_AXIS, VALUE_AXIS = "channel", "token"


class CorruptBlockError(ValueError):
    """A stored block whose bytes do not match its checksum, or whose shard is unreadable."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kv_dtype_of(dtype: torch.dtype) -> str:
    """The ``--kv-dtype`` name of a float dtype: torch.float32 -> ``fp32``."""
    for name, d in FLOAT_KV.items():
        if d == dtype:
            return name
    raise ValueError(f"no --kv-dtype stores {dtype_name(dtype)} KV; expected one of {KV_DTYPE_HELP}")


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; expected one of {KV_DTYPE_HELP}")
    return kv_dtype


# ---------------------------------------------------------------------------------------------
# int8


def quantize(x: torch.Tensor, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``x`` [..., n, d]: (q int8, scale float16) with ``|x - q * scale| <= scale / 2``.

    ``axis="token"``: one scale per row (token), taken over the last dim; ``"channel"``: one
    per column (channel), taken over the tokens.
    """
    if axis not in AXES:
        raise ValueError(f"unknown quantisation axis {axis!r}; expected one of {AXES}")
    xf = x.float()
    absmax = xf.abs().amax(dim=-1 if axis == "token" else -2, keepdim=True)
    if not torch.isfinite(absmax).all():
        raise ValueError("block KV holds inf or NaN: it cannot be quantised (and should not be stored)")
    # Rounded to float16 the scale may shrink by 2**-11 at most, so |x| / scale <= 127.06 and
    # round() never needs the clamp: every element keeps the error bound.
    scale = (absmax / 127.0).clamp(_SCALE_MIN, _SCALE_MAX).to(SCALE_DTYPE)
    q = torch.round(xf / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (computed in float32: exact there, int8 times a float16 scale)."""
    return (q.float() * scale.float()).to(dtype)


# ---------------------------------------------------------------------------------------------
# encode and decode


def encode(
    block: BlockKV, kv_dtype: str | None = None, key_axis: str = KEY_AXIS, value_axis: str = VALUE_AXIS
) -> dict[str, torch.Tensor]:
    """The tensors that store ``block`` as ``kv_dtype`` (None: as it is), on the CPU.

    ``key_axis``/``value_axis`` choose the int8 scales' axis (``token`` or ``channel``); the
    store always uses the defaults, the benchmark compares the others.
    """
    keys, values = block.keys.detach().to("cpu"), block.values.detach().to("cpu")
    kv_dtype = kv_dtype_of(keys.dtype) if kv_dtype is None else check_kv_dtype(kv_dtype)
    ids = block.token_ids.to(torch.int64).contiguous()
    if kv_dtype in FLOAT_KV:
        dtype = FLOAT_KV[kv_dtype]
        k, v = keys.to(dtype).contiguous(), values.to(dtype).contiguous()
        # float16 tops out at 65504: a larger value would be stored as inf, silently.
        if dtype == torch.float16 and keys.dtype != dtype and not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ValueError("block KV exceeds float16's range (|x| > 65504) or is not finite: store it as bf16 or int8")
        return {"k": k, "v": v, "ids": ids}
    k_q, k_scale = quantize(keys, key_axis)
    v_q, v_scale = quantize(values, value_axis)
    return {"k_q": k_q, "k_scale": k_scale.contiguous(), "v_q": v_q, "v_scale": v_scale.contiguous(), "ids": ids}


def stored_kv_dtype(tensors: dict[str, torch.Tensor]) -> str:
    """The KV dtype of stored tensors: ``int8``, or the float dtype of ``k``."""
    names = set(tensors)
    if names == INT8_PARTS:
        return "int8"
    if names == FLOAT_PARTS:
        return kv_dtype_of(tensors["k"].dtype)
    raise ValueError(f"not a stored rcllm block: tensors {sorted(names)}")


def stored_parts(entry: dict) -> tuple[str, ...]:
    """The names of the tensors an index entry's block is stored as."""
    return ("k_q", "k_scale", "v_q", "v_scale", "ids") if entry.get("kv_dtype") == "int8" else ("k", "v", "ids")


def decode(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) in ``dtype`` from stored tensors (None: a float block as stored)."""
    if "k_q" in tensors:
        if dtype is None:
            raise ValueError("an int8 block decodes to the dtype it was computed in, which was not given")
        return dequantize(tensors["k_q"], tensors["k_scale"], dtype), dequantize(tensors["v_q"], tensors["v_scale"], dtype)
    keys, values = tensors["k"], tensors["v"]
    return (keys, values) if dtype is None else (keys.to(dtype), values.to(dtype))


def round_trip(block: BlockKV, kv_dtype: str, key_axis: str = KEY_AXIS, value_axis: str = VALUE_AXIS) -> BlockKV:
    """``block`` stored as ``kv_dtype`` and read back (in its own dtype, on its own device)."""
    tensors = encode(block, kv_dtype, key_axis, value_axis)
    keys, values = decode(tensors, block.keys.dtype)
    device = block.keys.device
    return BlockKV(block.token_ids, keys.to(device), values.to(device), block.base_pos, block.fingerprint, block.context)


def kv_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Stored bytes of K and V (scales included), without the token ids."""
    return sum(t.nbytes for name, t in tensors.items() if name != "ids")


# ---------------------------------------------------------------------------------------------
# checksum, index entry, block


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b-128 of every stored tensor's bytes (K, V, their scales, token ids)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in PARTS:
        if name in tensors:
            digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def block_entry(block: BlockKV, tensors: dict[str, torch.Tensor]) -> dict:
    """The index entry of a block stored as ``tensors``, less its shard. ``dtype``: what it
    was computed in, and decodes to; ``kv_dtype``: how it is stored."""
    return {
        "n_tokens": block.n_tokens,
        "base_pos": block.base_pos,
        "fingerprint": block.fingerprint,
        "context": block.context,
        "dtype": dtype_name(block.keys.dtype),
        "kv_dtype": stored_kv_dtype(tensors),
        "nbytes": kv_nbytes(tensors),
        "checksum": checksum(tensors),
    }


def to_block(tensors: dict[str, torch.Tensor], entry: dict, device) -> BlockKV:
    """The block of stored ``tensors`` described by ``entry``, K/V decoded (to the dtype it was
    computed in: ``entry["dtype"]``, also in entries written before int8 storage) on ``device``."""
    keys, values = decode(tensors, getattr(torch, entry["dtype"]))
    return BlockKV(
        token_ids=tensors["ids"],
        keys=keys.to(device),
        values=values.to(device),
        base_pos=int(entry["base_pos"]),
        fingerprint=entry["fingerprint"],
        context=entry["context"],
    )


# ---------------------------------------------------------------------------------------------
# bytes


def serialize(tensors: dict[str, torch.Tensor], entry: dict) -> bytes:
    """Stored tensors as self-describing bytes (safetensors with the entry's fields)."""
    meta = {
        "format": BLOCK_FORMAT,
        "base_pos": str(entry["base_pos"]),
        "fingerprint": entry["fingerprint"],
        "checksum": entry["checksum"],
    }
    if entry["context"] is not None:
        meta["context"] = entry["context"]
    meta["dtype"] = entry["dtype"]
    return st_save(tensors, metadata=meta)


def parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Stored tensors and index entry (less shard) from :func:`serialize` bytes, checksum verified."""
    data = bytes(data)
    try:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = st_load(data)
    except (ValueError, SafetensorError) as e:
        raise ValueError(f"not a serialized rcllm block ({len(data)} bytes): {e}") from None
    if meta.get("format") != BLOCK_FORMAT or set(tensors) not in (FLOAT_PARTS, INT8_PARTS):
        raise ValueError(f"not a serialized rcllm block: format {meta.get('format')!r}, tensors {sorted(tensors)}")
    actual = checksum(tensors)
    if actual != meta.get("checksum"):
        raise CorruptBlockError(f"serialized block is corrupt: checksum {actual}, expected {meta.get('checksum')}")
    kv_dtype = stored_kv_dtype(tensors)
    if kv_dtype == "int8" and "dtype" not in meta:
        raise ValueError("not a serialized rcllm block: an int8 block without the dtype it decodes to")
    stored = dtype_name(tensors["k"].dtype) if "k" in tensors else None
    entry = {
        "n_tokens": tensors["ids"].numel(),
        "base_pos": int(meta["base_pos"]),
        "fingerprint": meta["fingerprint"],
        "context": meta.get("context"),
        "dtype": meta.get("dtype", stored),
        "kv_dtype": kv_dtype,
        "nbytes": kv_nbytes(tensors),
        "checksum": actual,
    }
    return tensors, entry


def block_to_bytes(block: BlockKV, kv_dtype: str | None = None) -> bytes:
    """One block as self-describing bytes, stored as ``kv_dtype`` (None: as it is)."""
    tensors = encode(block, kv_dtype)
    return serialize(tensors, block_entry(block, tensors))


def block_from_bytes(data: bytes) -> BlockKV:
    """Decode :func:`block_to_bytes`; the checksum is always verified (the bytes crossed a network)."""
    tensors, entry = parse(data)
    return to_block(tensors, entry, "cpu")
