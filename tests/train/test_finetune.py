"""Fine-tuning: a full-precision Llama down to 1.58 bits (the lambda warm-up), SFT and DPO."""

import math
import shutil

import pytest
import torch
from conftest import small_run

import bitlm
from bitlm.io.llama import load_llama
from bitlm.train import make_config, run
from bitlm.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, d / f.name)
    return d


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        for _ in range(n):
            ids = ids + [int(model(torch.tensor([ids]))[0, -1].argmax())]
    return ids


def train_rows(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


def test_llama_maps_onto_the_bitnet_block(llama_dir):
    """With quantization off (lambda 0) and the added sub-norms taken out, the model IS the Llama."""
    ours = load_llama(llama_dir)
    assert ours.config.hidden_act == "silu" and not ours.config.tie_word_embeddings
    for _, m in ours.ternary_layers():
        m.quant_strength = 0.0
    for block in ours.model.layers:
        assert torch.equal(block.self_attn.attn_sub_norm.weight, torch.ones(64))
        block.self_attn.attn_sub_norm = torch.nn.Identity()
        block.mlp.ffn_sub_norm = torch.nn.Identity()
    ref = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.tensor([[0, 5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_llama_finetuned_to_ternary(llama_dir, corpus_file, tmp_path):
    summary = run(small_run(corpus_file, tmp_path, init=str(llama_dir), tokenizer=None, quant_warmup=4,
                            steps=12, lr=3e-3))
    rows = train_rows(tmp_path)
    assert [r["quant_strength"] for r in rows[:6]] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    model = bitlm.load(summary["model"])
    assert model.linear_kind == "packed" and model.config.hidden_act == "silu"
    prompt = model.tokenizer.encode("To be, or not")
    out = greedy(model, prompt, 6)
    assert len(out) == len(prompt) + 6 and all(0 <= i < 512 for i in out)
    hf = transformers.BitNetForCausalLM.from_pretrained(summary["model"]).eval()
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([out])), hf(torch.tensor([out])).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_sft_lowers_the_assistant_loss(tiny_model_dir, chat_file, tmp_path, aggregation):
    cfg = make_config(task="sft", data=[str(chat_file)], init=str(tiny_model_dir), out=str(tmp_path),
                      batch_size=4, steps=12, lr=3e-3, lr_stage1_end=2e-3, lr_stage2=1e-3,
                      loss_aggregation=aggregation, progress=False, plot=False)
    run(cfg)
    losses = [r["loss"] for r in train_rows(tmp_path)]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert bitlm.load(tmp_path / "model").tokenizer.chat_template


def test_dpo_raises_the_margin(tiny_model_dir, pref_file, tmp_path):
    cfg = make_config(task="dpo", data=[str(pref_file)], init=str(tiny_model_dir), out=str(tmp_path),
                      batch_size=4, steps=10, lr=2e-3, lr_stage1_end=1e-3, lr_stage2=5e-4, beta=0.1,
                      progress=False, plot=False)
    run(cfg)
    rows = train_rows(tmp_path)
    # step 1: the policy is the reference, so the loss is exactly -log sigmoid(0) = log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["reward_acc"] == 0.0
    assert rows[-1]["margin"] > rows[0]["margin"] + 1.0
    assert rows[-1]["loss"] < math.log(2) - 0.05
