"""Training: :func:`train_model`, used by the Metaflow flow and the CLI.

The data streams from the prepared shards (:mod:`plantml.loader`): an epoch is
:func:`train_one_epoch` over a DataLoader, then :func:`validate`. CPU by default, CUDA
when present (``train.device: auto``; bf16 autocast, pinned-memory batches). Seeded
(python, numpy, torch; the loader's shuffle and augmentation from ``(seed, epoch)``).
AdamW with a linear warm-up and cosine decay per step, label smoothing, early stopping
on validation macro-F1 (the best epoch's weights are kept).

After every epoch a checkpoint (weights, optimiser, scheduler, RNG, best-so-far,
history) goes to ``checkpoint_uri`` in the run's store; a retried or resumed branch
continues from the next epoch and gives the same numbers as an uninterrupted run.
Parallel branches share the CPU quota: each gets ``cores // branches`` torch threads so
two branches on two cores do not oversubscribe. Data-parallel ranks
(:mod:`plantml.distributed`) pass a :class:`DistributedContext`.

One job per module: ``records`` (the result, state and settings dataclasses),
``process`` (threads, seeds, device), ``model`` (build, DDP wrap, eager latency),
``optim`` (AdamW + warm-up/cosine schedule), ``epoch`` (train and validation passes),
``early_stopping``, ``checkpoints`` (epoch checkpoints and the final weights),
``faults`` (the test-only failure hook) and ``loop`` (:func:`train_model`). This
package re-exports every public name, so ``from plantml.training import ...`` keeps working.
"""

from plantml.resources import available_cores, resolve_threads
from plantml.training.checkpoints import (
    CHECKPOINT_FILE, load_checkpoint, load_epoch_checkpoint, save_checkpoint, save_epoch_checkpoint,
)
from plantml.training.epoch import train_one_epoch, validate
from plantml.training.faults import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, InjectedFailure
from plantml.training.loop import train_model
from plantml.training.model import build_model, measure_latency_ms
from plantml.training.process import resolve_device, seed_everything
from plantml.training.records import (
    DistributedContext, EpochCallback, LoaderSettings, TrainResult, TrainState,
)

__all__ = [
    "CHECKPOINT_FILE", "FAIL_AT_EPOCH_ENV", "FAIL_MARKER_ENV", "DistributedContext", "EpochCallback",
    "InjectedFailure", "LoaderSettings", "TrainResult", "TrainState", "available_cores", "build_model",
    "load_checkpoint", "load_epoch_checkpoint", "measure_latency_ms", "resolve_device", "resolve_threads",
    "save_checkpoint", "save_epoch_checkpoint", "seed_everything", "train_model", "train_one_epoch", "validate",
]
