"""The recompute pass over static buffers, replayed as a CUDA graph (gpt-fast's trick).

An eager :meth:`BlockEngine.forward` of an 8B model launches a few hundred small kernels per
prompt, and on a GPU their launch cost, not the arithmetic, sets the TTFT. Here every tensor the
layer loop touches lives at a fixed address, so the loop is captured once per size and replayed:

- the context is one preallocated pair [layers, kv_heads, max_length + 1, head_dim]; the last
  slot is scratch. Attention always spans the whole buffer: it is causal by position, so
  entries past the prompt (left from earlier prompts, zero at first) are never seen;
- the recomputed tokens are padded up to a multiple of ``bucket`` with rows at the scratch
  position: they attend and write only there, and no real token can see them;
- the logits are read at a row given by a buffer, so one graph serves every m in its bucket.

Policies whose recomputed set is the same in every layer (``none``, ``boundary:K``, ``tail:K``, ``full``)
run here; ``deviation`` narrows its set after a check layer on the host, so it stays with
:meth:`BlockEngine.forward`. On CPU the same static pass runs eagerly (no graph): that is what
the tests compare with the engine's own forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from rcllm.engine.blocks import Segment
from rcllm.engine.forward import BlockEngine, ForwardResult, Prompt, head_logits
from rcllm.engine.policy import Policy, parse_policy


class StaticRecompute:
    """``forward(segments, policy)`` like :meth:`BlockEngine.forward` (no generation), for prompts
    of up to ``max_length`` tokens, captured as one CUDA graph per bucket of recomputed tokens."""

    def __init__(
        self, engine: BlockEngine, max_length: int, bucket: int = 64, logit_ids: torch.Tensor | None = None
    ):
        if max_length < 1 or bucket < 1:
            raise ValueError("max_length and bucket must be >= 1")
        self.engine = engine
        # only these token ids' logits are computed (the rest -inf), as BlockEngine.forward(logit_ids=)
        self.logit_ids = None if logit_ids is None else logit_ids.to(engine.device)
        self.max_length = max_length
        self.bucket = bucket
        self.scratch = max_length  # the padding rows' position
        shape = (engine.n_layers, engine.n_kv_heads, max_length + 1, engine.head_dim)
        self.ctx_k = torch.zeros(shape, dtype=engine.dtype, device=engine.device)
        self.ctx_v = torch.zeros(shape, dtype=engine.dtype, device=engine.device)
        self.use_graphs = engine.device.type == "cuda"
        self._graphs: dict[int, tuple] = {}  # rows -> (graph or None, ids, idx, last, logits)
        self._pool = None

    def accepts(self, segments: Sequence[Segment], policy: str | Policy) -> bool:
        """Whether this pass can run the prompt: a policy whose recomputed set is the same in every
        layer, and a prompt that fits the buffers. Others go to :meth:`BlockEngine.forward`."""
        return parse_policy(policy).kind != "deviation" and sum(s.n_tokens for s in segments) <= self.max_length

    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment], policy: str | Policy = "full") -> ForwardResult:
        started = time.perf_counter()
        engine = self.engine
        policy = parse_policy(policy)
        if policy.kind == "deviation":
            raise ValueError(
                "deviation narrows its recomputed tokens after its check layer: run it with BlockEngine.forward"
            )
        length = engine.check_prompt(segments)
        if length > self.max_length:
            raise ValueError(f"prompt of {length} tokens exceeds this pass's {self.max_length}-token buffers")

        ids, _, _, idx = engine.select(segments, policy)  # the selection of BlockEngine.forward
        m = idx.numel()
        if policy.kind != "full":
            engine.place(segments, self.ctx_k, self.ctx_v)

        rows = -(-m // self.bucket) * self.bucket
        graph, ids_buf, idx_buf, last_buf, logits = self._graph(rows)
        ids_buf.copy_(torch.cat([ids[idx], ids.new_zeros(rows - m)]))
        idx_buf.copy_(torch.cat([idx, idx.new_full((rows - m,), self.scratch)]))
        last_buf.fill_(m - 1)
        if graph is None:
            logits = self._run(ids_buf, idx_buf, last_buf)
        else:
            graph.replay()
        return ForwardResult(
            logits=logits.flatten().cpu(),
            n_tokens=length,
            recomputed_tokens=m,
            recomputed_fraction=m / length,
            prefill_ms=(time.perf_counter() - started) * 1000.0,
        )

    def _run(self, ids: torch.Tensor, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The layer loop on static tensors: the body of the graph."""
        engine = self.engine
        h = engine.embed(ids).unsqueeze(0)
        # one prompt over the whole static context; the padding rows write only the scratch slot
        prompt = Prompt(ids, None, None, None, self.ctx_k, self.ctx_v, self.ctx_k.shape[-2], idx, -1)
        for layer_no, layer in enumerate(engine.layers):
            h, _ = engine.run_layer(layer, h, [prompt], layer_no)
        return head_logits(engine.lm_head, engine.norm(h[0].index_select(0, last)), self.logit_ids).float()

    def _graph(self, rows: int) -> tuple:
        if rows in self._graphs:
            return self._graphs[rows]
        device = self.engine.device
        ids = torch.zeros(rows, dtype=torch.long, device=device)
        idx = torch.full((rows,), self.scratch, dtype=torch.long, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)
        if not self.use_graphs:
            entry = (None, ids, idx, last, None)
        else:
            # Warm up on a side stream first (Triton compiles, the allocator settles), as
            # torch.cuda.graph requires. Only the scratch slot is written: idx is all scratch.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(ids, idx, last)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._run(ids, idx, last)
            self._pool = graph.pool()
            entry = (graph, ids, idx, last, logits)
        self._graphs[rows] = entry
        return entry
