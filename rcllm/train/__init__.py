"""Fine-tuning rankers on the prompts they serve (``rcllm finetune``).

- ``examples``: training and validation examples from a time split, encoded by the serving
  prompt code (:meth:`rcllm.engine.ranker.Ranker.segments`)
- ``masks``: the attention pattern and positions of cached reuse, as pure functions of a layout
- ``forward``: the differentiable plain / block-aware forward and the label loss
- ``validate``: validation HR@K with the serving ranker on the weights being trained
- ``checkpoint``: Ctrl-C checkpoints, resume, atomic output folders
- ``settings``: the run's flags, their checks and schedules; ``loop``: :func:`train`, which ties them
  together; ``report``: machine facts and the plot
"""

from rcllm.train.loop import TrainingInterrupted, TrainResult, train
from rcllm.train.settings import TrainSettings
from rcllm.train.masks import block_attention_mask, block_positions

__all__ = ["TrainResult", "TrainSettings", "TrainingInterrupted", "block_attention_mask", "block_positions", "train"]
