"""The benchmark command refuses what it cannot do before it runs (issue 14, item 8)."""

import sys

import pytest

from attnkernels.bench import main

TINY = ["--quick", "--sizes", "6", "--no-progress", "--op", "grid_sample_2d", "--pass", "fwd", "--dtype", "float32"]


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker


def test_unwritable_out_fails_before_the_run(tmp_path, capsys):
    err = _usage_error(capsys, [*TINY, "--out", str(_a_file(tmp_path) / "out")])
    assert "--out" in err and "measuring" not in err  # refused before the machine's limits were measured


def test_out_that_is_a_file_fails(tmp_path, capsys):
    assert "--out" in _usage_error(capsys, [*TINY, "--out", str(_a_file(tmp_path))])


def test_unwritable_results_md_fails_before_the_run(tmp_path, capsys):
    err = _usage_error(capsys, [*TINY, "--results-md", str(_a_file(tmp_path) / "RESULTS.md")])
    assert "--results-md" in err and "measuring" not in err
    assert "--results-md" in _usage_error(capsys, [*TINY, "--results-md", str(tmp_path)])


def test_empty_pass_and_dtype_are_errors(capsys):
    assert "--pass" in _usage_error(capsys, [*TINY, "--pass", ""])
    assert "--dtype" in _usage_error(capsys, [*TINY, "--dtype", ""])


@pytest.mark.parametrize("op", ["grid_sample_3d", "attention"])
def test_huge_sizes_are_refused_with_a_message(capsys, op):
    err = _usage_error(capsys, ["--quick", "--no-progress", "--op", op, "--sizes", "1000000"])
    assert "--sizes 1000000 is too large" in err and "GiB" in err


def test_without_matplotlib_json_and_csv_are_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out"
    assert main([*TINY, "--out", str(out)]) == 0
    assert (out / "results.json").exists() and (out / "results.csv").exists()
    assert not list(out.glob("*.png"))
    assert "need matplotlib" in capsys.readouterr().err
