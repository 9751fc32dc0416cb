"""`bitlm bench` and `bitlm doctor` as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitlm.cli import main, native_available

SRC = str(Path(__file__).resolve().parents[1] / "src")
needs_native = pytest.mark.skipif(not native_available(), reason="native kernels not built")


@needs_native
def test_bench_json_has_llama_bench_fields(tiny_model_dir, capsys):
    assert main(["bench", "-m", str(tiny_model_dir), "-p", "16,32", "-n", "8", "-r", "2", "-t", "1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(16, 0), (32, 0), (0, 8)]
    for r in records:
        assert r["n_threads"] == 1 and r["avg_ts"] > 0 and r["stddev_ts"] >= 0 and len(r["samples_ts"]) == 2
        assert r["peak_rss_bytes"] > 0 and r["load_s"] >= 0
        assert abs(r["avg_ts"] - sum(r["samples_ts"]) / 2) < 1e-6 * r["avg_ts"]


@needs_native
def test_bench_random_shape_table(capsys):
    assert main(["bench", "--shape", "tiny", "-p", "8", "-n", "4", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert "| pp8 |" in out and "| tg4 |" in out and "peak RSS" in out


@needs_native
def test_bench_random_shape_in_the_t5_weight_format(capsys):
    assert main(["bench", "--shape", "tiny", "-p", "8", "-n", "4", "-r", "1", "--weights", "t5", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records and all("ternary t5," in r["model_type"] and r["avg_ts"] > 0 for r in records)


@needs_native
def test_bench_with_the_q8_0_kv_cache(capsys):
    assert main(["bench", "--shape", "tiny", "-p", "8", "-n", "4", "-r", "1", "--kv", "q8_0", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records and all(r["model_type"].endswith(", kv q8_0") and r["avg_ts"] > 0 for r in records)


@needs_native
def test_bench_profile_breaks_each_token_into_phases(capsys):
    from bitlm.engine.native import PROFILE_PHASES
    assert main(["bench", "--shape", "tiny", "-p", "8", "-n", "4", "-r", "1", "-t", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "| phase | pp8 | tg4 |" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for phase in PROFILE_PHASES + ("total",):
        assert phase in rows, phase
    # every phase that runs a product or the head took time, and the shares add up
    for phase in ("q/k/v", "gate/up", "down", "head"):
        assert float(rows[phase].split("|")[3].split()[0]) > 0
    assert "(100%)" in rows["total"]


def test_bench_needs_exactly_one_model_source(capsys):
    assert main(["bench", "-p", "8"]) == 2
    assert "exactly one of -m MODEL or --shape" in capsys.readouterr().err


def test_doctor_names_the_kernel_path():
    p = subprocess.run([sys.executable, "-m", "bitlm", "doctor"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": SRC}, timeout=60)
    assert p.returncode == 0, p.stderr
    if native_available():
        import bitlm.kernels
        assert f"in use: {bitlm.kernels.info()['path']}" in p.stdout
        assert "amx is tested only on CPUs that have it (no emulator)" in p.stdout
    else:
        assert "NOT available" in p.stdout or "not part of this install" in p.stdout


def test_profile_cells_keep_three_significant_digits_below_a_tenth_of_a_ms():
    """A tiny model's phases on a fast CPU take microseconds: they must not print as 0.000."""
    from bitlm.cli import _ms
    assert [_ms(v) for v in (0.0, 12.3456, 0.1, 0.0999, 7.02e-05)] == ["0.000", "12.346", "0.100", "0.0999",
                                                                     "0.0000702"]


@needs_native
def test_bench_depth_runs_each_test_after_that_much_context(capsys):
    from bitlm.engine import bench
    from bitlm.io.native import open_native
    nm = open_native(bench.synthetic_native_file("tiny"), max_len=64)
    records = bench.run(nm, 1, 8, 4, 2, depth=20)
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in records] == [(8, 0, 20), (0, 4, 20)]
    assert nm.pos == 20 + 4  # the last run decoded its 4 tokens at positions 20 .. 23, after the kept context
    nm.reset()
    assert bench.run(nm, 1, 0, 0, 2, depth=20) == [] and nm.pos == 0  # `-p 0`: no test, no 20-token fill
    assert main(["bench", "--shape", "tiny", "-p", "8", "-n", "4", "-r", "1", "-d", "0,16"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {t} |" in out for t in ("pp8", "tg4", "pp8 @ d16", "tg4 @ d16")), out


@needs_native
def test_bench_depth_past_the_context_is_a_one_line_error(capsys):
    from bitlm.config import preset
    too_deep = preset("tiny").max_position_embeddings
    assert main(["bench", "--shape", "tiny", "-p", "8", "-n", "4", "-r", "1", "-d", str(too_deep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitlm: error:") and "-d " in err and f"context of {too_deep} tokens" in err and len(err.strip().splitlines()) == 1


@needs_native
@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512vnni", "amx"])
def test_weights_auto_follows_the_kernel_path(path):
    """--weights auto (the default): t5 where the products run on AVX-512 VNNI or AMX and one row decodes a
    step, i2v elsewhere, as benchmarks/README.md measured; under BITLM_KERNEL (a path this CPU has) in a
    fresh process."""
    from bitlm import kernels
    if path not in kernels.info()["paths"]:
        pytest.skip(f"this CPU has no {path} path")
    code = ("from bitlm.engine.native import resolve_weights; from bitlm import kernels; "
            "print(kernels.info()['path'], resolve_weights('auto'), resolve_weights('auto', rows=4), "
            "resolve_weights('i2v', rows=1), resolve_weights('t5', rows=4))")
    env = dict(os.environ, BITLM_KERNEL=path, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # several rows a step (serve's batches): i2v on every path; a named format is kept
    assert out.stdout.split() == [path, "t5" if path in ("avx512vnni", "amx") else "i2v", "i2v", "i2v", "t5"]
