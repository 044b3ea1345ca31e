"""The checks that tests/test_distributed.py runs inside spawned process groups.

A separate module (not the test file) so that the spawned processes can import the
functions by name. Every rank builds the same full tensors from one seed, takes its shards,
runs ring attention, gathers the results and compares them with torch's
scaled_dot_product_attention on the full tensors, so every rank checks everything.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from attnkernels.distributed import ring_attention, shard_sequence, unshard_sequence

# A hung collective fails after this long instead of waiting for ever.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, check_name: str, failures: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's connections on 127.0.0.1
    torch.set_num_threads(1)  # a few processes share a couple of cores
    # A rank that dies in C++ (an abort, a signal) leaves no Python traceback: keep its stderr for the report.
    stderr_file = open(os.path.join(failures, f"rank{rank}.stderr"), "w")
    os.dup2(stderr_file.fileno(), 2)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        globals()[check_name](rank, world, device)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(failures, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # End without interpreter finalisation: gloo's worker threads outlive destroy_process_group, and one
    # that frees a finished collective's buffers while the interpreter finalises aborts the process
    # ("terminate called without an active exception") after a good run (examples/torchrun_exit.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _report(failures: str) -> str:
    """Every rank's traceback, and the stderr of every rank that wrote any (the only trace of a C++ abort)."""
    parts = []
    for name in sorted(os.listdir(failures)):
        with open(os.path.join(failures, name)) as f:
            text = f.read().strip()
        if text:
            parts.append(f"--- {name}\n{text[-4000:]}")
    return "\n".join(parts) or "(no rank wrote a traceback or anything on stderr)"


