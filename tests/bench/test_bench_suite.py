"""``python -m bench``: the results files, the ratios they hold, never writing over an earlier run, and refusing an
unknown row before any work. Quick sizes on one thread: the figures themselves mean nothing here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHEAP_ROWS = ["cache", "cams", "mae"]  # seconds each at --quick: the cache build, CAMs and one fit-path family


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", "--quick", "--threads", "1", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, list[Path], bytes]:
    out = tmp_path_factory.mktemp("bench-results")
    first = run_bench("--only", *CHEAP_ROWS, "--profile", "--out", str(out))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    written = sorted(out.glob("*.json"))
    assert len(written) == 1
    before = written[0].read_bytes()
    second = run_bench("--only", "cache", "--out", str(out))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, written, before


@pytest.mark.slow
def test_rows_hold_positive_figures_and_their_ratio(two_runs):
    out, written, _ = two_runs
    record = json.loads(written[0].read_text())
    assert record["quick"] is True and record["machine"]["threads"] == 1
    assert record["machine"]["cpu_model"] and isinstance(record["machine"]["cpu_bf16_flags"], bool)
    assert record["machine"]["torch"]
    families = {row["family"] for row in record["rows"]}
    assert families == set(CHEAP_ROWS)
    assert len([r for r in record["rows"] if r["family"] == "cams"]) == 6  # 3 methods x 2 architectures
    assert len([r for r in record["rows"] if r["family"] == "mae"]) == 2  # mask 0.9 and 0.75 (no compile in quick)
    for row in record["rows"]:
        assert row["error"] is None, row
        assert row["osteolib"] > 0 and row["reference"] > 0, row
        assert row["ratio"] == pytest.approx(row["osteolib"] / row["reference"])
        assert row["unit"] == "images/s"
        assert isinstance(row["busy"], bool) and "load1_before" in row["load"]
        assert row["peak_rss_mb"]["osteolib"] > 0 and row["peak_rss_mb"]["reference"] > 0
        if row["goal"] is not None:
            assert row["goal_met"] == (row["ratio"] >= row["goal"])


@pytest.mark.slow
def test_markdown_table_beside_the_json(two_runs):
    out, written, _ = two_runs
    table = written[0].with_suffix(".md").read_text()
    assert "Quick run" in table and "| row | osteolib | reference |" in table
    assert "cache build" in table and "gradcam densenet121" in table


@pytest.mark.slow
def test_a_second_run_does_not_overwrite_the_first(two_runs):
    out, written, before = two_runs
    assert len(list(out.glob("*.json"))) == 2 and len(list(out.glob("*.md"))) == 2
    assert written[0].read_bytes() == before


def test_same_second_gets_a_suffix(tmp_path):
    from osteolib.cli.bench import bench_cli

    bench_cli()  # the repository's bench package, imported by its location
    from bench.report import write_results

    record = {"quick": True, "goal_tier": "AVX2-only", "rows": [],
              "machine": {"cpu_model": "x", "cpu_bf16_flags": False, "device": "cpu", "torch": "t", "threads": 1,
                          "cpus_usable": 1}}
    first = write_results(dict(record), tmp_path, "20260101-000000")
    second = write_results(dict(record), tmp_path, "20260101-000000")
    assert first[0].name == "20260101-000000.json" and second[0].name == "20260101-000000-2.json"
    assert second[1].name == "20260101-000000-2.md"


def test_unknown_row_is_refused_before_any_work(tmp_path):
    result = run_bench("--only", "cache", "no_such_row", "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert "unknown row family no_such_row" in result.stderr and "choose from cache" in result.stderr
    assert not (tmp_path / "out").exists()  # refused at the arguments: no row ran, nothing was written


def test_osteo_bench_without_the_bench_folder(tmp_path, monkeypatch, capsys):
    import argparse

    from osteolib.cli import bench as command

    monkeypatch.setattr(command, "BENCH_DIR", tmp_path / "bench")
    parser = argparse.ArgumentParser(prog="osteo")
    command.add_arguments(parser.add_subparsers(dest="command").add_parser("bench"))
    assert command.run(parser.parse_args(["bench"])) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_adds_where_each_sides_time_goes(two_runs):
    _, (written,), _ = two_runs
    rows = [row for row in json.loads(written.read_text())["rows"] if row["family"] == "cams"]
    for row in rows:
        for side in ("osteolib", "reference"):
            found = row["profile"][side]
            assert found["wall_seconds"] > 0 and found["operators"] and found["python"]
            # the shares are of the profiled run's own-time total: each in (0, 1], largest first
            shares = [op["share"] for op in found["operators"]]
            assert all(0 < s <= 1 for s in shares) and shares == sorted(shares, reverse=True)
    # convolutions or matrix products dominate a CAM: the profile names the work, not the profiler's own frames
    assert any("conv" in op["name"] or "mm" in op["name"] for op in rows[0]["profile"]["osteolib"]["operators"][:3])
    assert "## Where the time goes (--profile)" in written.with_suffix(".md").read_text()
