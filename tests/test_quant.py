"""The quantization math against hand-computed cases (REFERENCE.md formulas)."""

import torch

from bitlm import quant


def test_absmean_ternary_hand_case():
    w = torch.tensor([[0.2, -0.8], [1.6, 0.0]])
    codes, scale = quant.quantize_weights(w)
    # mean|W| = 2.6 / 4 = 0.65; W / 0.65 = [0.31, -1.23, 2.46, 0] -> round, clamp -> [0, -1, 1, 0]
    assert torch.equal(codes, torch.tensor([[0, -1], [1, 0]], dtype=torch.int8))
    assert abs(float(scale) - 0.65) < 1e-7
    assert torch.allclose(quant.fake_quant_weights(w), torch.tensor([[0.0, -0.65], [0.65, 0.0]]))


def test_weight_rounding_boundary_is_half_to_even():
    # mean|W| = 1 exactly: codes are round(W): 0.5 -> 0, -0.5 -> 0, 1.5 -> 2 -> clamp 1, -1.5 -> -1
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5]])
    codes, scale = quant.quantize_weights(w)
    assert float(scale) == 1.0
    assert codes.tolist() == [[0, 0, 1, -1]]


def test_all_zero_weights_use_the_floor_scale():
    codes, scale = quant.quantize_weights(torch.zeros(3, 5))
    assert float(scale) == torch.tensor(1e-5).item()
    assert not codes.any()
    assert not quant.fake_quant_weights(torch.zeros(3, 5)).any()


def test_activation_hand_case_and_rounding_boundary():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0]])
    xq, s = quant.quantize_activations(x)
    assert s.tolist() == [[1.0]]  # 127 / max|x| = 127 / 127
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, -127]]  # half to even, as torch.round


def test_activation_scale_is_per_token():
    x = torch.tensor([[1.0, -0.5], [0.0, 4.0]])
    xq, s = quant.quantize_activations(x)
    assert torch.allclose(s, torch.tensor([[127.0], [127.0 / 4]]))
    assert xq.tolist() == [[127, -64], [0, 127]]  # -0.5 * 127 = -63.5 -> -64 (even)


def test_all_zero_token_and_single_huge_value():
    x = torch.tensor([[0.0, 0.0, 0.0], [1e30, 1.0, -1.0]])
    xq, s = quant.quantize_activations(x)
    assert xq[0].tolist() == [0, 0, 0] and float(s[0]) == float(torch.tensor(127.0) / torch.tensor(1e-5))
    assert xq[1].tolist() == [127, 0, 0]
    assert torch.isclose(quant.fake_quant_activations(x)[1, 0], torch.tensor(1e30), rtol=1e-6)
    assert torch.isfinite(quant.fake_quant_activations(x)).all()


def test_statistics_in_float32_for_bf16_input():
    x = torch.randn(4, 64).bfloat16()
    xq, s = quant.quantize_activations(x)
    xq32, s32 = quant.quantize_activations(x.float())
    assert torch.equal(xq, xq32) and torch.equal(s, s32) and s.dtype == torch.float32
    assert quant.fake_quant_activations(x).dtype == torch.bfloat16


def test_straight_through_estimator():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    y = quant.ste_activations(x)
    assert torch.equal(y, quant.fake_quant_activations(x))  # forward is the quantized value exactly
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(3, 8))  # backward is the identity
    v = quant.ste_weights(w)
    assert torch.equal(v, quant.fake_quant_weights(w))
    v.sum().backward()
    assert torch.equal(w.grad, torch.ones(5, 8))


def test_strength_blends_latent_and_quantized():
    w = torch.randn(4, 4)
    q = quant.fake_quant_weights(w)
    assert torch.allclose(quant.ste_weights(w, 0.25), w + 0.25 * (q - w))
    assert torch.equal(quant.ste_weights(w, 0.0), w)
