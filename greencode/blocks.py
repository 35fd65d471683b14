"""Fine-tuning input: files packed into token blocks, held as one array, and the order ranks read them in.

The order is a pure function of the optimizer step (:class:`BlockSampler`), so a resumed run
sees exactly the blocks the killed one would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from greencode.data import SourceFile
from greencode.tokens import encode


def token_blocks(files: Iterable[SourceFile], tokenizer: Any, seq_len: int, *,
                 pack: bool = True) -> Iterator[list[int]]:
    """Fine-tuning input. ``pack``: files joined with EOS, cut into blocks of exactly ``seq_len``
    (the incomplete tail is dropped). Otherwise one block per file (its tokens + EOS,
    truncated to ``seq_len``; shorter blocks are padded by the caller)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    buffer: list[int] = []
    for src in files:
        ids = encode(tokenizer, src.text) + tail
        if not pack:
            yield ids[:seq_len]
            continue
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]

BLOCKS_PER_PASS = 4  # blocks per inference forward pass (statistics, agreement): bounds activation memory


@dataclass
class BlockSet:
    """Token blocks as one array, cheap to ship to workers. Rows shorter than seq_len are right-padded."""

    ids: np.ndarray  # Shape: [n, seq_len], int32
    lengths: np.ndarray  # Shape: [n], real tokens per row (all seq_len when packed)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.ids.shape[1]).any())

    def batch(self, rows: Sequence[int] | slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids [b, s], attention_mask [b, s] or None when every row is full)."""
        ids = torch.as_tensor(self.ids[rows], dtype=torch.long, device=device)
        lengths = torch.as_tensor(self.lengths[rows], device=device)
        if bool((lengths == ids.shape[1]).all()):
            return ids, None
        return ids, (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()

    def batches(self, size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every block once, ``size`` rows per batch (the last one may be shorter), in order."""
        for start in range(0, len(self), size):
            yield self.batch(slice(start, start + size), device)


def build_blocks(files: Sequence[SourceFile], tokenizer: Any, seq_len: int, *, pack: bool = True,
                 limit: int | None = None) -> BlockSet:
    """Tokenize ``files`` into at most ``limit`` blocks of ``seq_len`` (packed, or one padded row per file)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[list[int]] = []
    for block in token_blocks(files, tokenizer, seq_len, pack=pack):
        if len(block) >= 2:  # a next-token loss needs two tokens
            rows.append(block)
        if limit is not None and len(rows) >= limit:
            break
    ids = np.full((len(rows), seq_len), pad, dtype=np.int32)
    for i, block in enumerate(rows):
        ids[i, : len(block)] = block
    return BlockSet(ids, np.array([len(b) for b in rows], dtype=np.int32))


class BlockSampler:
    """Which packed blocks each rank trains on at optimizer step ``step`` — a pure function of the step.

    The global stream is one seeded permutation of all blocks per epoch; position
    ``((step * grad_accum + micro) * world_size + rank) * batch_size + j`` of that stream
    feeds row j of a rank's micro-batch. So ranks never share a block, no block is seen twice
    in an epoch, and a resumed run continues exactly where the killed one stopped.
    """

    def __init__(self, num_blocks: int, batch_size: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        per_step = batch_size * grad_accum * world_size
        if num_blocks < batch_size * world_size:
            raise ValueError(f"the corpus gives only {num_blocks} training blocks but one micro-batch over "
                             f"{world_size} worker(s) needs {batch_size * world_size}; use more files, a shorter "
                             "seq_len or a smaller batch_size")
        self.num_blocks, self.batch_size, self.grad_accum = num_blocks, batch_size, grad_accum
        self.world_size, self.rank, self.seed, self.blocks_per_step = world_size, rank, seed, per_step
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            kept = {e: v for e, v in self._permutations.items() if e == epoch - 1}  # a step may straddle epochs
            self._permutations = {**kept, epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)}
        return self._permutations[epoch]

    def epoch(self, step: int) -> float:
        return step * self.blocks_per_step / self.num_blocks

    def micro_batches(self, step: int) -> list[list[int]]:
        out = []
        for micro in range(self.grad_accum):
            start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
            out.append([int(self._permutation(p // self.num_blocks)[p % self.num_blocks])
                        for p in range(start, start + self.batch_size)])
        return out
