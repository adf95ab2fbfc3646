"""Device selection and data-parallel training with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node=N -m edgekd distill recipe.yaml`` starts N processes with ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK`` in their environment; :func:`setup` then joins the process group (gloo on CPU, NCCL on CUDA).
Multi-node runs use torchrun's usual ``--nnodes``/``--rdzv-endpoint`` flags; nothing here changes.

How a distributed run stays equivalent to a one-process run of the same recipe:

* ``data.batch_size`` stays the GLOBAL batch: each of N ranks takes ``batch_size / N`` samples per step, and
  DDP averages the gradients, so a step sees the same samples and (up to float summation order) the same
  gradient as one process would.
* Every rank draws the same permutation of the train split as the one-process loader (``torch.randperm`` with
  the epoch's generator), padded to a multiple of N, and rank ``r`` takes positions ``r, r+N, ...``: global batch
  ``k`` is then exactly the one-process batch ``k`` (only the last, partial batch can differ by padding).
* Teacher logits are cached for the whole train split on every rank and looked up by sample index, so the
  cache is correct whatever shard a rank holds.
* Validation runs on the full val split on every rank with identical weights, so every rank picks the same
  best epoch without communication; the logged train loss is all-reduced.
* BatchNorm running statistics: DDP uses rank 0's buffers in every forward pass; at the end of each epoch they
  are broadcast from rank 0 again (:func:`sync_buffers`), so validation, the best epoch and the kept weights
  are the same on every rank.
* Only rank 0 writes the run directory (the stages give other ranks a throw-away scratch directory; the
  distill stage's launcher, :mod:`edgekd.distill.launch`, also shares rank 0's run with them on ``--resume``).
* The checkpoint holds model, optimizer, scheduler, grad-scaler and RNG state; the shuffling order of an epoch
  depends only on the seed and the epoch number, so the sampler needs no state of its own.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Sampler

from edgekd.errors import DataError, RecipeError

DEVICES = ("auto", "cpu", "cuda", "mps")
_DEVICE: torch.device = torch.device("cpu")


# -- process group --------------------------------------------------------------------------------------

def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise RecipeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number", "launch with torchrun") from e


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def resolve_device(name: str = "auto") -> torch.device:
    """The training device: ``auto`` picks CUDA, then Apple MPS, then CPU; others force one.

    Under torchrun each process uses CUDA device ``LOCAL_RANK``.

    Raises:
        RecipeError: The device is unknown or not available on this machine.
    """
    if name not in DEVICES:
        raise RecipeError(f"unknown device {name!r}", f"choose one of: {', '.join(DEVICES)}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError("--device cuda: no CUDA device is available", "use --device auto or cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name == "mps" and not has_mps:
        raise RecipeError("--device mps: Apple MPS is not available", "use --device auto or cpu")
    return torch.device(name)


def device() -> torch.device:
    """The device chosen by :func:`setup` (CPU unless set)."""
    return _DEVICE


def setup(device_name: str = "auto") -> dict[str, Any]:
    """Pick the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group.

    Returns:
        ``{"world_size", "rank", "backend", "device"}`` for the run's records.
    """
    global _DEVICE
    _DEVICE = resolve_device(device_name)
    n = env_world_size()
    backend = None
    if n > 1 and not is_distributed():
        if _DEVICE.type == "mps":
            raise RecipeError("torchrun with --device mps is not supported (no MPS process-group backend)",
                              "use --device cpu for several processes on one Mac")
        backend = "nccl" if _DEVICE.type == "cuda" else "gloo"
        if _DEVICE.type == "cuda":
            torch.cuda.set_device(_DEVICE)
        torch.distributed.init_process_group(backend=backend)
    elif is_distributed():
        backend = torch.distributed.get_backend()
    return {"world_size": world_size(), "rank": rank(), "backend": backend, "device": str(_DEVICE)}


def teardown() -> None:
    """Leave the process group (after a barrier, so rank 0 finishes writing before anyone exits)."""
    global _DEVICE
    if is_distributed():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
    _DEVICE = torch.device("cpu")


# -- training helpers (no-ops in a single process) -------------------------------------------------------

def local_batch_size(global_batch: int, n_train: int) -> int:
    """Samples per rank and step, so that the global batch stays ``data.batch_size``.

    Raises:
        DataError: The batch or the train split cannot be split evenly over the processes.
    """
    n = world_size()
    if n == 1:
        return global_batch
    if global_batch % n:
        raise DataError(f"batch size {global_batch} cannot be split over {n} processes",
                        f"use a batch size divisible by {n} or another --nproc_per_node")
    if n_train < n:
        raise DataError(f"the train split has {n_train} samples, fewer than the {n} processes",
                        "use fewer processes or more data")
    return global_batch // n


def steps_per_epoch(n_train: int, local_batch: int) -> int:
    """Optimizer steps per epoch on every rank (the same on all ranks, else DDP would hang)."""
    return math.ceil(math.ceil(n_train / world_size()) / local_batch)


class ShardSampler(Sampler[int]):
    """This rank's share of the one-process shuffle order (see the module docstring)."""

    def __init__(self, n: int, generator: torch.Generator, rank_: int, world: int):
        self.n, self.generator, self.rank, self.world = n, generator, rank_, world
        self.per_rank = math.ceil(n / world)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank runs the same number of steps
        return iter(order[self.rank:: self.world])

    def __len__(self) -> int:
        return self.per_rank


