"""The process-group side of ring attention: the group and the sequence's layout over its ranks,
the cross-rank check that every rank's call agrees, and the ring's point-to-point transfers.

``attnkernels.distributed`` builds the public functions and the ring's forward and backward on it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
import torch.distributed as dist

# dtypes as small ints for the cross-rank check (attention takes the first four; shards of any)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.complex64, torch.complex128)

# Batch dimensions compared one by one across ranks; more are compared through their product.
MAX_LISTED_DIMS = 8


# ----------------------------------------------------------------------------- the group and the layout


def group_of(op: str, group) -> tuple[object, int, int]:
    """(group, this process's rank in it, its size); raises when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"attnkernels.{op}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets up the environment for it)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"attnkernels.{op}: this process (global rank {dist.get_rank()}) is not a member of "
                           "`group`; call it only on the group's ranks")
    return group, rank, dist.get_world_size(group)


def owned_chunks(rank: int, world: int, load_balance: bool) -> tuple[int, tuple[int, ...]]:
    """(number of equal chunks the sequence is cut into, the chunks this rank holds, in order)."""
    if load_balance:
        return 2 * world, (rank, 2 * world - 1 - rank)
    return world, (rank,)


def exchange_device(group) -> torch.device:
    """Where small control tensors live: NCCL moves only CUDA tensors, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def listed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape as a fixed number of ints: its length, up to 8 sizes (padded with -1), the product of any more."""
    sizes = list(shape)
    listed = sizes[:MAX_LISTED_DIMS] + [-1] * (MAX_LISTED_DIMS - min(len(sizes), MAX_LISTED_DIMS))
    return (len(sizes), *listed, math.prod(sizes[MAX_LISTED_DIMS:]))


def shown(kind: str, values: tuple[int, ...]) -> str:
    if kind == "dtype":
        return str(DTYPES[values[0]]) if 0 <= values[0] < len(DTYPES) else "another dtype"
    if kind == "shape":
        ndim, sizes = values[0], values[1:1 + min(values[0], MAX_LISTED_DIMS)]
        return str(list(sizes) + (["..."] if ndim > MAX_LISTED_DIMS else []))
    if kind == "float":
        return repr(struct.unpack("<d", struct.pack("<q", values[0]))[0])
    if kind == "bool":
        return str(bool(values[0]))
    return str(values[0])


def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# Each field of a call's description: (what it is called in an error, how it is shown, how many ints).
RING_FIELDS = {
    "dtype": ("the dtype of query, key and value", "dtype", 1),
    "batch": ("the batch dimensions of query", "shape", MAX_LISTED_DIMS + 2),
    **{name: (title, "int", 1) for name, title in (
        ("query_heads", "the number of query heads"), ("key_heads", "the number of key/value heads"),
        ("query_length", "the query shard length (L/P)"), ("key_length", "the key/value shard length (S/P)"),
        ("head_dim", "the head dim E"), ("value_dim", "the value head dim Ev"))},
    **{name: (name, "bool", 1) for name in ("is_causal", "load_balance", "enable_gqa")},
    "scale": ("the scale", "float", 1),
    "mask": ("whether attn_mask is given", "bool", 1),
    "mask_is_bool": ("whether attn_mask is bool", "bool", 1),
}

UNSHARD_FIELDS = {
    "dtype": ("the dtype of the shard", "dtype", 1),
    "shape": ("the shape of the shard", "shape", MAX_LISTED_DIMS + 2),
}


def agree(op: str, group, rank: int, world: int, fields: dict, values: dict | None, error: Exception | None) -> None:
    """Checks, on every rank at once, that every rank's call is valid and that all calls agree.

    values: this rank's description of its call (None when its own checks failed, with ``error``).
    One all_gather of a small int64 tensor; afterwards every rank raises, or none does, so a bad
    input on one rank never leaves the others waiting for a transfer that never comes.
    """
    widths = [width for _, _, width in fields.values()]
    row = [0 if error is None else 1]
    for name, width in zip(fields, widths, strict=True):
        row += list(values[name]) if values is not None else [0] * width
    local = torch.tensor(row, dtype=torch.int64, device=exchange_device(group))
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).tolist()
    if error is not None:
        raise error
    failed = [r for r in range(world) if table[r][0]]
    if failed:
        raise RuntimeError(f"attnkernels.{op}: rank(s) {failed} of the group rejected their inputs (their own error "
                           "says why); every rank must pass valid inputs")
    start = 1
    for (title, kind, width) in fields.values():
        column = [tuple(table[r][start:start + width]) for r in range(world)]
        start += width
        if any(c != column[0] for c in column):
            seen = ", ".join(f"rank {r} has {shown(kind, c)}" for r, c in enumerate(column))
            raise RuntimeError(f"attnkernels.{op}: the ranks of the group disagree on {title}: {seen}. Every rank "
                               "must pass shards of the same shapes, dtype and options (shard_sequence splits a "
                               f"sequence evenly); this is rank {rank}")


# ----------------------------------------------------------------------------- point-to-point transfers


class Transfer:
    """Tensors on their way round the ring: ``wait()`` returns the ones received from the previous rank."""

    def __init__(self, requests, sent, received):
        self._requests, self._sent, self.received = requests, sent, received

    def wait(self) -> list[torch.Tensor]:
        for request in self._requests:
            request.wait()
        self._sent = None  # the send buffers may be freed only once the sends are done
        return self.received


class Ring:
    """The ring of a process group: who sends to whom, and which block of the sequence each rank owns."""

    def __init__(self, group, rank: int, world: int, load_balance: bool):
        self.group, self.rank, self.world, self.load_balance = group, rank, world, load_balance
        # P2POp takes global ranks
        self.next_peer = dist.get_global_rank(group, (rank + 1) % world) if world > 1 else None
        self.previous_peer = dist.get_global_rank(group, (rank - 1) % world) if world > 1 else None

    def shift(self, tensors: list[torch.Tensor]) -> Transfer:
        """Starts sending ``tensors`` to the next rank and receiving the previous rank's into new buffers."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.previous_peer, self.group) for t in received]
        return Transfer(dist.batch_isend_irecv(ops), sent, received)

    def block_plan(self, source: int, query_length: int, key_length: int,
                   is_causal: bool) -> tuple[slice, slice, bool] | None:
        """Which of this rank's query rows attend to which keys of ``source``'s block, and whether causally.

        Returns (rows, columns, causal) along the sequence dims, or None when the causal mask hides
        the whole block. Blocks below the diagonal are attended to in full, the diagonal block
        causally (top-left, valid because each rank's chunks keep their global order).
        """
        everything = slice(None)
        if not is_causal:
            return everything, everything, False
        if source == self.rank:
            return everything, everything, True
        if not self.load_balance:
            return (everything, everything, False) if source < self.rank else None
        # Zig-zag: this rank holds chunks r and 2P-1-r, the source chunks s and 2P-1-s.
        if source < self.rank:  # every query sees chunk s, no query sees chunk 2P-1-s
            return everything, slice(0, key_length // 2), False
        return slice(query_length // 2, None), everything, False  # only chunk 2P-1-r sees the block, all of it

    def mask_columns(self, attn_mask: torch.Tensor, source: int, key_length: int) -> torch.Tensor:
        """The columns of a (..., L/P, S) mask that belong to ``source``'s keys."""
        if attn_mask.shape[-1] == 1 or self.world == 1:
            return attn_mask
        _, chunks = owned_chunks(source, self.world, self.load_balance)
        chunk = key_length // len(chunks)
        parts = [attn_mask.narrow(-1, i * chunk, chunk) for i in chunks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
