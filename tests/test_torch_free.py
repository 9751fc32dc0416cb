"""The base install (no torch): every command that runs packed models natively works with torch blocked
from import, and what needs torch says in one line which extra to install (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A meta path finder ahead of every other: `import torch` (or any torch.*) fails as if not installed.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""
CLI = NO_TORCH + "from bitlm.cli import main\nsys.exit(main(sys.argv[1:]))\n"
EXTRA = "pip install 'bitlm[torch]'"


def run(code: str, *args, stdin: str = "", cache: Path):
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], input=stdin, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1",
                                         "BITLM_CACHE": str(cache)})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def native():
    from bitlm.cli import native_available
    if not native_available():
        pytest.skip("the native kernels are not built")


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A latent (quantization_mode online) checkpoint: its conversion to the native file needs torch."""
    import shutil

    import torch
    from safetensors.torch import save_file

    import bitlm
    d = tmp_path_factory.mktemp("latent")
    cfg = bitlm.preset("tiny", quantization_mode="online", torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    m = bitlm.BitNetForCausalLM(cfg, linear="latent")
    state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy2(f, d / f.name)
    assert torch is not None
    return d


def test_native_commands_run_without_torch(native, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 4)
    cache = tmp_path / "cache"
    check = "\nprint('torch' in sys.modules, file=sys.stderr)"
    cli = CLI.replace("sys.exit(main(sys.argv[1:]))", "rc = main(sys.argv[1:])" + check + "\nsys.exit(rc)")
    runs = {
        "doctor": [],
        "info": [],
        "generate": ["-p", "KING HENRY:", "-n", "8", "--seed", "1"],
        "chat": ["-n", "8", "--seed", "1"],
        "bench": ["--shape", "tiny", "-t", "1", "-p", "8", "-n", "4", "-r", "1"],
        "eval": ["ppl", "--data", text, "--ctx", "32", "--stride", "16", "--json", "--no-progress"],
    }
    for command, args in runs.items():
        code, out, err = run(cli, command, *args, stdin="hello\n", cache=cache)
        assert code == 0, f"{command}: {err}"
        assert err.splitlines()[-1] == "False", f"{command} imported torch"
        assert out.strip(), command
    r = json.loads(out)
    assert r["tokens"] == r["text_tokens"] - 1 and 1 < r["ppl"] < 4096  # the bundled model's vocabulary
    assert list((cache / "native").glob("*.safetensors"))  # the bundled checkpoint converted without torch


def test_torch_commands_say_which_extra(native, tmp_path, latent_dir, tiny_model_dir):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 8)
    cases = {
        "generate on the torch runtime": ["generate", "-m", tiny_model_dir, "-p", "To be", "-n", "4",
                                          "--runtime", "torch"],
        "eval ppl on the torch runtime": ["eval", "ppl", "-m", tiny_model_dir, "--data", text, "--runtime", "torch"],
        "a latent checkpoint": ["generate", "-m", latent_dir, "-p", "To be", "-n", "4"],
        "training": ["train", "--data", text, "--steps", "1", "--out", tmp_path / "run", "--no-progress"],
        "report's bf16 twin": ["report", "--shape", "tiny", "--out", tmp_path / "report"],
    }
    for what, args in cases.items():
        code, out, err = run(CLI, *args, cache=tmp_path / "cache")
        assert code == 2, f"{what}: exit {code}: {err}"
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, f"{what}: {err}"
        assert err.startswith("bitlm: error: ") and EXTRA in err, f"{what}: {err}"
    code, out, err = run(NO_TORCH + "import bitlm\ntry:\n    bitlm.load\nexcept bitlm.BitlmError as e:\n    print(e)\n",
                         cache=tmp_path / "cache")
    assert code == 0 and EXTRA in out and "bitlm.load needs PyTorch" in out, err
