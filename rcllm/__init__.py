"""rcllm: reuse the KV cache of any prompt block for fast LLM-based recommendation."""

__version__ = "0.1.0"
