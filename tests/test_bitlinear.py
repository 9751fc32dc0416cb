"""BitLinear's training and packed forms against each other, and the HF packed layout bit by bit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitlm import quant
from bitlm.bitlinear import BitLinear, PackedBitLinear
from bitlm.formats import hf_packed


def test_hf_layout_golden_bytes():
    # The worked example in formats/hf_packed.py: out = 8, in = 1.
    w = np.array([[0], [-1], [1], [1], [-1], [0], [1], [-1]])
    packed = hf_packed.pack(w)
    assert packed.tolist() == [[0x89], [0x18]]
    assert hf_packed.unpack(packed, 8).tolist() == w.tolist()


@pytest.mark.parametrize("out_f,in_f", [(8, 3), (12, 7), (64, 33), (10, 5), (1, 4), (5, 2)])
def test_hf_layout_matches_transformers_packer(out_f, in_f):
    from transformers.integrations.bitnet import pack_weights
    w = torch.randint(-1, 2, (out_f, in_f))
    ours = hf_packed.pack(w.numpy())
    theirs = pack_weights(w.clone().to(torch.int8)).numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(hf_packed.unpack(ours, out_f), w.numpy())
    assert torch.equal(hf_packed.unpack_torch(torch.from_numpy(ours), out_f, torch.int8), w.to(torch.int8))


def test_unpack_rejects_code_three():
    with pytest.raises(ValueError, match="code 3"):
        hf_packed.unpack(np.array([[0xFF]], dtype=np.uint8), 4)


@pytest.mark.parametrize("out_f,in_f,batch", [(16, 32, (3,)), (13, 29, (2, 5)), (64, 128, (1,))])
def test_packed_equals_training_form(out_f, in_f, batch):
    lin = BitLinear(in_f, out_f)
    x = torch.randn(*batch, in_f) * 3
    y_train = lin(x)
    y_packed = lin.to_packed()(x)
    rel = (y_train - y_packed).abs().max() / y_train.abs().max()
    assert rel <= 1e-5


def test_integer_accumulation_is_exact():
    lin = BitLinear(300, 40).to_packed()
    xq = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    exact = xq.long() @ lin.codes(torch.int64).t()
    assert torch.equal(lin.int_matmul(xq).long(), exact)
    xq = torch.full((2, 300), -128, dtype=torch.int8)  # the extreme case
    assert torch.equal(lin.int_matmul(xq).long(), xq.long() @ lin.codes(torch.int64).t())


def test_gradient_equals_plain_linear_with_quantized_weights():
    torch.manual_seed(1)
    lin = BitLinear(24, 10)
    x = torch.randn(4, 24, requires_grad=True)
    g = torch.randn(4, 10)
    (lin(x) * g).sum().backward()

    wq = quant.fake_quant_weights(lin.weight).detach().requires_grad_(True)
    xq = quant.fake_quant_activations(x).detach().requires_grad_(True)
    (F.linear(xq, wq) * g).sum().backward()
    assert torch.allclose(lin.weight.grad, wq.grad, rtol=0, atol=1e-6)
    assert torch.allclose(x.grad, xq.grad, rtol=0, atol=1e-6)


def test_packed_to_latent_round_trip_keeps_codes_and_scale():
    p = BitLinear(40, 20).to_packed()
    back = p.to_latent().to_packed()
    assert torch.equal(back.weight, p.weight)
    assert torch.allclose(back.weight_scale, p.weight_scale, rtol=1e-6)


def test_packed_layer_shapes_and_dtype():
    p = PackedBitLinear(36, 10)
    assert p.weight.shape == (3, 36) and p.weight.dtype == torch.uint8
    y = p(torch.randn(2, 36).bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 10)
