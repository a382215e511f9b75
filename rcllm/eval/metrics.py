"""The ranking metrics live in :mod:`rcllm.data.metrics`, below eval, train and demo, which all
use them. This name stays for rcllm/cli/finetune.py's import; once that points there, it goes."""

from rcllm.data.metrics import headline_hit_rate

__all__ = ["headline_hit_rate"]
