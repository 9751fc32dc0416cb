"""The native runtime (kernels/bitnet.c) against the torch reference model, step for step."""

import numpy as np
import pytest
import torch

import bitlm
from bitlm.errors import BitlmError
from helpers import make_tiny_model_dir

native = pytest.importorskip("bitlm.engine.native")
if not __import__("bitlm.kernels", fromlist=["available"]).available():
    pytest.skip("native kernels not built", allow_module_level=True)

SHAPES = {
    "relu2-gqa": dict(),
    "silu-mha-untied": dict(hidden_act="silu", num_key_value_heads=4, tie_word_embeddings=False),
    "ragged": dict(hidden_size=36, intermediate_size=58, num_attention_heads=6, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tmp_path_factory):
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp(request.param), None, **SHAPES[request.param]),
                      tokenizer=False)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_prefill_and_decode_equal_the_reference(model):
    nm = native.NativeModel.from_model(model, head="f32", max_len=64)
    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    assert rel(nm.forward(ids[0].numpy(), n_out=23), ref) < 1e-5  # one prefill of every position
    nm.reset()
    nm.forward(ids[0, :9].numpy(), n_out=0)  # prefill 9, then decode one at a time
    steps = np.stack([nm.forward(ids[0, i:i + 1].numpy())[0] for i in range(9, 23)])
    assert rel(steps, ref[9:]) < 1e-5
    assert nm.pos == 23


def test_hidden_states_equal_the_reference(model):
    nm = native.NativeModel.from_model(model, head="f32", max_len=32)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        ref = model.hidden_states(ids)[0].numpy()
    assert rel(nm.hidden(ids[0].numpy()), ref) < 1e-5


@pytest.mark.parametrize("head,tol", [("bf16", 1e-2), ("q8", 3e-2)])
def test_quantized_heads_stay_close(model, head, tol):
    nm = native.NativeModel.from_model(model, head=head, max_len=32)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    out = nm.forward(ids[0].numpy(), n_out=12)
    assert rel(out, ref) < tol
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_q8_head_rows_hand_case():
    e = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-3.0, 3.0, 1.5]], dtype=np.float32)
    q, s, rowsum = native.quantize_head_rows(e)
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 127, 64]]  # 63.5 -> 64, 31.75 -> 32
    assert np.allclose(s, [1 / 127, 1.0, 3 / 127]) and rowsum.tolist() == [95, 0, 64]


def test_context_overflow_and_bad_token_are_clear_errors(model):
    nm = native.NativeModel.from_model(model, head="f32", max_len=8)
    with pytest.raises(BitlmError, match="exceeds the context length 8"):
        nm.forward(np.arange(9))
    with pytest.raises(BitlmError, match="token id out of range"):
        nm.forward([model.config.vocab_size])
    assert nm.pos == 0  # nothing was consumed
