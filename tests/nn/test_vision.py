"""Vision attention: cascaded group attention (EfficientViT) and single-head attention (SHViT)."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.nn.vision
from effattn.nn.vision import CascadedGroupAttention, SingleHeadAttention
from tests.helpers import assert_fp32_close

DIM = 32


def _x(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _softmax_attn(q, k, v):
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v


@pytest.mark.parametrize("cls", [CascadedGroupAttention, SingleHeadAttention])
def test_shapes_and_grid_equals_sequence(cls):
    torch.manual_seed(0)
    layer = cls(DIM, 4) if cls is CascadedGroupAttention else cls(DIM, partial=8)
    x = _x(2, 5, 6, DIM)
    y = layer(x)
    assert y.shape == x.shape
    y_seq = layer(x.flatten(1, 2))
    assert y_seq.shape == (2, 30, DIM)
    assert_fp32_close(y.flatten(1, 2), y_seq, tol=1e-6)
    assert_fp32_close(layer(x.flatten(1, 2), grid=(5, 6)), y_seq, tol=1e-6)


def test_cascaded_matches_formula_and_dw_conv_grid():
    torch.manual_seed(0)
    cga = CascadedGroupAttention(DIM, 4, key_dim=6)
    x = _x(2, 12, DIM)
    outs, prev = [], None
    for i, chunk in enumerate(x.split(8, -1)):
        inp = chunk if prev is None else chunk + prev
        q, k, v = cga.qkv[i](inp).split([6, 6, 8], -1)
        prev = _softmax_attn(q, k, v)
        outs.append(prev)
    assert_fp32_close(cga(x), cga.proj(torch.relu(torch.cat(outs, -1))))
    dw = CascadedGroupAttention(DIM, 4, dw_kernel=3)
    g = _x(2, 4, 5, DIM)
    assert_fp32_close(dw(g).flatten(1, 2), dw(g.flatten(1, 2), grid=(4, 5)), tol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        dw(g.flatten(1, 2))


def test_cascade_changing_head_i_input_affects_later_heads_only():
    torch.manual_seed(0)
    cga = CascadedGroupAttention(DIM, 4)
    x = _x(1, 9, DIM)
    base = cga.head_outputs(x)
    i = 1
    x2 = x.clone()
    x2[..., i * 8 : (i + 1) * 8] += 1.0  # head i's channel split
    new = cga.head_outputs(x2)
    for j in range(4):
        if j < i:
            assert torch.equal(new[j], base[j]), f"head {j} < {i} changed"
        else:
            assert (new[j] - base[j]).abs().max() > 1e-4, f"head {j} >= {i} did not change"


def test_shvit_full_partial_equals_single_head_attention():
    torch.manual_seed(0)
    layer = SingleHeadAttention(DIM, partial=DIM, qk_dim=8, pre_norm=False, activation=False)
    x = _x(2, 14, DIM)
    q, k, v = layer.qkv(x).split([8, 8, DIM], -1)
    assert_fp32_close(layer(x), layer.proj(_softmax_attn(q, k, v)))


def test_shvit_partial_passes_rest_through():
    torch.manual_seed(0)
    layer = SingleHeadAttention(DIM, partial=8, qk_dim=8)
    x = _x(2, 14, DIM)
    xa = torch.nn.functional.group_norm(x[..., :8].transpose(1, 2), 1, layer.norm.weight, layer.norm.bias)
    q, k, v = layer.qkv(xa.transpose(1, 2)).split([8, 8, 8], -1)
    ref = layer.proj(torch.relu(torch.cat([_softmax_attn(q, k, v), x[..., 8:]], -1)))
    assert_fp32_close(layer(x), ref)
    # the untouched channels enter only through the projection: tokens do not mix them
    x2 = x.clone()
    x2[:, 0, 8:] += 1.0
    d = (layer(x2) - layer(x)).abs().amax(-1)
    assert d[:, 0].min() > 1e-4 and d[:, 1:].max() == 0


def test_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        CascadedGroupAttention(30, 4)
    with pytest.raises(ValueError, match="dw_kernel"):
        CascadedGroupAttention(DIM, 4, dw_kernel=2)
    with pytest.raises(ValueError, match="partial"):
        SingleHeadAttention(DIM, partial=40)
    layer = SingleHeadAttention(DIM)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="grid"):
        layer(torch.randn(2, 10, DIM), grid=(3, 3))
    with pytest.raises(TypeError, match="x must be"):
        layer([1, 2])


def test_docstring_examples_run():
    res = doctest.testmod(effattn.nn.vision, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
