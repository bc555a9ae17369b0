"""Distributed training plumbing: who am I, which device, which images are mine.

One process trains on one device. Under ``torchrun --nproc_per_node=N`` there are N processes;
:func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), starts the
process group (NCCL on GPUs, gloo on the CPU) and pins each process to its GPU. Everything else
asks :func:`current` and works the same with one process or many.

The samplers split every *global* batch between the processes, so that step ``k`` sees the same
images whatever the number of processes: ``batch_size`` is the total over all of them.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = [
    "DistEnv",
    "setup",
    "current",
    "cleanup",
    "barrier",
    "gather_lists",
    "mean_across",
    "EpochBatchSampler",
    "SeededItems",
    "shard_indices",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` of ``world_size``, its ``device`` and the ``backend``
    (``None`` when there is a single process and no process group)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str | torch.device | None = None) -> DistEnv:
    """Start the process group when launched by ``torchrun`` with more than one process.

    Args:
        device: force ``"cpu"`` (gloo) even when CUDA is present; default: CUDA when available.

    Returns:
        The :class:`DistEnv` of this process (also what :func:`current` returns from now on).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    wants_cuda = (
        torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    )
    if world_size > 1 and not torch_dist.is_initialized():
        if wants_cuda:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                    "visible; use --nproc_per_node no larger than the GPU count"
                )
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return current(device)


def current(device: str | torch.device | None = None) -> DistEnv:
    """The :class:`DistEnv` of this process (a single process unless :func:`setup` ran)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        backend = str(torch_dist.get_backend())
        local_rank = _env_int("LOCAL_RANK", rank)
        on_cuda = backend == "nccl"
        dev = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
        return DistEnv(rank, world_size, local_rank, dev, backend)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DistEnv(0, 1, 0, torch.device(device), None)


def cleanup() -> None:
    """Leave the process group, if any."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def gather_lists(items: list) -> list:
    """Concatenate every process's list (picklable items), in rank order, on every process."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return list(items)
    parts: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def mean_across(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the processes (a copy with one process). A non-finite value on
    any process makes the result non-finite everywhere, so every process takes the same branch."""
    values = values.detach().clone()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(values)
        values /= torch_dist.get_world_size()
    return values


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{epoch}/{index}".encode())


class EpochBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of ``(epoch, index)`` pairs; each process gets its slice of every global
    batch.

    The order depends only on ``seed`` and the epoch (:meth:`set_epoch`), so a resumed run sees
    the same batches as an uninterrupted one, and ``skip`` starts an epoch part-way through.
    The last incomplete global batch is dropped.

    Args:
        size: the dataset's length.
        batch_size: images per step over all processes; must divide by ``world_size``.
        rank, world_size: this process and how many there are.
        seed: the shuffle seed.
    """

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:  # fmt: skip
        if batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} does not split evenly over {world_size} processes; "
                "the batch size is the total over all processes"
            )
        if size < batch_size:
            raise ValueError(f"{size} images cannot fill one batch of {batch_size}")
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use ``epoch``'s order, starting after its first ``skip`` batches."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.batch_size - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = self.batch_size // self.world_size
        for b in range(self.skip, self.size // self.batch_size):
            start = b * self.batch_size + self.rank * per_rank
            yield [(self.epoch, i) for i in order[start : start + per_rank]]


class SeededItems(torch.utils.data.Dataset):
    """Wrap a dataset so that item ``(epoch, index)`` draws its random augmentation from a seed
    of its own: the same image gets the same flip in a resumed run, with any number of
    data-loading workers."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, epoch, index))
            return self.dataset[index]


def shard_indices(size: int, env: DistEnv) -> list[int]:
    """This process's share of ``range(size)`` for evaluation (every item exactly once)."""
    return list(range(env.rank, size, env.world_size))
