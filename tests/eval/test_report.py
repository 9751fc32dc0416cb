"""`bitlm report` on the tiny shape: both engines measured in their own processes, the table's numbers
against the shape's own arithmetic, the files written, and RAPL reading on a made-up powercap tree."""

from __future__ import annotations

import json

import pytest

import bitlm
from bitlm.cli import main, native_available
from bitlm.eval.report import EnergyMeter, arithmetic_energy_j, rapl_packages


@pytest.mark.skipif(not native_available(), reason="the native kernels are not built")
def test_report_tiny(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--shape", "tiny", "--out", str(out), "-t", "1", "-p", "8", "-n", "4",
                 "--twin-n-gen", "2", "-r", "1"]) == 0
    printed = capsys.readouterr().out
    d = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().strip() in printed
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = bitlm.preset("tiny")
    n = cfg.num_parameters()
    t, w = d["ternary"], d["twin"]
    # weight bytes from the shape: 2-bit codes (4 a byte) + a float32 scale per projection + float32 norms;
    # the twin holds every parameter in bf16, the tied head once
    shapes = cfg.projection_shapes().values()
    codes = cfg.num_hidden_layers * sum(o * -(-i // 4) for o, i in shapes)
    assert codes <= t["nonembed_bytes"] - 4 * n["norms"] - 4 * 7 * cfg.num_hidden_layers < codes * 1.1  # row padding
    assert w["nonembed_bytes"] == 2 * (n["ternary"] + n["norms"])
    assert w["total_bytes"] == 2 * n["total"]
    assert t["total_bytes"] > t["nonembed_bytes"] + 2 * n["embedding"]  # bf16 embedding + q8 head
    for side in (t, w):
        assert side["prefill_ms"] > 0 and side["decode_ms"] > 0 and side["peak_rss_bytes"] > 10e6
    # the 7 nm model: one INT8 add per ternary weight against an FP16 multiply and add per weight
    assert d["arithmetic_energy_j"]["ternary"] == pytest.approx(n["ternary"] * 0.007e-12)
    assert d["arithmetic_energy_j"]["twin"] / d["arithmetic_energy_j"]["ternary"] == pytest.approx(0.5 / 0.007)
    if not rapl_packages()[0]:
        assert d["measured_energy"].startswith("unavailable: ") and "n/a" in printed


def test_rapl_reading(tmp_path):
    """Package domains only (not their subdomains), summed, with one counter wrap accounted for."""
    assert rapl_packages(tmp_path / "none")[0] == []
    for name, label, uj, top in (("intel-rapl:0", "package-0", 1000, 5000), ("intel-rapl:1", "package-1", 4000, 5000),
                                 ("intel-rapl:0:0", "core", 7, 5000), ("intel-rapl:2", "psys", 9, 5000)):
        d = tmp_path / name
        d.mkdir()
        (d / "name").write_text(label + "\n")
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{top}\n")
    domains, why = rapl_packages(tmp_path)
    assert [p.name for p in domains] == ["intel-rapl:0", "intel-rapl:1"] and why == ""
    meter = EnergyMeter(domains)
    meter.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3500\n")  # +2500 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500\n")  # wrapped: +1000 (to 5000) +500
    assert meter.stop() == pytest.approx((2500 + 1500) / 1e6)
    assert arithmetic_energy_j(10**9, True) == pytest.approx(0.007e-3)
