"""Every sparse selector: a NaN/inf value at a key a row does not select never reaches that row.

Values do not steer any selection (the selectors read q and k), so a value planted at one key leaves
every selection unchanged: the rows whose selection omits that key must equal a clean run (output and
the gradients of q, k, v through a loss over those rows), and the rows that select it are NaN. Methods
with a dense selection are checked row by row against it; the others in causal mode with the planted
key last (no earlier row may see it).
"""

import pytest
import torch

import effattn.sparse as sparse

T, B, H, D = 128, 2, 2, 16
CASES = [(name, causal) for name, m in sorted(sparse.REGISTRY.items()) for causal in m.causal_modes]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name,causal", CASES)
def test_unselected_nonfinite_value_never_leaks(name, causal, poison):
    m = sparse.REGISTRY[name]
    params = m.make_params(T)
    q, k, v = _inputs()
    mask = m.dense_mask(q, k, causal=causal, **params) if m.dense_mask is not None else None
    if mask is None and not causal:
        pytest.skip(f"{name} has no dense selection; its causal mode is checked with the last key planted")
    pos = T - 1 if mask is None else 37
    v_bad = v.clone()
    v_bad[:, pos] = poison
    if mask is None:
        sees = torch.zeros(B, T, H, dtype=torch.bool)
        sees[:, pos:] = True  # only the last row may see the last key
        strict_nan = False  # whether the last row selects it is the method's business
    else:
        sees = mask[..., pos].expand(B, H, T).transpose(1, 2)  # [B, T, H]
        strict_nan = True
    assert (~sees).any()
    leaves_clean = [t.clone().requires_grad_(True) for t in (q, k, v)]
    leaves_bad = [t.clone().requires_grad_(True) for t in (q, k, v_bad)]
    o_clean = m.attend(*leaves_clean, causal=causal, **params)
    o_bad = m.attend(*leaves_bad, causal=causal, **params)
    clean = ~sees
    torch.testing.assert_close(o_bad[clean], o_clean[clean], atol=1e-6, rtol=1e-5)
    if strict_nan and sees.any():
        assert torch.isnan(o_bad[sees]).all()
    w = torch.randn(o_clean.shape, generator=torch.Generator().manual_seed(2)) * clean[..., None]
    g_clean = torch.autograd.grad((o_clean * w).sum(), leaves_clean)
    g_bad = torch.autograd.grad((o_bad.nan_to_num(0.0) * w).sum(), leaves_bad)
    for n, gc, gb in zip("qkv", g_clean, g_bad):
        assert torch.isfinite(gb).all(), f"{name}: d{n} not finite"
        if n == "v":
            gb, gc = gb.clone(), gc.clone()
            gb[:, pos], gc[:, pos] = 0, 0  # the planted value's own gradient is 0 by the rule
        torch.testing.assert_close(gb, gc, atol=1e-5, rtol=1e-4, msg=f"{name}: d{n}")
