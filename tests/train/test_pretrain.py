"""End-to-end pre-training on a tiny model: the loss falls, resume is exact, the saved model loads in
bitlm and in transformers alike, the fp twin trains, config files equal flags, bad input is refused."""

import json

import pytest
import torch
from conftest import small_run

import bitlm
from bitlm.errors import BitlmError
from bitlm.train import run
from bitlm.train.metrics import read_metrics


def losses_of(out, split="train"):
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]


@pytest.fixture(scope="module")
def full_run(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = run(small_run(corpus_file, out, steps=12, plot=True))
    return out, summary


def test_pretraining_lowers_the_loss(full_run):
    out, summary = full_run
    train = [loss for _, loss in losses_of(out)]
    assert summary["finished"] and len(train) == 12
    assert sum(train[-3:]) / 3 < train[0] - 0.5
    val = losses_of(out, "val")
    assert [s for s, _ in val] == [4, 8, 12] and val[-1][1] < val[0][1]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[0]["wd"] == pytest.approx(0.1)
    assert rows[-2]["wd"] == 0.0  # stage two trains without weight decay
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reproduces_the_uninterrupted_run(full_run, corpus_file, tmp_path):
    out, _ = full_run
    first = run(small_run(corpus_file, tmp_path, steps=12, stop_at_step=5))
    assert not first["finished"] and first["steps"] == 5 and not (tmp_path / "model").exists()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and state["data"]["position"] == 5 * 4
    resumed = run(small_run(corpus_file, tmp_path, steps=12, resume=True))
    assert resumed["finished"] and resumed["steps"] == 12
    assert losses_of(tmp_path) == losses_of(out)  # exact, step for step
    assert losses_of(tmp_path, "val") == losses_of(out, "val")
    a = bitlm.load(out / "model").state_dict()
    b = bitlm.load(tmp_path / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_model_loads_in_bitlm_and_transformers(full_run):
    out, _ = full_run
    transformers = pytest.importorskip("transformers")
    ours = bitlm.load(out / "model")
    theirs = transformers.BitNetForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([ours.tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    # and the latent weights of the last checkpoint, fake-quantized, compute the same
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    latent = bitlm.BitNetForCausalLM(ours.config, linear="latent")
    latent.load_state_dict(state["model"])
    with torch.no_grad():
        assert torch.allclose(latent(ids), a, atol=1e-4, rtol=1e-4)


def test_fp_twin_trains_and_round_trips(corpus_file, tmp_path):
    summary = run(small_run(corpus_file, tmp_path, precision="fp", steps=12))
    train = [loss for _, loss in losses_of(tmp_path)]
    assert sum(train[-3:]) / 3 < train[0] - 0.5
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["bitlm_linear"] == "fp" and "quantization_config" not in cfg
    twin = bitlm.load(tmp_path / "model", linear="fp")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in state.items())
    assert summary["model"].endswith("model")


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_then_flags(corpus_file, tmp_path, suffix):
    from bitlm.train import make_config
    f = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        f.write_text(f"data: [{json.dumps(str(corpus_file))}]\nbatch-size: 8\nlr: 0.002\nadam_betas: [0.9, 0.99]\n")
    else:
        f.write_text(f"data = [{json.dumps(str(corpus_file))}]\nbatch-size = 8\nlr = 0.002\nadam_betas = [0.9, 0.99]\n")
    cfg = make_config(str(f), lr=0.004, steps=None)
    assert (cfg.batch_size, cfg.lr, cfg.adam_betas, cfg.steps) == (8, 0.004, (0.9, 0.99), None)
    f.write_text("data: [x]\nlearning_rate: 1\n" if suffix == ".yaml" else "data = ['x']\nlearning_rate = 1\n")
    with pytest.raises(BitlmError, match="unknown option 'learning_rate'"):
        make_config(str(f))


def test_resume_with_another_model_config_is_refused(corpus_file, tmp_path):
    run(small_run(corpus_file, tmp_path, steps=4, stop_at_step=2))
    with pytest.raises(BitlmError, match=r"checkpoint is from another model config \(.*hidden_size: 64 in the "
                                         r"checkpoint, 96 now"):
        run(small_run(corpus_file, tmp_path, steps=4, resume=True, hidden_size=96, intermediate_size=256))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from bitlm.train.cli import main
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitlm: error: empty corpus") and err.count("\n") == 1
    (tmp_path / "small.txt").write_text("Shall I compare thee to a summer's day? " * 8)
    assert main(["train", "--data", str(tmp_path / "small.txt"), "--tokenizer", "bpe:300", "--context", "32",
                 "--batch-size", "64", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "training corpus smaller than one batch" in capsys.readouterr().err


def test_sigterm_checkpoints_and_stops(corpus_file, tmp_path):
    """A preempted job (SIGTERM) finishes its step, writes a checkpoint there and exits cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "bitlm.train", "train", "--data", str(corpus_file),
                             "--tokenizer", "bpe:320", "--context", "32", "--batch-size", "4", "--steps", "100000",
                             "--checkpoint-every", "100000", "--eval-every", "100000", "--threads", "1",
                             "--no-progress", "--out", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped after" in out
    last = read_metrics(metrics)[-1]["step"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == last >= 3


def test_bf16_autocast_trains(corpus_file, tmp_path):
    run(small_run(corpus_file, tmp_path, steps=12, amp="bf16"))
    train = [loss for _, loss in losses_of(tmp_path)]
    assert sum(train[-3:]) / 3 < train[0] - 0.5
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in state.values())  # latent weights stay float32


def test_cli_trains_on_jsonl_with_a_tokenizer_json(tiny_tokenizer_dir, tmp_path, capsys):
    from helpers import CORPUS

    from bitlm.train.cli import main
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": line}) + "\n" for line in CORPUS.splitlines() * 10))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("context: 32\nbatch-size: 4\nsteps: 3\neval-every: 3\neval-batches: 1\n")
    assert main(["train", "--config", str(cfg), "--data", str(data), "--text-field", "body", "--tokenizer",
                 str(tiny_tokenizer_dir / "tokenizer.json"), "--out", str(tmp_path / "o"), "--no-progress",
                 "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("trained 3 steps; train loss ")
    from bitlm.engine.tokenizer import Tokenizer
    source = Tokenizer.from_dir(tiny_tokenizer_dir)
    model = bitlm.load(tmp_path / "o" / "model")
    text = "To be, or not to be"
    assert model.tokenizer.encode(text) == source.encode(text)
    assert model.config.vocab_size == model.tokenizer.vocab_size == source.vocab_size
    assert model.tokenizer.chat_template  # the tokenizer.json's own config came along
