"""The benchmark command (python -m attnkernels.bench): outputs, wrong kernels, bad arguments.

Runs in seconds: tiny sizes and the --quick timing budget. Speed is never asserted here.
"""

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnkernels import _extension
from attnkernels.bench import cases, main

# --device cpu: on a GPU machine the default device is cuda, and these runs are about the command.
TINY = ["--quick", "--sizes", "6", "--no-progress", "--device", "cpu"]


def _records(directory):
    return json.loads((directory / "results.json").read_text())["records"]


def test_quick_run_writes_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    markdown = tmp_path / "RESULTS.md"
    assert main([*TINY, "--op", "grid_sample_2d,affine_grid_sample_3d", "--out", str(out),
                 "--results-md", str(markdown)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[2].split()[:5] == ["op", "pass", "shape", "dtype", "backend"]

    payload = json.loads((out / "results.json").read_text())
    assert payload["machine"]["torch"] == torch.__version__ and payload["machine"]["date"]
    assert payload["limits"]["copy_bytes_per_s"] > 0
    records = payload["records"]
    # torch and every CPU backend, on both ops, both passes.
    assert {(r["op"], r["direction"]) for r in records} == {
        (op, direction) for op in ("grid_sample_2d", "affine_grid_sample_3d") for direction in cases.DEFAULT_PASSES}
    assert {"torch", "reference"} <= {r["backend"] for r in records}
    for record in records:
        assert record["status"] == "ok", record
        assert record["time_s"] > 0 and record["speedup"] > 0 and record["rate"] > 0
        assert record["work_unit"] == "B" and record["fraction_of_limit"] > 0
    torch_rows = [r for r in records if r["backend"] == "torch"]
    assert all(r["speedup"] == pytest.approx(1.0) for r in torch_rows)

    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records) and rows[0]["op"] == records[0]["op"]

    for op in ("grid_sample_2d", "affine_grid_sample_3d"):
        png = out / f"speedup_{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = markdown.read_text()
    assert torch.__version__ in text and "| op |" in text and payload["machine"]["date"] in text
    # The CPU's generation, which a virtual machine's bare model name may not tell.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():
        assert ", family " in payload["machine"]["cpu"] and payload["machine"]["cpu"] in text


def test_byte_count_of_sampling():
    # forward: input read once + grid read + output written; fwd+bwd: 3 input + 3 grid + 2 output.
    case = cases.Case("grid_sample_2d", "fwd", 8, torch.float32, torch.device("cpu"))
    n, c = case.shape["N"], case.shape["C"]
    image, grid = n * c * 64 * 4, n * 64 * 2 * 4
    assert case.work == 2 * image + grid
    assert cases.Case("grid_sample_2d", "fwd+bwd", 8, torch.float32, torch.device("cpu")).work == 5 * image + 3 * grid
    fused = cases.Case("affine_grid_sample_2d", "fwd", 8, torch.float32, torch.device("cpu"))
    assert fused.work == 2 * image + n * 6 * 4


def test_attention_flop_count():
    spec = cases.OPS["attention"]
    shape = {"B": 2, "H": 3, "L": 5, "S": 7, "E": 11}
    assert spec.work(shape, torch.float32, False) == 4 * 2 * 3 * 5 * 7 * 11
    assert spec.work(shape, torch.float32, True) == 3.5 * 4 * 2 * 3 * 5 * 7 * 11
    assert cases.OPS["attention_causal"].work(shape, torch.float32, False) == 2 * 2 * 3 * 5 * 7 * 11


def test_attention_pooling_byte_count():
    """One query per head: counted in the bytes it must move (q, k, v read and the output written; the backward
    reads them and dO again and writes dq, dk, dv)."""
    spec = cases.OPS["attention_pooling"]
    shape = spec.shape(256, "cpu")
    assert shape["L"] == 1 and shape["B"] * shape["S"] == 16384 and spec.work_unit == "B"
    heads, E, S = shape["B"] * shape["H"], shape["E"], shape["S"]
    query, keys_and_values = heads * E * 2, 2 * heads * S * E * 2  # bfloat16: 2 bytes an element
    assert spec.work(shape, torch.bfloat16, False) == 2 * query + keys_and_values
    assert spec.work(shape, torch.bfloat16, True) == 6 * query + 3 * keys_and_values


@pytest.mark.parametrize("direction", cases.PASSES)
def test_wrong_kernel_is_reported_and_not_timed(tmp_path, capsys, monkeypatch, direction):
    calls = []

    def off_by_a_little(inputs, backend):
        calls.append(backend)
        right = cases.OPS["grid_sample_2d"].torch_impl(inputs)
        return right * 1.01  # 1% off: far outside the tolerance, close enough to look plausible

    monkeypatch.setitem(cases.OPS, "grid_sample_2d", cases.with_implementation("grid_sample_2d", off_by_a_little))
    out = tmp_path / "out"
    code = main([*TINY, "--op", "grid_sample_2d", "--backend", "cpu", "--pass", direction, "--out", str(out)])
    assert code == 1
    printed = capsys.readouterr()
    assert "WRONG" in printed.out and "failed" in printed.err
    records = {r["backend"]: r for r in _records(out)}
    assert records["torch"]["status"] == "ok" and records["torch"]["time_s"] > 0
    wrong = records["cpu"]
    assert wrong["status"] == "WRONG" and wrong["detail"].startswith("output")
    assert wrong["time_s"] is None and wrong["speedup"] is None and wrong["rate"] is None
    assert wrong["max_error"] > wrong["allowed_error"]
    assert calls == ["cpu"]  # called once, for the check; never timed
    assert (out / "speedup_grid_sample_2d.png").exists()  # a plot even with nothing correct to draw


def test_nan_result_is_wrong(monkeypatch):
    def nan_kernel(inputs, backend):
        return torch.full_like(cases.OPS["grid_sample_2d"].torch_impl(inputs), float("nan"))

    monkeypatch.setitem(cases.OPS, "grid_sample_2d", cases.with_implementation("grid_sample_2d", nan_kernel))
    prepared = cases.PreparedCase(cases.Case("grid_sample_2d", "fwd", 6, torch.float32, torch.device("cpu")))
    assert not prepared.check("cpu").ok


def test_wrong_gradient_is_reported(monkeypatch):
    class WrongGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    def kernel(inputs, backend):
        return WrongGradient.apply(cases.OPS["grid_sample_2d"].torch_impl(inputs))

    monkeypatch.setitem(cases.OPS, "grid_sample_2d", cases.with_implementation("grid_sample_2d", kernel))
    prepared = cases.PreparedCase(cases.Case("grid_sample_2d", "fwd+bwd", 6, torch.float32, torch.device("cpu")))
    check = prepared.check("cpu")
    assert not check.ok and check.detail.startswith("grad_input")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_cpu_backend_passes_the_check(dtype):
    # The check must not flag correct kernels: its tolerance is the FlashAttention rule.
    for op in ("grid_sample_3d", "affine_grid_sample_2d"):
        for direction in cases.PASSES:
            prepared = cases.PreparedCase(cases.Case(op, direction, 5, dtype, torch.device("cpu")))
            for backend in ("cpu", "reference"):
                check = prepared.check(backend)
                assert check.ok, (op, direction, backend, check.detail)


def test_unsupported_backend_is_reported_not_failed(monkeypatch, tmp_path):
    def refuses(inputs, backend):
        raise RuntimeError("attnkernels.grid_sample: the 'cpu' backend cannot serve these inputs: test")

    monkeypatch.setitem(cases.OPS, "grid_sample_2d", cases.with_implementation("grid_sample_2d", refuses))
    assert main([*TINY, "--op", "grid_sample_2d", "--backend", "cpu", "--pass", "fwd", "--out", str(tmp_path)]) == 0
    record = {r["backend"]: r for r in _records(tmp_path)}["cpu"]
    assert record["status"] == "unsupported" and "cannot serve" in record["detail"]


@pytest.mark.parametrize("arguments, message", [
    (["--op", "no_such_op"], "unknown op 'no_such_op'"),
    (["--backend", "cuda"], "backend 'cuda' is not available"),
    (["--backend", "nonsense"], "backend 'nonsense' is not available"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--sizes", "0"], "--sizes must be"),
    (["--sizes", "eight"], "--sizes must be"),
    (["--pass", "backward"], "unknown pass 'backward'"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", *arguments])  # on a GPU machine `--backend cuda` is valid on cuda
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without a GPU")
def test_cuda_device_without_gpu_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_dtype_the_gpu_lacks_exits_2(monkeypatch, capsys):
    # A GPU without bfloat16 (before Ampere), simulated: the check happens before any CUDA work.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "an old GPU")
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--backend", "reference", "--dtype", "bfloat16"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'bfloat16' is not supported by an old GPU" in lines[0]


def test_attention_cases_run_with_flop_and_byte_rates(monkeypatch, tmp_path):
    # Whatever attnkernels' attention is, the command times it against torch's SDPA: in FLOP/s, and in bytes/s for
    # attention pooling (one query per head).
    import attnkernels

    if not hasattr(attnkernels, "scaled_dot_product_attention"):
        def stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, *, backend=None):
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
        monkeypatch.setattr(attnkernels, "scaled_dot_product_attention", stand_in, raising=False)
    assert main([*TINY, "--op", "attention", "--backend", "reference", "--out", str(tmp_path)]) == 0
    records = _records(tmp_path)
    assert {r["op"] for r in records} == {"attention", "attention_causal", "attention_pooling"}
    for record in records:
        unit = "B" if record["op"] == "attention_pooling" else "FLOP"
        assert record["status"] == "ok" and record["work_unit"] == unit and record["rate"] > 0, record
        assert record["fraction_of_limit"] > 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["limits"]["matmul_flop_per_s"]["float32"] > 0
    assert (tmp_path / "speedup_attention_causal.png").exists()


def test_module_entry_point_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "attnkernels.bench", "--op", "no_such_op"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "unknown op" in result.stderr


def test_missing_public_function_is_skipped_or_refused(monkeypatch, capsys):
    import attnkernels

    monkeypatch.delattr(attnkernels, "affine_grid_sample")
    assert "affine_grid_sample_2d" not in cases.available_ops()
    with pytest.raises(SystemExit) as exit_info:
        main(["--op", "affine_grid_sample_2d"])
    assert exit_info.value.code == 2 and "needs attnkernels.affine_grid_sample" in capsys.readouterr().err


def test_reference_out_of_memory_falls_back_to_the_first_batch_element(monkeypatch):
    # On a GPU the float64 reference of a large case may not fit: the first batch element is
    # compared with it, and the whole result with torch's, so a wrong last element is still caught.
    full_wider_call = cases.PreparedCase._wider_call

    def wider_call(self, batch=None):
        if batch is None:
            raise torch.OutOfMemoryError("simulated: the wider reference does not fit")
        return full_wider_call(self, batch)

    monkeypatch.setattr(cases.PreparedCase, "_wider_call", wider_call)
    prepared = cases.PreparedCase(cases.Case("grid_sample_2d", "fwd+bwd", 6, torch.float32, torch.device("cpu")))
    assert prepared.check("cpu").ok
    assert prepared.expected().first_batch_only

    def wrong_in_last_element(inputs, backend):
        output = cases.OPS["grid_sample_2d"].torch_impl(inputs)
        return output + torch.cat([torch.zeros_like(output[:-1]), torch.full_like(output[-1:], 0.01)])

    monkeypatch.setitem(cases.OPS, "grid_sample_2d",
                        cases.with_implementation("grid_sample_2d", wrong_in_last_element))
    check = prepared.check("cpu")
    assert not check.ok and "difference from torch" in check.detail


def test_kernel_crashing_while_timed_is_reported_alone(monkeypatch, tmp_path):
    calls = []

    def fails_after_the_check(inputs, backend):
        calls.append(backend)
        if len(calls) > 1:
            raise RuntimeError("simulated crash in a timed call")
        return cases.OPS["grid_sample_2d"].torch_impl(inputs)

    monkeypatch.setitem(cases.OPS, "grid_sample_2d",
                        cases.with_implementation("grid_sample_2d", fails_after_the_check))
    code = main([*TINY, "--op", "grid_sample_2d", "--backend", "cpu", "--pass", "fwd", "--out", str(tmp_path)])
    assert code == 1
    records = {r["backend"]: r for r in _records(tmp_path)}
    assert records["cpu"]["status"] == "error" and "simulated crash" in records["cpu"]["detail"]
    assert records["torch"]["status"] == "ok" and records["torch"]["time_s"] > 0


def test_attention_limit_of_16_bit_cases_is_the_faster_of_their_matmul_and_float32s():
    from types import SimpleNamespace

    from attnkernels.bench.runner import MachineLimits

    limits = MachineLimits(copy_bytes_per_s=4e10, matmul_flop_per_s={"float16": 3e9, "bfloat16": 4e11, "float32": 2e11})

    def case(dtype, unit="FLOP"):
        return SimpleNamespace(spec=SimpleNamespace(work_unit=unit), dtype=dtype,
                               dtype_name=str(dtype).removeprefix("torch."))

    assert limits.for_case(case(torch.float16)) == 2e11  # no float16 matrix unit: float32's rate
    assert limits.for_case(case(torch.bfloat16)) == 4e11
    assert limits.for_case(case(torch.float32)) == 2e11
    assert limits.for_case(case(torch.float16, "B")) == 4e10


def test_limits_probed_twice_keep_the_better_probe_and_rescale_the_fractions():
    """A neighbour busy through the first probe (float32 matmul at half speed here) must not leave every attention
    row at twice its real fraction of the limit: the second probe's better rate replaces it."""
    from attnkernels.bench.runner import MachineLimits, Record, apply_limits

    first = MachineLimits(copy_bytes_per_s=4e10, matmul_flop_per_s={"bfloat16": 8e11, "float32": 1e11})
    second = MachineLimits(copy_bytes_per_s=3e10, matmul_flop_per_s={"bfloat16": 7e11, "float32": 2e11})
    best = first.best_of(second)
    assert best.copy_bytes_per_s == 4e10 and best.matmul_flop_per_s == {"bfloat16": 8e11, "float32": 2e11}

    def record(dtype, unit, rate):
        return Record("op", "fwd", 1, "shape", dtype, "cpu", "cpu", status="ok", detail="", work_unit=unit, rate=rate)

    records = [record("float32", "FLOP", 1.5e11), record("bfloat16", "FLOP", 4e11), record("float32", "B", 2e10),
               record("float32", "FLOP", None)]
    apply_limits(records, best)
    assert [r.fraction_of_limit for r in records] == [0.75, 0.5, 0.5, None]
    assert [r.limit for r in records] == [2e11, 8e11, 4e10, None]


def test_the_fraction_of_the_limit_compares_fastest_calls():
    """The limit is its probe's fastest call, so a case's fraction of it is its fastest call's rate, not
    its median's (which a busy neighbour slows while the probe's best stands); the median where the
    fastest is not known."""
    from attnkernels.bench.runner import MachineLimits, Record, _store, apply_limits
    from attnkernels.bench.timing import Timing

    limits = MachineLimits(copy_bytes_per_s=4e10, matmul_flop_per_s={"float32": 2e11})
    timed = Record("op", "fwd", 1, "shape", "float32", "cpu", "cpu", status="", detail="", work=1e9,
                   work_unit="FLOP")
    _store(timed, Timing(0.01, 20, "time.perf_counter", fastest=0.008))
    timed.rate = timed.work / timed.time_s
    unknown = Record("op", "fwd", 1, "shape", "float32", "cpu", "cpu", status="ok", detail="", work=1e9,
                     work_unit="FLOP", time_s=0.01, rate=1e11)
    apply_limits([timed, unknown], limits)
    assert timed.fastest_s == 0.008 and timed.rate == 1e11
    assert timed.fraction_of_limit == pytest.approx(1e9 / 0.008 / 2e11)  # 62.5%, not the median's 50%
    assert unknown.fraction_of_limit == pytest.approx(0.5)


def test_timings_keep_the_fastest_call():
    from attnkernels.bench import timing

    calls = iter([0.0, 0.003, 0.001, 0.002, 0.004, 0.002] + [0.002] * 1000)

    def fn():
        time.sleep(next(calls))

    result = timing.time_callable(fn, torch.device("cpu"), timing.QUICK)
    assert result.fastest is not None and result.fastest <= result.seconds
    interleaved = timing.time_interleaved({"a": lambda: time.sleep(0.001)}, timing.QUICK)
    assert 0.001 <= interleaved["a"].fastest <= interleaved["a"].seconds


@pytest.mark.skipif(not _extension.has_extension(), reason="the compiled extension is not built")
def test_torch_is_not_run_where_it_is_known_to_crash_and_ours_is_checked_against_the_wider_reference():
    from attnkernels.bench.cases import Case, PreparedCase, Unsupported
    from attnkernels.bench.runner import Record, _check

    case = Case("grid_sample_2d", "fwd+bwd", 256, torch.bfloat16, torch.device("cpu"))
    prepared = PreparedCase(case, copies=1)
    assert "reads outside" in prepared.expected().torch_fails
    assert prepared.check("cpu").ok
    record = Record(case.op, case.direction, case.size, case.label, case.dtype_name, "cpu", "torch", status="error",
                    detail="", work=case.work, work_unit=case.spec.work_unit)
    with pytest.raises(Unsupported, match="torch not run"):
        _check(prepared, record)
    # below the size where torch fails, torch runs as the baseline
    small = PreparedCase(Case("grid_sample_2d", "fwd", 128, torch.bfloat16, torch.device("cpu")), copies=1)
    assert small.expected().torch_fails is None


def test_backward_pass_times_the_backward_alone(monkeypatch):
    case = cases.Case("grid_sample_2d", "bwd", 6, torch.float64, torch.device("cpu"))
    both = cases.Case("grid_sample_2d", "fwd+bwd", 6, torch.float64, torch.device("cpu"))
    forward = cases.Case("grid_sample_2d", "fwd", 6, torch.float64, torch.device("cpu"))
    assert case.backward and case.work == both.work - forward.work
    prepared = cases.PreparedCase(case, copies=2)
    assert prepared.check("reference").ok
    run = prepared.timed_callable("reference")  # runs each copy's forward once, here
    import attnkernels

    forwards = []
    original = attnkernels.grid_sample
    monkeypatch.setattr(attnkernels, "grid_sample", lambda *a, **k: forwards.append(1) or original(*a, **k))
    first, second, third = run(), run(), run()
    assert not forwards  # the timed calls run no forward
    assert len(first) == 2 and first[0].shape == prepared.inputs[0]["input"].shape
    torch.testing.assert_close(third[0], first[0])  # copies rotate: the third call is the first copy again
    assert not torch.equal(second[0], first[0])


def test_a_result_too_large_for_its_dtype_must_be_its_infinity():
    from attnkernels.bench.cases import _error_against

    reference = torch.tensor([1.0e5, 2.0, -1.0e5], dtype=torch.float32)  # beyond float16's 65504
    assert _error_against(torch.tensor([float("inf"), 2.0, -float("inf")], dtype=torch.float16), reference) == 0.0
    assert _error_against(torch.tensor([65504.0, 2.0, -float("inf")], dtype=torch.float16), reference) > 3e4
    assert _error_against(torch.tensor([-float("inf"), 2.0, -float("inf")], dtype=torch.float16), reference) == math.inf
    assert math.isnan(_error_against(torch.tensor([float("nan"), 2.0, 0.0], dtype=torch.float16), reference))


def test_time_callable_reports_the_median_or_the_fastest_call(monkeypatch):
    """Kernels are timed by their median call, machine limits by their fastest (what the machine
    reaches at best); a fake clock makes the calls take 3, 1, 5, 3, 3 ... ms."""
    from attnkernels.bench import timing

    now = [0.0]
    durations = iter([0.003, 0.001, 0.005] + [0.003] * 100)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def call():
        now[0] += next(durations)

    budget = timing.TimingBudget(warmup_s=0.0, measure_s=1.0, min_repetitions=3, max_repetitions=5, patience_s=1.0)
    cpu = torch.device("cpu")
    # The first call of each is the untimed warm-up.
    assert timing.time_callable(call, cpu, budget).seconds == pytest.approx(0.003)
    durations = iter([0.003, 0.001, 0.005] + [0.003] * 100)
    fastest = timing.time_callable(call, cpu, budget, statistic="min")
    assert fastest.seconds == pytest.approx(0.001) and fastest.repetitions == 5
    with pytest.raises(ValueError, match="statistic"):
        timing.time_callable(call, cpu, budget, statistic="mean")