def train_loader(data, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"):
    """The shuffled train loader (normalized batches on ``device``): the plain one in one process, this rank's
    shard under torchrun."""
    if not is_distributed():
        return data.loader("train", batch_size, shuffle=True, generator=generator, device=device)
    sampler = ShardSampler(len(data.train), generator, rank(), world_size())
    # The generator is passed too: the loader draws its base seed from it first, exactly as the shuffling
    # one-process loader does, so the permutation below is the same draw on both.
    return data.loader("train", batch_size, generator=generator, sampler=sampler, device=device)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """Runs ``model`` under ``torch.autocast`` (bf16 or fp16) and returns float32 logits, so losses stay float32.

    Only the training forward pass is wrapped: evaluation, checkpoints and exports see the plain model.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, dtype=self.dtype):
            out = self.model(x)
        return out.float()


def wrap(model: nn.Module | None, amp: str = "off") -> nn.Module | None:
    """The module the training loop calls: ``model``, in bf16/fp16 autocast if asked, in DDP under a process group.

    DDP averages the gradients over ranks; the wrappers share ``model``'s parameters, so the optimizer,
    checkpoints and best-weights copies keep using ``model`` itself.
    """
    if model is None:
        return model
    if amp in AMP_DTYPES:
        model = Autocast(model, AMP_DTYPES[amp])
    elif amp != "off":
        raise RecipeError(f"amp {amp!r} is not supported", "use off, bf16 or fp16")
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [_DEVICE.index] if _DEVICE.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def grad_scaler(amp: str = "off"):
    """A ``torch.amp.GradScaler`` for fp16 training (None otherwise).

    fp16 gradients underflow to zero without loss scaling; bf16 has float32's exponent range and needs none.
    PyTorch's scaler works on CUDA and, since torch 2.3, on CPU (CPU autocast supports float16 too).

    Raises:
        RecipeError: This device has no fp16 grad scaler.
    """
    if amp != "fp16":
        return None
    try:
        return torch.amp.GradScaler(_DEVICE.type)
    except (RuntimeError, ValueError, AssertionError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise RecipeError(f"amp fp16 is not supported on {_DEVICE.type} ({first})", "use amp bf16 or off") from e


def sync_buffers(module: nn.Module | None) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which each rank updates on its shard)."""
    if module is None or not is_distributed():
        return
    for b in module.buffers():
        torch.distributed.broadcast(b.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def sync_pruned(model: nn.Module) -> None:
    """After a pruning step: check every rank removed as many channels per layer, then take rank 0's weights.

    Every rank computes the pruning step itself from identical weights (deterministic: the importance is a
    function of the weights, and Taylor gradients come from the same unshuffled batches), so the channels
    agree; broadcasting rank 0's parameters and buffers afterwards makes that exact even if float kernels
    differed between hosts, and the width check turns any real disagreement into an error instead of a hang.

    Raises:
        TrainingError: The ranks pruned to different layer widths.
    """
    if not is_distributed():
        return
    from edgekd.errors import TrainingError

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    everyone: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(everyone, shapes)
    if any(other != everyone[0] for other in everyone):
        bad = next(r for r, other in enumerate(everyone) if other != everyone[0])
        raise TrainingError(f"pruning chose different layer widths on rank 0 and rank {bad}",
                            "run the prune stage with a single process")
    for t in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(t.data, src=0)


def sync_grads(module: nn.Module | None) -> None:
    """Average gradients of parameters outside DDP (a loss's learned projections) over the ranks."""
    if module is None or not is_distributed():
        return
    n = world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= n


def global_mean(total: float, count: int) -> float:
    """``sum(total) / sum(count)`` over the ranks (the train loss of the whole epoch)."""
    if not is_distributed():
        return total / max(count, 1)
    t = torch.tensor([float(total), float(count)], dtype=torch.float64,
                     device=_DEVICE if _DEVICE.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return float(t[0] / max(t[1], 1.0))
