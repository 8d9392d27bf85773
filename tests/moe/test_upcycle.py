"""Sparse upcycling: the first forward of the upcycled MoE equals the dense SwiGLU it came from."""

import doctest
import importlib

import pytest
import torch
from torch import nn

from effattn.moe import SwiGLU, upcycle
from tests.helpers import assert_fp32_close


@pytest.mark.parametrize("E,k,router", [(4, 1, "softmax"), (8, 2, "softmax"), (6, 3, "sigmoid")])
@pytest.mark.parametrize("source", ["moe", "nn"])
def test_first_forward_equals_dense(E, k, router, source):
    if source == "nn":  # the LM's own MLP block
        from effattn.nn.lm import SwiGLU as cls
    else:
        cls = SwiGLU
    torch.manual_seed(0)
    dense = cls(12, 20)
    moe = upcycle(dense, E, k, router=router)
    x = torch.randn(3, 7, 12, requires_grad=True)
    y, y_dense = moe(x), dense(x)
    assert_fp32_close(y, y_dense)
    # every expert was used and the experts are exact copies
    assert torch.equal(moe.experts.w_out[0], moe.experts.w_out[-1])
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_dense,) = torch.autograd.grad(y_dense, x, g)
    assert_fp32_close(gx, gx_dense, 1e-4, name="dx")


def test_hf_names_and_errors():
    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
            self.down_proj = nn.Linear(4, 8, bias=False)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(1)
    dense = Llama()
    x = torch.randn(1, 5, 8)
    assert_fp32_close(upcycle(dense, 4, 2)(x), dense(x))
    with pytest.raises(TypeError, match="SwiGLU"):
        upcycle(nn.Linear(8, 8), 4, 2)
    with pytest.raises(ValueError, match="normalize"):
        upcycle(dense, 4, 2, normalize=False)
    with pytest.raises(ValueError, match="capacity_factor"):
        upcycle(dense, 4, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense, 2, 3)


def test_docstring_example():
    assert doctest.testmod(importlib.import_module("effattn.moe.upcycling")).failed == 0
