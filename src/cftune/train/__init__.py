"""Stage 2, `cftune train`: fine-tune on a task while staying close to the base (CFS, KD and the
baselines).

`config` (settings and methods), `data` (task rows and CF samples as masked examples), `streams`
(one run's datasets), `batches` (mixed batches), `trainer` (`CftuneTrainer.compute_loss`: the
loss), `arguments` (the Trainer's arguments), `folder` (the output folder: done?, resume, save,
model card, upload), `sdft` (TRL's on-policy self-distillation), `stage` (the job). The trainer loads transformers' Trainer, so it is imported
from `cftune.train.trainer` itself, not here. The public API:
"""

from cftune.train.config import TrainConfig
from cftune.train.stage import train

__all__ = ["TrainConfig", "train"]