def run_group(world: int, check_name: str, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Runs ``check_name(rank, world, device)`` on ``world`` spawned processes; raises with every
    failing rank's traceback and stderr, or when the group does not finish within ``timeout_s``."""
    with tempfile.TemporaryDirectory() as failures:
        context = mp.start_processes(_entry, args=(world, free_port(), backend, check_name, failures), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        finished = False
        try:
            while not finished:
                left = (deadline - datetime.datetime.now()).total_seconds()
                if left <= 0:
                    raise TimeoutError(f"the {world}-process group running {check_name} did not finish within "
                                       f"{timeout_s} s")
                finished = context.join(timeout=min(left, 1.0))
        except Exception as e:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise AssertionError(f"{check_name} failed:\n{_report(failures)}") from e


# ----------------------------------------------------------------------------- helpers


def _full_inputs(seed: int, batch=2, q_heads=4, kv_heads=4, length=24, head_dim=8, value_dim=6,
                 dtype=None, device="cpu"):
    """query, key, value and an output gradient, the same on every rank: float64 on CPU; float32 on
    GPUs, where float64 attention kernels are not a given (Triton's fp64 dot fails to compile on sm_90)."""
    if dtype is None:
        dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    return (draw(batch, q_heads, length, head_dim), draw(batch, kv_heads, length, head_dim),
            draw(batch, kv_heads, length, value_dim), draw(batch, q_heads, length, value_dim))


def _compare(query, key, value, grad_out, *, attn_mask=None, is_causal=False, enable_gqa=False, group=None,
             load_balance=True, backend=None, tolerance=None):
    """Ring attention on this rank's shards against torch's SDPA on the full tensors: output and gradients."""
    def shard(t, dim=-2):
        return shard_sequence(t, dim, group=group, load_balance=load_balance)

    def unshard(t):
        return unshard_sequence(t, -2, group=group, load_balance=load_balance)

    q, k, v = (shard(t).detach().requires_grad_(True) for t in (query, key, value))
    # a mask's rows are sharded like the queries; a mask that broadcasts over them (N, 1, 1, S) is not
    mask = attn_mask if attn_mask is None or attn_mask.shape[-2] == 1 else shard(attn_mask)
    out = ring_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa, group=group,
                         load_balance=load_balance, backend=backend)
    out.backward(shard(grad_out))

    full = [t.detach().requires_grad_(True) for t in (query, key, value)]
    expected = F.scaled_dot_product_attention(*full, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)
    expected.backward(grad_out)
    if tolerance is None and query.dtype == torch.float32:
        tolerance = 1e-4  # float32 on a GPU: the ring and SDPA sum in different orders
    tol = {} if tolerance is None else {"atol": tolerance, "rtol": tolerance}
    what = f"causal={is_causal} load_balance={load_balance} gqa={enable_gqa} mask={attn_mask is not None}"
    torch.testing.assert_close(unshard(out.detach()), expected.detach(), **tol, msg=lambda m: f"output, {what}: {m}")
    for name, mine, theirs in zip("qkv", (q, k, v), full, strict=True):
        torch.testing.assert_close(unshard(mine.grad), theirs.grad, **tol,
                                   msg=lambda m, name=name: f"grad of {name}, {what}: {m}")


def _padding_mask(batch: int, length: int, device) -> torch.Tensor:
    """A bool (batch, 1, L, S) mask: key padding (batch 1 sees only its first 5 keys) and, in batch 0,
    a random pattern and one query row that sees nothing (SDPA gives 0 there)."""
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(batch, 1, length, length, generator=generator) > 0.3
    mask[1] = False
    mask[1, ..., :5] = True
    mask[0, 0, 3] = False
    return mask.to(device)


# ----------------------------------------------------------------------------- the checks


def check_matches_sdpa(rank: int, world: int, device, everything: bool = True) -> None:
    """Non-causal, causal with and without load balance, GQA, a bool mask; with ``everything``, also
    the remaining layouts and the reference backend's block gradients."""
    length = 12 * world  # 2P chunks of 6 (load_balance) or P chunks of 12
    query, key, value, grad_out = _full_inputs(1, length=length, device=device)
    mask = _padding_mask(2, length, device)
    _compare(query, key, value, grad_out)
    _compare(query, key, value, grad_out, is_causal=True)
    _compare(query, key, value, grad_out, is_causal=True, load_balance=False)
    _compare(query, key, value, grad_out, attn_mask=mask)
    q_gqa, k_gqa, v_gqa, grad_gqa = _full_inputs(2, q_heads=4, kv_heads=2, length=length, device=device)
    _compare(q_gqa, k_gqa, v_gqa, grad_gqa, is_causal=True, enable_gqa=True)
    if everything:
        _compare(query, key, value, grad_out, load_balance=False)
        _compare(query, key, value, grad_out, attn_mask=mask, load_balance=False)
        key_padding = torch.arange(length, device=device) < torch.tensor([[length - 5], [7]], device=device)
        _compare(query, key, value, grad_out, attn_mask=key_padding[:, None, None, :])  # (N, 1, 1, S)
        _compare(q_gqa, k_gqa, v_gqa, grad_gqa, enable_gqa=True, load_balance=False)
        # The reference backend's block gradients are a second implementation: check them too.
        _compare(q_gqa, k_gqa, v_gqa, grad_gqa, is_causal=True, enable_gqa=True, backend="reference")
        _compare(query, key, value, grad_out, attn_mask=mask, backend="reference")


def check_subgroups(rank: int, world: int, device) -> None:
    """A ring over a subgroup (global ranks that differ from group ranks) at P = 4, else groups of one process."""
    length = 24
    query, key, value, grad_out = _full_inputs(3, length=length, device=device)
    if world == 4:
        odd = dist.new_group([1, 3])
        if rank in (1, 3):
            _compare(query, key, value, grad_out, is_causal=True, group=odd)
        return
    singles = [dist.new_group([r]) for r in range(world)]
    # A group of one is plain attention, for any length (no chunking needed).
    first = [t[..., :7, :] for t in (query, key, value, grad_out)]
    _compare(*first, is_causal=True, group=singles[rank])
    _compare(*first, attn_mask=_padding_mask(2, 7, device), group=singles[rank])


def _expect_error(fragment: str, call) -> None:
    try:
        call()
    except (RuntimeError, ValueError) as e:
        assert fragment in str(e), f"expected an error mentioning {fragment!r}, got: {e}"
        return
    raise AssertionError(f"expected an error mentioning {fragment!r}, got none")


def check_bad_inputs(rank: int, world: int, device) -> None:
    """Inputs that disagree across ranks raise on every rank; afterwards the group still works."""
    query, key, value, grad_out = _full_inputs(4, length=8 * world, device=device)
    q, k, v = (shard_sequence(t, -2) for t in (query, key, value))
    last = world - 1

    # Shards of unequal length: the last rank drops two rows (still even).
    short = (lambda t: t[..., :-2, :]) if rank == last else (lambda t: t)
    _expect_error("shard length", lambda: ring_attention(short(q), short(k), short(v)))
    # Mismatched dtypes.
    cast = (lambda t: t.half()) if rank == last else (lambda t: t)
    _expect_error("dtype", lambda: ring_attention(cast(q), cast(k), cast(v)))
    # Mismatched head counts.
    heads = (lambda t: t[:, :2]) if rank == last else (lambda t: t)
    _expect_error("number of query heads", lambda: ring_attention(heads(q), heads(k), heads(v)))
    # An input only one rank can see is wrong (key's head dim): that rank says why, the others name it.
    bad_key = k[..., :5] if rank == 0 else k
    _expect_error("head dim" if rank == 0 else "rank(s) [0]", lambda: ring_attention(q, bad_key, v))
    # Options that differ across ranks.
    _expect_error("is_causal", lambda: ring_attention(q, k, v, is_causal=rank == 0))
    # Odd shard lengths cannot hold two zig-zag chunks.
    _expect_error("even", lambda: ring_attention(q[..., :3, :], k[..., :3, :], v[..., :3, :]))
    # unshard_sequence checks shapes across ranks too.
    _expect_error("shape of the shard", lambda: unshard_sequence(short(q), -2))

    # After all of that the ring still gives the right answer.
    _compare(query, key, value, grad_out, is_causal=True)


def check_low_precision(rank: int, world: int, device) -> None:
    """bfloat16 and float16: the ring's error against float64 attention is at most about that of one
    process in the same dtype (the FlashAttention test rule: 2x for the output, 3x for gradients)."""
    from attnkernels import scaled_dot_product_attention

    for dtype in (torch.bfloat16, torch.float16):
        query, key, value, grad_out = _full_inputs(5, q_heads=4, kv_heads=2, length=16 * world, dtype=dtype,
                                                   device=device)
        exact = [t.detach().double().requires_grad_(True) for t in (query, key, value)]
        F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True).backward(grad_out.double(),
                                                                                           inputs=exact)
        expected_out = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True).detach()

        single = [t.detach().requires_grad_(True) for t in (query, key, value)]
        single_out = scaled_dot_product_attention(*single, is_causal=True, enable_gqa=True)
        single_out.backward(grad_out)

        shards = [shard_sequence(t, -2).detach().requires_grad_(True) for t in (query, key, value)]
        out = ring_attention(*shards, is_causal=True, enable_gqa=True)
        out.backward(shard_sequence(grad_out, -2))

        mine = [out.detach()] + [t.grad for t in shards]
        one = [single_out.detach()] + [t.grad for t in single]
        truth = [expected_out] + [t.grad for t in exact]
        for i, (name, factor) in enumerate((("output", 2), ("grad q", 3), ("grad k", 3), ("grad v", 3))):
            ring_error = (unshard_sequence(mine[i], -2).double() - truth[i]).abs().max().item()
            single_error = (one[i].double() - truth[i]).abs().max().item()
            assert ring_error <= factor * single_error + 1e-4, (
                f"{dtype} {name}: ring error {ring_error:.2e}, one-process error {single_error:.2e}")


def check_two_processes(rank: int, world: int, device) -> None:
    check_matches_sdpa(rank, world, device)
    check_low_precision(rank, world, device)
    check_subgroups(rank, world, device)
    check_bad_inputs(rank, world, device)


def check_four_processes(rank: int, world: int, device) -> None:
    check_matches_sdpa(rank, world, device, everything=False)
    check_subgroups(rank, world, device)


def check_one_process(rank: int, world: int, device) -> None:
    check_matches_sdpa(rank, world, device)
    check_subgroups(rank, world, device)


def check_raises_on_last_rank(rank: int, world: int, device) -> None:
    """For the runner's own test: a Python failure on one rank."""
    if rank == world - 1:
        raise ValueError("deliberate failure on the last rank")


def check_aborts_on_last_rank(rank: int, world: int, device) -> None:
    """For the runner's own test: a C++-style death (SIGABRT) on one rank, with a line on stderr."""
    if rank == world - 1:
        print("deliberate abort on the last rank", file=sys.stderr, flush=True)
        os.abort()
