"""What a missing block costs a node: fetching it from the peer that holds it, or recomputing it.

    fetch     ≈ rtt + bytes / bandwidth
    recompute ≈ tokens × per-token compute time

Each node measures its own three numbers (moving averages over its fetches and recomputes) and
reports them in ``GET /v1/state``; the node picks the cheaper way for each block it lacks, and
the coordinator prices the blocks a node lacks with that node's numbers when routing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EWMA = 0.2  # weight of a new measurement: recent enough to follow load, smooth enough to ignore one outlier


@dataclass
class CostModel:
    bytes_per_token: int  # KV bytes of one token (layers × 2 × kv_heads × head_dim × dtype size)
    rtt_ms: float = 1.0  # time to the first byte of a peer's answer
    bytes_per_ms: float = 1e6  # body transfer rate once it flows (1 GB/s until measured)
    compute_ms_per_token: float = 0.5  # block recompute time per token on this node

    def fetch_ms(self, tokens: int) -> float:
        return self.rtt_ms + tokens * self.bytes_per_token / self.bytes_per_ms

    def recompute_ms(self, tokens: int) -> float:
        return tokens * self.compute_ms_per_token

    def miss_ms(self, tokens: int, can_fetch: bool = True) -> float:
        """The cost of a block this node lacks: the cheaper of fetching and recomputing it."""
        recompute = self.recompute_ms(tokens)
        return min(self.fetch_ms(tokens), recompute) if can_fetch else recompute

    def should_fetch(self, tokens: int) -> bool:
        return self.fetch_ms(tokens) < self.recompute_ms(tokens)

    def observe_fetch(self, nbytes: int, first_byte_ms: float, body_ms: float) -> None:
        self.rtt_ms += EWMA * (first_byte_ms - self.rtt_ms)
        # a loopback body can arrive within the clock's resolution: floor the time, not the rate
        rate = nbytes / max(body_ms, 1e-3)
        self.bytes_per_ms += EWMA * (rate - self.bytes_per_ms)

    def observe_compute(self, tokens: int, ms: float) -> None:
        if tokens > 0:
            self.compute_ms_per_token += EWMA * (ms / tokens - self.compute_ms_per_token)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        return cls(**{k: data[k] for k in ("bytes_per_token", "rtt_ms", "bytes_per_ms", "compute_ms_per_token")})


def kv_bytes_per_token(model: dict, kv_dtype: str | None = None) -> int:
    """KV bytes per token a block fetch moves: the manifest's model record (its dims and compute
    dtype), stored as ``kv_dtype`` (``fp32 | bf16 | fp16 | int8``; None: the compute dtype).
    int8 counts its byte per element; the float16 scales add ~3% on a 40-token block."""
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
    size = sizes.get(kv_dtype or model["dtype"], 4)
    return int(model["n_layers"]) * 2 * int(model["kv_heads"]) * int(model["head_dim"]) * size
