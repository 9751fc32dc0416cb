"""Device selection (bitlm.gpu.check_device / resolve_kernel): what a machine without CUDA (or without
Triton) answers to `device="cuda"`, `--device cuda` and `kernel="triton"`, in one line. Runs everywhere:
no GPU and no Triton needed (the Triton kernels themselves: test_triton_kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitlm
from bitlm.cli import main
from bitlm.engine import bench
from bitlm.gpu import check_device, resolve_kernel

SRC = str(Path(__file__).resolve().parents[2] / "src")
NO_CUDA = "CUDA is not available (torch.cuda.is_available() is False)"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
def test_load_on_cuda_without_cuda_is_one_clear_error(tiny_model_dir):
    with pytest.raises(bitlm.BitlmError, match=r"^device cuda: " + NO_CUDA.replace("(", r"\(").replace(")", r"\)")):
        bitlm.load(tiny_model_dir, device="cuda")


@pytest.mark.parametrize("device,message", [("tpu", "not a device"), ("meta", "runs on cpu or cuda, not meta"),
                                            (3.5, "not a device")])
def test_devices_that_are_not_cpu_or_cuda_are_refused(device, message):
    with pytest.raises(bitlm.BitlmError, match=message):
        check_device(device)


def test_kernel_choices(tiny_model_dir):
    cpu = torch.device("cpu")
    assert resolve_kernel(cpu) == "torch" and resolve_kernel(cpu, "torch") == "torch"
    with pytest.raises(bitlm.BitlmError, match="expected one of auto, torch, triton"):
        bitlm.load(tiny_model_dir, kernel="cuda")
    with pytest.raises(bitlm.BitlmError, match="linear='latent' has none"):
        resolve_kernel(cpu, "triton", "latent")


def test_cpu_load_is_unchanged(tiny_model_dir):
    a, b = bitlm.load(tiny_model_dir), bitlm.load(tiny_model_dir, device="cpu", kernel="auto")
    ids = torch.tensor([[0, 5, 9]])
    assert type(a.model.layers[0].mlp.up_proj) is type(b.model.layers[0].mlp.up_proj)
    assert torch.equal(a(ids), b(ids))


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**full, "PYTHONPATH": SRC, **env})


def test_triton_missing_says_how_to_install(tiny_model_dir):
    # triton made unimportable in a fresh process (sys.modules entry None: import raises ImportError)
    p = _run(f"import sys; sys.modules['triton'] = None; import bitlm\n"
             f"try:\n    bitlm.load({str(tiny_model_dir)!r}, kernel='triton')\n"
             f"except bitlm.BitlmError as e:\n    print(e)", {})
    assert p.stdout.strip() == "kernel='triton': Triton is not installed; pip install 'bitlm[gpu]'", p.stderr


def test_triton_on_cpu_needs_the_interpreter(tiny_model_dir):
    pytest.importorskip("triton", reason="triton is not installed")
    p = _run(f"import bitlm\ntry:\n    bitlm.load({str(tiny_model_dir)!r}, kernel='triton')\n"
             f"except bitlm.BitlmError as e:\n    print(e)", {})
    assert "runs only under Triton's interpreter: set TRITON_INTERPRET=1" in p.stdout, p.stderr


@needs_no_cuda
@pytest.mark.parametrize("argv", [["generate", "-p", "hi", "-m", "{model}"], ["chat", "-m", "{model}"],
                                  ["bench", "--shape", "tiny"], ["bench", "-m", "{model}"],
                                  ["generate", "--runtime", "torch", "-p", "hi"],
                                  ["eval", "ppl", "-m", "{model}", "--data", "{data}"],
                                  ["eval", "ppl", "--runtime", "torch", "--data", "{data}"],
                                  ["serve", "-m", "{model}"], ["serve", "--runtime", "torch", "--port", "0"]])
def test_cli_device_cuda_without_cuda(argv, tiny_model_dir, tmp_path, capsys):
    if argv[0] == "serve":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question.\n")
    assert main([a.format(model=tiny_model_dir, data=data) for a in argv] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bitlm: error: --device cuda: {NO_CUDA}; ")


@pytest.mark.parametrize("argv", [["generate", "-p", "hi"], ["eval", "ppl", "--data", "{data}"], ["serve"]])
def test_cli_device_cuda_with_runtime_native(argv, tmp_path, capsys, monkeypatch):
    # as on a machine with CUDA and Triton: the device check passes (stubbed here), the runtime conflict
    # is refused before any model loads
    if argv[0] == "serve":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    monkeypatch.setattr("bitlm.cli.check_device_arg", lambda args: torch.device("cuda"))
    monkeypatch.setattr("bitlm.cli._load_on", lambda *a: pytest.fail("a model was loaded"))
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question.\n")
    assert main([a.format(data=data) for a in argv] + ["--runtime", "native", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == ("bitlm: error: --runtime native runs on the CPU; --device cuda runs the torch model "
                   "(drop --runtime native)\n")


@needs_no_cuda
def test_train_device_cuda_without_cuda(tmp_path, capsys):
    data = tmp_path / "a.txt"
    data.write_text("some text to train on\n" * 50)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device cuda: {NO_CUDA}" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_amp_auto_is_bf16_on_a_gpu_only():
    from bitlm.train.trainer import resolve_amp
    assert resolve_amp("auto", torch.device("cpu")) == "none"
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16" and resolve_amp("none", torch.device("cpu")) == "none"


def test_torch_bench_records_on_the_cpu():
    # bench --device cuda's measurement, run here on the CPU with the torch products
    model = bench.random_torch_model("tiny", "cpu")
    codes = torch.stack([(model.model.layers[0].self_attn.q_proj.weight >> s) & 3 for s in (0, 2, 4, 6)])
    assert int(codes.max()) == 2 and int(codes.min()) == 0  # ternary codes only, all three present
    records = bench.run_torch(model, 5, 0, 2) + bench.run_torch(model, 0, 4, 2)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(5, 0), (0, 4)]
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 and r["backend"] == "torch (cpu)" for r in records)
