"""The model shipped in the package: the default of `bitlm generate` and `bitlm chat`, offline."""

import json

import pytest
import torch

import bitlm
from bitlm.cli import main
from bitlm.data import bundled_model_dir
from bitlm.engine.generate import generate_text


def test_bundled_model_is_small_and_packed():
    d = bundled_model_dir()
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 5_000_000
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    model = bitlm.load(d)
    assert model.tokenizer is not None and model.tokenizer.chat_template


def test_bundled_model_speaks_shakespeare():
    """Trained, not random: held-out text is far likelier than under a uniform guess."""
    model = bitlm.load(bundled_model_dir())
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    ids = torch.tensor([model.tokenizer.encode(text)])
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(nll.exp()) < model.config.vocab_size / 10


def test_generate_without_model_uses_the_bundled_one(capsys):
    assert main(["generate", "-p", "KING HENRY:", "-n", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    from bitlm.cli import native_available
    if native_available():
        from bitlm.engine.native import NativeLM
        lib = NativeLM(bitlm.load_native(bundled_model_dir()))
    else:
        lib = bitlm.load(bundled_model_dir())
    assert out == generate_text(lib, "KING HENRY:", max_new_tokens=12, temperature=0) + "\n"
    assert len(out.strip()) > 0


def test_chat_without_model_uses_the_bundled_one(capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\n"))
    assert main(["chat", "-n", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("missing", ["config.json"])
def test_missing_bundle_is_a_clear_error(tmp_path, monkeypatch, missing):
    import bitlm.data
    monkeypatch.setattr(bitlm.data, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(bitlm.BitlmError, match="bundled model is missing"):
        bundled_model_dir()
