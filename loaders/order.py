"""Sample order as a pure function of (seed, epoch, rank): what makes sharding and exact resume correct.

Nothing here keeps state. A loader that knows (epoch, batch index) can recompute the exact samples
it would have produced, which is all that resume needs.
"""

from __future__ import annotations

import math

import numpy as np


def train_batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches each rank gets per epoch (the short tail is dropped, as in timm's train loader)."""
    return (num_samples // world_size) // batch_size


def train_order(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """The sample indices rank `rank` trains on in `epoch`, in order, a whole number of batches long.

    One global permutation per (seed, epoch), dealt round-robin to ranks: every rank sees a disjoint
    slice, and all ranks run the same number of steps (no DDP hang on an uneven tail).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    perm = np.random.default_rng([seed, epoch, 0x0D3E]).permutation(num_samples)
    per_rank = num_samples // world_size
    mine = perm[: per_rank * world_size][rank::world_size]
    batches = per_rank // batch_size
    return mine[: batches * batch_size]


def balanced_train_order(
    labels: np.ndarray, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`train_order` for `data.balance="sampler"`: (samples, draw rows) rank `rank` trains on in `epoch`.

    The epoch's global sequence is len(labels) draws with replacement, each sample weighted
    1 / (samples of its class), so every class is drawn equally often on average; it is dealt
    round-robin to ranks and cut to whole batches as `train_order` deals its permutation (same length,
    same position arithmetic, so resume, also on another number of processes, works the same way).
    A rare class's images repeat within an epoch, so the augmentation draws are keyed by the position
    in the global sequence (the second array), not by sample: each repeat gets its own crop and flip.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    labels = np.asarray(labels, dtype=np.int64)
    weights = 1.0 / np.bincount(labels)[labels]
    drawn = np.random.default_rng([seed, epoch, 0xBA1]).choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())
    per_rank = len(labels) // world_size
    rows = np.arange(per_rank * world_size)[rank::world_size][: (per_rank // batch_size) * batch_size]
    return drawn[rows], rows


def eval_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def eval_order(num_samples: int, *, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Rank's share of the eval set, padded with -1 to a whole number of batches shared by all ranks.

    -1 marks padding: the metrics drop it, so every sample is counted exactly once across ranks.
    """
    mine = np.arange(rank, num_samples, world_size, dtype=np.int64)
    total = eval_batches(num_samples, world_size, batch_size) * batch_size
    return np.concatenate([mine, np.full(total - len(mine), -1, dtype=np.int64)])


def augment_uniforms(num_samples: int, *, seed: int, epoch: int, count: int, stream: int = 0) -> np.ndarray:
    """`count` uniforms in [0, 1) per sample for `epoch`: the randomness of crops, flips and other augmentations.

    Keyed by sample index, not by rank or position, so a sample gets the same crop in a given
    epoch whatever the number of processes and whether or not the run was resumed.
    `stream` picks an independent table. numpy fills a (samples, count) table row by row, so asking
    stream 0 for more columns would move every existing draw; an augmentation added later takes a
    stream of its own instead, and turning it on leaves the crops of existing seeds as they were.
    """
    key = [seed, epoch, 0xA06] if stream == 0 else [seed, epoch, 0xA06, stream]
    return np.random.default_rng(key).random((num_samples, count), dtype=np.float32)
