"""The block-aware inference engine: models, prompts as blocks, correction policies, ranking,
and the prefix-caching baseline it is measured against (``prefix_cache``)."""

from rcllm.engine.api import open_ranker, parse_dtype
from rcllm.engine.blocks import BlockKV, Segment, uncached
from rcllm.engine.forward import BlockEngine, ForwardResult
from rcllm.engine.policy import Policy, parse_policy
from rcllm.engine.prompt import PromptBuilder, PromptTemplate, item_text
from rcllm.engine.ranker import MemoryBlockCache, Ranker, Ranking

__all__ = [
    "BlockEngine", "BlockKV", "ForwardResult", "MemoryBlockCache", "Policy", "PromptBuilder",
    "PromptTemplate", "Ranker", "Ranking", "Segment", "item_text", "open_ranker", "parse_dtype",
    "parse_policy", "uncached",
]
