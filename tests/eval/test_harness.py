"""The lm-evaluation-harness adapter, offline: local task YAMLs over JSON files written here, run by
lm_eval.simple_evaluate and by `bitlm eval harness`; every loglikelihood it reports is checked against
the same number computed directly from bitlm.load's torch model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import bitlm
from bitlm.cli import main, native_available

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MC = [
    {"question": "To be, or not to be, that is", "choices": [" the question", " a summer", " the sun"], "label": 0},
    {"question": "Shall I compare thee to a", "choices": [" summer's day", " winter", " fox"], "label": 0},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " ocean", " house"], "label": 0},
]
TEXTS = [{"text": "Now is the winter of our discontent made glorious summer by this sun of York. " * 6},
         {"text": "Thou art more lovely and more temperate."}]
TASKS = {
    "bitlm_test_mc": """task: bitlm_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "bitlm_test_rolling": """task: bitlm_test_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/texts.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "bitlm_test_gen": """task: bitlm_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC))
    (d / "texts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in TEXTS))
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(text.format(dir=d))
    return d


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return bitlm.load(tiny_model_dir)


def direct_logprob(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log p(continuation | context) from one forward of the torch model over the whole sequence."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
    n = len(context_ids)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(continuation_ids)))


def check_samples(results, model, tol):
    tok = model.tokenizer
    bos = tok.bos_token_id
    mc = results["samples"]["bitlm_test_mc"]
    assert len(mc) == len(MC)
    for s in mc:
        for (context, continuation), (ll, _greedy) in zip([a for a in s["arguments"]], [r[0] for r in s["resps"]]):
            ctx = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + continuation, add_special_tokens=False)
            assert whole[:len(ctx)] == ctx
            assert ll == pytest.approx(direct_logprob(model, ctx, whole[len(ctx):]), abs=tol)
    rolling = results["samples"]["bitlm_test_rolling"]
    for s in rolling:
        (text,) = s["arguments"][0]
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) + 1 <= model.config.max_position_embeddings  # one window: the reference is one forward
        assert s["resps"][0][0] == pytest.approx(direct_logprob(model, [bos], ids), abs=tol)
    gen = results["samples"]["bitlm_test_gen"]
    for s in gen:
        context = s["arguments"][0][0]
        ids = tok.encode(context, add_special_tokens=False)
        expected = model.generate(ids, max_new_tokens=6, temperature=0, stop_strings=["\n"])
        assert s["resps"][0][0] == expected


@pytest.fixture(scope="module")
def task_manager(task_dir):
    """The local tasks only: indexing lm-eval's ~13,000 built-in task YAMLs takes 1-2 minutes here."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def evaluate(task_manager, model_args):
    import bitlm.eval.harness  # noqa: F401  (registers "bitlm")
    return lm_eval.simple_evaluate(model="bitlm", model_args=model_args, tasks=list(TASKS),
                                   task_manager=task_manager, log_samples=True, bootstrap_iters=0)


@pytest.mark.skipif(not native_available(), reason="the native kernels are not built")
def test_native_runtime(tiny_model_dir, task_manager, reference):
    # f32 head and KV cache: the native forward equals the torch model to float rounding
    results = evaluate(task_manager, f"pretrained={tiny_model_dir},runtime=native,head=f32,kv=f32")
    check_samples(results, reference, tol=2e-3)
    assert 0 <= results["results"]["bitlm_test_mc"]["acc,none"] <= 1


def test_torch_runtime_batched(tiny_model_dir, task_manager, reference):
    results = evaluate(task_manager, f"pretrained={tiny_model_dir},runtime=torch,batch_size=4")
    check_samples(results, reference, tol=1e-4)


def test_command_line(tiny_model_dir, task_dir, tmp_path, capsys, monkeypatch):
    # lm-eval's own CLI, as the user runs it, but without indexing its built-in tasks (see task_manager)
    from lm_eval.tasks import TaskManager
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "include_defaults": False}))
    out = tmp_path / "out"
    rc = main(["eval", "harness", "--model_args", f"pretrained={tiny_model_dir}", "--tasks", "bitlm_test_mc",
               "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bitlm_test_mc" in printed and "acc" in printed
    [result] = list(out.rglob("results_*.json"))
    data = json.loads(result.read_text())
    assert data["config"]["model"] == "bitlm"
    assert np.isfinite(data["results"]["bitlm_test_mc"]["acc,none"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tiny_model_dir, task_dir, capsys, monkeypatch):
    # model_args device=cuda, and lm-eval's own --device flag: the one-line error of `bitlm generate --device cuda`
    from bitlm.eval.harness import BitlmLM
    with pytest.raises(bitlm.BitlmError, match=r"^--device cuda: CUDA is not available"):
        BitlmLM(pretrained=str(tiny_model_dir), device="cuda")
    from lm_eval.tasks import TaskManager
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "include_defaults": False}))
    rc = main(["eval", "harness", "--model_args", f"pretrained={tiny_model_dir},runtime=torch", "--tasks",
               "bitlm_test_mc", "--include_path", str(task_dir), "--device", "cuda"])
    # stderr also holds lm-eval's own log lines (INFO, or a logging error of a handler an earlier test left
    # on its closed capture): the error is our one last line
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1].startswith("bitlm: error: --device cuda: CUDA is not available"), err
    assert sum(line.startswith("bitlm: error") for line in err) == 1
