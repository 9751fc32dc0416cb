"""`bitlm eval ppl`: the window plan by hand, both runtimes against Hugging Face's published loop run on
bitlm's torch model, bits per byte as an identity, and the command's output and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import bitlm
from bitlm.cli import main, native_available
from bitlm.eval.ppl import perplexity, text_ids, windows
from bitlm.eval.scoring import NativeScorer, TorchScorer

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.\n"
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n") * 3


def test_windows_by_hand():
    # 10 tokens, windows of 4 every 2: tokens 1..9 each scored once, with up to 2 tokens seen before
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(10, 4, 3) == [(0, 4, 3), (3, 7, 3), (6, 10, 3)]
    assert windows(3, 8, 4) == [(0, 3, 2)]
    for n, ctx, stride in ((57, 16, 5), (100, 8, 7), (2, 2, 1)):
        assert sum(k for _, _, k in windows(n, ctx, stride)) == n - 1
    with pytest.raises(bitlm.BitlmError, match="--stride"):
        windows(10, 4, 4)


def hf_reference(model, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """(total NLL, tokens) by the loop of Hugging Face's "Perplexity of fixed-length models" guide,
    with torch's cross entropy on bitlm's torch model."""
    seq = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + ctx, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).double()
        labels = target_ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
        prev_end = end
        if end == seq.size(1):
            break
    return total, count


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    return bitlm.load(tiny_model_dir)


@pytest.mark.parametrize("ctx,stride", [(32, 16), (48, 47), (256, 128)])
def test_torch_runtime_matches_hf_loop(torch_model, ctx, stride):
    ids = text_ids(torch_model.tokenizer, TEXT)
    assert ids[0] == torch_model.tokenizer.bos_token_id and ids.count(ids[0]) == 1  # one BOS, in front
    r = perplexity(TorchScorer(torch_model), TEXT, ctx, stride, progress=False)
    total, count = hf_reference(torch_model, ids, ctx, stride)
    assert r["tokens"] == count == len(ids) - 1
    assert r["total_nll"] == pytest.approx(total, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert r["bpb"] == pytest.approx(r["total_nll"] / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-12)


@pytest.mark.skipif(not native_available(), reason="the native kernels are not built")
def test_native_runtime_matches_torch(tiny_model_dir, torch_model):
    ref = perplexity(TorchScorer(torch_model), TEXT, 32, 16, progress=False)
    # f32 head and cache: the same numbers to float rounding
    exact = perplexity(NativeScorer(bitlm.load_native(tiny_model_dir, head="f32", kv="f32")), TEXT, 32, 16,
                       progress=False)
    assert exact["tokens"] == ref["tokens"]
    assert exact["nll"] == pytest.approx(ref["nll"], rel=5e-5)  # 7e-6 measured
    # the defaults (int8 head rows, f16 cache): within the tolerance the README states, 3e-3 of the NLL
    # (1.6e-3 measured on this random model's peaked logits, NLL 12.3; 2e-6 on the bundled model)
    q8 = perplexity(NativeScorer(bitlm.load_native(tiny_model_dir, head="q8")), TEXT, 32, 16, progress=False)
    assert q8["nll"] == pytest.approx(ref["nll"], rel=3e-3)
    # a chunked forward scores as one forward does
    one = NativeScorer(bitlm.load_native(tiny_model_dir, head="f32", kv="f32"), chunk=1000)
    few = NativeScorer(one.nm, chunk=3)
    ids = text_ids(torch_model.tokenizer, TEXT)[:40]
    a, b = one.score(ids, 30), few.score(ids, 30)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert (a[1] == b[1]).all()


def test_command(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    argv = ["eval", "ppl", "-m", str(tiny_model_dir), "--data", str(data), "--ctx", "32", "--stride", "16",
            "--json", "--no-progress"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    runtime = "native" if native_available() else "torch"
    scorer = NativeScorer(bitlm.load_native(tiny_model_dir)) if runtime == "native" else \
        TorchScorer(bitlm.load(tiny_model_dir))
    direct = perplexity(scorer, TEXT, 32, 16, progress=False)
    assert r["runtime"] == runtime and r["tokens"] == direct["tokens"] and r["nll"] == direct["nll"]
    assert main(argv[:-2]) == 0  # the table, with a progress bar on stderr
    out, err = capsys.readouterr()
    assert f"| {r['ppl']:.3f} |" in out and "perplexity" in err
    # two files are two documents: their sums pool
    assert main(argv[:6] + [str(data)] + argv[6:]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["tokens"] == 2 * r["tokens"] and r2["total_nll"] == pytest.approx(2 * r["total_nll"], rel=1e-9)


def test_command_torch_runtime(tiny_model_dir, tmp_path, capsys):
    # --runtime torch (and --device cpu, said out loud) gives the torch scorer's figure exactly
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    direct = perplexity(TorchScorer(bitlm.load(tiny_model_dir)), TEXT, 32, 16, progress=False)
    for extra in ([], ["--device", "cpu"]):
        assert main(["eval", "ppl", "-m", str(tiny_model_dir), "--data", str(data), "--ctx", "32", "--stride", "16",
                     "--runtime", "torch", "--json", "--no-progress", *extra]) == 0
        r = json.loads(capsys.readouterr().out)
        assert (r["runtime"], r["device"], r["head"]) == ("torch", "cpu", None)
        assert r["tokens"] == direct["tokens"] and r["nll"] == direct["nll"] and r["ppl"] == direct["ppl"]


@pytest.mark.parametrize("args,message", [
    (["--data", "{missing}"], "no such file"),
    (["--data", "{bad}"], "not UTF-8"),
    (["--data", "{text}", "--ctx", "16", "--stride", "16"], "--stride must be between 1 and --ctx - 1"),
    (["--data", "{text}", "--ctx", "100000"], "exceeds the model's context length"),
])
def test_errors(tiny_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    paths = {"missing": tmp_path / "nope.txt", "bad": tmp_path / "bad.txt", "text": tmp_path / "text.txt"}
    argv = ["eval", "ppl", "-m", str(tiny_model_dir), "--no-progress"] + [a.format(**paths) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitlm: error: ") and message in err and len(err.strip().splitlines()) == 1
