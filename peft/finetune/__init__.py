"""The fine-tuning engine behind ``tools/finetune.py`` (and ``vit-peft finetune``), one job per file.

``options`` (what a run is told), ``recipes`` (each method's official run as data), ``data`` (splits on the
device), ``build`` (the starting model), ``optim`` (optimizer, decay groups, the learning rate of every step),
``trainer`` (the loop, selection on validation, the final test), ``checkpoint``
(small, safe checkpoints and rebuilding a model from one), ``distributed`` (torchrun, devices, precision),
``predict`` (probabilities, re-evaluation of a saved run, files), ``metrics`` / ``report`` / ``plots`` (the
evaluation files), ``suite`` / ``sweep`` (benchmark suites, hyper-parameters chosen on validation),
``workers`` / ``claims`` / ``results`` (a suite shared by any number of workers, and its results files),
``quickstart`` (the offline demonstration).

    from peft.finetune import FinetuneOptions, run     # `vit_peft.finetune` when installed
    metrics = run(FinetuneOptions(mode="rlrr", data="cifar10", epochs=5))
"""

from .checkpoint import CheckpointMismatch, load_checkpoint
from .rebuild import load_model_from_checkpoint, load_tasks
from .options import FinetuneOptions, OptionsError, check_options
from .trainer import Trainer, TrainingDiverged, export_npz, run

__all__ = ["CheckpointMismatch", "FinetuneOptions", "OptionsError", "Trainer", "TrainingDiverged", "check_options",
           "export_npz", "load_checkpoint", "load_model_from_checkpoint", "load_tasks", "run"]
