"""attnkernels.distributed: ring attention across spawned process groups (gloo on CPU, NCCL on GPUs).

Each test spawns one process group and runs a batch of checks in it (tests/distributed_cases.py):
outputs and gradients equal to torch's scaled_dot_product_attention on the gathered tensors, in
float64, for every layout; bad inputs raise on every rank. A group that does not finish in time
is killed and the test fails, so nothing hangs.
"""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import cpu_backends
from distributed_cases import run_group

from attnkernels import attention_with_lse
from attnkernels.distributed import _block_gradients, _Ring, _RingAttention, _Transfer, ring_attention, shard_sequence


def test_two_processes_match_sdpa_and_reject_bad_inputs():
    # non-causal, causal with and without load balance, GQA, bool mask, reference-backend blocks,
    # groups of one process, and inputs that disagree across ranks
    run_group(2, "check_two_processes", timeout_s=150)


def test_four_processes_match_sdpa():
    # the main layouts at P = 4, and a ring over the subgroup of global ranks 1 and 3
    run_group(4, "check_four_processes", timeout_s=180)


@pytest.mark.parametrize("check, evidence", [("check_raises_on_last_rank", "deliberate failure on the last rank"),
                                             ("check_aborts_on_last_rank", "deliberate abort on the last rank")])
def test_a_failing_rank_fails_the_group_with_its_traceback_or_stderr(check, evidence):
    with pytest.raises(AssertionError, match=evidence):
        run_group(2, check, timeout_s=60)


def test_import_attnkernels_leaves_distributed_unloaded():
    code = "import sys, attnkernels; assert 'attnkernels.distributed' not in sys.modules; attnkernels.ring_attention"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group is already set up")
def test_without_a_process_group_the_error_says_how_to_set_one_up():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_sequence(q, -2)


@pytest.mark.cuda
def test_nccl_group_of_one_gpu():
    run_group(1, "check_one_process", backend="nccl", timeout_s=300)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_two_gpus():
    run_group(2, "check_two_processes", backend="nccl", timeout_s=300)


@pytest.mark.parametrize("backend", cpu_backends())
def test_block_gradients_from_the_global_lse_sum_to_the_full_gradients(backend):
    # The ring backward's core, without processes: each key block's gradients, computed from the
    # global output and log-sum-exp, add up to single-process attention's (GQA, a bool mask).
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 2, 10, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 2, 10, 6, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(2, 4, 10, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 1, 10, 10, generator=generator) > 0.4
    mask[0, 0, 2] = False  # a row that sees nothing
    out, lse = attention_with_lse(q, k, v, mask, enable_gqa=True, backend=backend)
    scale = 1 / 8**0.5
    grads = [_block_gradients(backend, grad_out, q, k[..., cols, :], v[..., cols, :], mask[..., cols], out, lse,
                              False, scale) for cols in (slice(0, 4), slice(4, 10))]
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    F.scaled_dot_product_attention(*full, attn_mask=mask, enable_gqa=True).backward(grad_out)
    torch.testing.assert_close(grads[0][0] + grads[1][0], full[0].grad)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], -2), full[1].grad)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], -2), full[2].grad)


def test_the_next_block_travels_while_this_one_is_computed(monkeypatch):
    # The schedule, recorded in one process with a stand-in ring of two ranks whose transfers hand
    # back what was sent: every transfer starts before the computation it should overlap, and is
    # waited for only after it.
    events = []

    class RecordedTransfer(_Transfer):
        def wait(self):
            events.append(f"wait {len(self.received)}")
            return super().wait()

    class RecordingRing(_Ring):
        def __init__(self):  # no process group needed: nothing really travels
            self.group, self.rank, self.world, self.load_balance = None, 0, 2, True

        def shift(self, tensors):
            events.append("send kv" if tensors[0].data_ptr() == key.data_ptr() else "send gradients")
            return RecordedTransfer([], tensors, tensors)

    def recorded(name, fn):
        def run(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return run

    import attnkernels.distributed as ring_module

    monkeypatch.setattr(ring_module, "attention_with_lse", recorded("attend", ring_module.attention_with_lse))
    monkeypatch.setattr(ring_module, "_block_gradients", recorded("gradients", ring_module._block_gradients))
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    key = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    out = _RingAttention.apply(q, key, key, None, False, 0.5, False, "reference", RecordingRing())
    assert events == ["send kv", "attend", "wait 2", "attend"]
    events.clear()
    out.sum().backward()
    assert events == ["send kv", "gradients", "send gradients", "wait 2", "gradients", "wait 2", "send gradients",
                      "wait 2"]


def test_ring_benchmark_report_and_argument_errors(capsys):
    from attnkernels.bench import ring as bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--nproc", "2", "--length", "6"])  # not divisible by 2 x 2
    assert exit_info.value.code == 2 and "divisible" in capsys.readouterr().err
    args = bench.argparse.Namespace(nproc=2, device="cpu", batch=1, heads=4, length=4096, head_dim=64,
                                    dtype="float32", causal=False, repeat=5)
    times = {"one process": 1.0, "ring": 0.6, "compute only": 0.5, "transfers only": 0.2}
    results = {f"{name} {kind}": t for name, t in times.items() for kind in ("forward", "forward+backward")}
    assert "hidden   50% of the transfer time" in bench.report(args, results)  # 0.5 + 0.2 - 0.6 = half of 0.2
    results["transfers only forward"] = 0.01
    assert "too small to measure" in bench.report(args, results)


def test_ring_benchmark_runs_two_processes(capsys):
    from attnkernels.bench import ring as bench

    assert bench.main(["--nproc", "2", "--length", "64", "--heads", "2", "--head-dim", "16", "--repeat", "1"]) == 0
    report = capsys.readouterr().out
    for line in ("one process", "ring", "compute only", "transfers only"):
        assert line in report
