"""The randomness of a training run, kept in its resume checkpoints.

A run killed after a checkpoint and resumed from it should draw the crops, flips, batches, timesteps and
noise that the uninterrupted run drew after that point, so that both end with the same weights. The bundle
stages therefore store, beside network, optimizer and trainer, every random stream they use: torch's,
numpy's and Python's global generators (the diffusion stage draws t and eps from torch's), the random
state of each MONAI transform (crops, flips and rotations draw from their own numpy ``RandomState``) and the
order and position of the training sampler in its current pass over the slices.

``ResumableRandomSampler`` is that sampler: DataLoader's own sampler draws each pass's order when its
iterator is created, and a resumed run creates a new iterator mid-pass. The DataLoader must also get its own
``generator``: creating an iterator otherwise draws a seed from torch's global generator, one draw the
uninterrupted run never made. Exact continuation needs ``num_workers: 0`` (worker processes reseed the
transforms and prefetch batches) and one process; under torchrun each rank keeps its own global streams,
and ``DistributedSampler`` reshuffles by epoch.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from monai.transforms import Randomizable


class ResumableRandomSampler(torch.utils.data.Sampler):
    """A fresh random order over the dataset each pass, from its own generator; its place in the current
    pass is part of its state, so an iterator made after a resume continues that pass."""

    def __init__(self, data_source: Sized, seed: int = 0):
        self.size = len(data_source)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.order: list[int] = []
        self.position = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.position >= len(self.order):
            self.order = torch.randperm(self.size, generator=self.generator).tolist()
            self.position = 0
        while self.position < len(self.order):
            self.position += 1
            yield self.order[self.position - 1]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if len(state["order"]) not in (0, self.size):
            raise ValueError(f"the resume checkpoint's sampler covers {len(state['order'])} slices, the dataset "
                             f"has {self.size}: resume with the datalist the run was started with")
        self.generator.set_state(state["generator"])
        self.order, self.position = list(state["order"]), int(state["position"])


def _portable(numpy_state: tuple) -> tuple:
    """A numpy generator state with its key array as a tensor, so ``torch.load(weights_only=True)`` reads it."""
    name, keys, position, has_gauss, cached_gaussian = numpy_state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)


def _numpy(portable_state: tuple) -> tuple:
    name, keys, position, has_gauss, cached_gaussian = portable_state
    return name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian


def _random_parts(transforms: Iterable) -> list[Randomizable]:
    """The transforms' objects with their own ``R``: a dictionary transform such as ``RandSpatialCropd``
    draws its crop from an inner array transform's generator, not its own."""
    found: list[Randomizable] = []
    stack = list(reversed(list(transforms)))
    while stack:
        part = stack.pop()
        if isinstance(part, Randomizable) and not any(part is f for f in found):
            found.append(part)
            stack.extend(reversed([v for v in vars(part).values() if isinstance(v, Randomizable)]))
    return found


class TrainingRandomness:
    """Every random stream of a training run as one checkpointable object (``state_dict``/``load_state_dict``,
    as ignite's ``Checkpoint`` wants). Under torchrun every rank's streams are gathered, and each rank gets
    its own back on resume."""

    def __init__(self, transforms: Iterable, sampler=None):
        self.transforms = _random_parts(transforms)
        self.sampler = sampler if hasattr(sampler, "state_dict") else None

    def _local_state(self) -> dict:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _portable(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [_portable(t.R.get_state()) for t in self.transforms],
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
        }

    def state_dict(self) -> dict:
        state = self._local_state()
        if not (dist.is_available() and dist.is_initialized()):
            return {"ranks": [state]}
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, state)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank >= len(state["ranks"]):
            raise ValueError(f"the resume checkpoint holds the random state of {len(state['ranks'])} process(es); "
                             f"resume with the same number of processes it was written by")
        local = state["ranks"][rank]
        if len(local["transforms"]) != len(self.transforms):
            raise ValueError(f"the resume checkpoint holds {len(local['transforms'])} random transforms, this "
                             f"run has {len(self.transforms)}: resume with the configs the run was started with")
        torch.set_rng_state(local["torch"])
        if torch.cuda.is_available() and local["cuda"]:
            torch.cuda.set_rng_state_all(local["cuda"])
        np.random.set_state(_numpy(local["numpy"]))
        random.setstate(local["python"])
        for transform, transform_state in zip(self.transforms, local["transforms"]):
            transform.R.set_state(_numpy(transform_state))
        if self.sampler is not None and local["sampler"] is not None:
            self.sampler.load_state_dict(local["sampler"])
