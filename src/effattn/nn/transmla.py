"""TransMLA compression: a GQA layer turned into a smaller-cache MLA layer (Meng et al. 2025,
"TransMLA: Multi-Head Latent Attention Is All You Need").

:func:`~effattn.nn.mla_from_gqa` is the exact first step (GQA is MLA with the latent ``[W_k x ; W_v x]``)
and saves nothing. :func:`transmla_from_gqa` is the paper's compression, fitted on calibration inputs
``x`` of the layer (``G`` kv heads, head width ``d``, RoPE on ``d_rot`` channels with frequencies
``theta_i``, ``i < d_rot / 2``):

1. **RoRoPE.** RoPE rotates the pair ``(k_{g,i}, k_{g,i + d_rot/2})`` of every kv head ``g`` by the same
   angle ``n theta_i``, so an orthogonal mixing ``U_i`` (``G x G``) of the heads, applied to both halves
   of the pair, commutes with it: ``k'_{j,i} = sum_g U_i[g, j] k_{g,i}``. ``U_i`` is the PCA of the
   pair over heads, ``C_i = sum_x (a a^T + b b^T)`` with ``a = k_{:,i}``, ``b = k_{:,i + d_rot/2}``
   (eigenvectors by falling eigenvalue), so component ``j = 0`` holds the most energy. The query of head
   ``h`` (kv head ``g``) sees component ``j`` with weight ``U_i[g, j]``; the scores are unchanged.
2. Keep RoPE on the first ``rope_heads`` components of every frequency (one shared decoupled RoPE key of
   ``d_r = rope_heads * d_rot`` channels, as MLA's ``k_pe``); the other components **lose their rotation**
   and join the no-RoPE part of the key (the paper's approximation; exact when ``rope_heads = G``).
3. **Joint K/V latent by PCA.** ``c = [k'_{j >= rope_heads} ; k_{no-RoPE channels} ; v]`` (width ``W``,
   linear in ``x``) is replaced by its projection on the top ``rank`` eigenvectors ``U_r`` of the second
   moment ``sum_x c c^T``: ``c_kv = U_r^T c`` is cached, and ``W_uk_h``/``W_uv_h`` read keys and values
   back through ``U_r``. **Balanced K/V** (the paper's BKV, ``balance=True``): the key rows are divided
   by ``alpha = ||K||_F / ||V||_F`` (over the calibration set) before the PCA and multiplied back in the
   up-projection, so the keys do not dominate the shared basis.

The cache per token holds ``rank + rope_heads * d_rot`` numbers instead of ``2 G d``
(:meth:`MLA.state_size`); ``rank = W`` and ``rope_heads = G`` is an orthogonal change of basis, equal
to the GQA layer up to float rounding. The converted layer's queries are ``[q_h ; U_i[g, :m] q_{h,i}]``
(no extra work at inference beyond MLA's), and the absorbed decode works (no rotation sits between
``W_uk`` and the score).

Not done (choices stated): the paper's FreqFold (grouping neighbouring frequencies in one PCA) and the
fine-tuning after conversion; the PCA is uncentred (the optimal rank-``r`` reconstruction of ``c`` in
the mean square over the calibration set). :func:`attention_from_llama` reads a Hugging Face
Llama-architecture attention module (``q/k/v/o_proj``, default RoPE) into an :class:`Attention` with
the same weights, so the same conversion applies to HF checkpoints.
"""

from __future__ import annotations

import torch

from effattn._checks import check_int
from effattn.nn.attention import Attention
from effattn.nn.mla import MLA
from effattn.nn.rope import RotaryEmbedding

__all__ = ["attention_from_llama", "transmla_cache_bytes", "transmla_from_gqa", "transmla_latent_width"]


def _check_layer(attn: Attention) -> None:
    if not isinstance(attn, Attention):
        raise TypeError(f"attn must be an effattn.nn.Attention, got {type(attn).__name__}")
    bad = [
        n
        for n, on in (
            ("qk_norm", attn.q_norm is not None),
            ("sinks", attn.sinks is not None),
            ("mask_mod", attn.mask_mod is not None),
            ("score_mod", attn.score_mod is not None),
        )
        if on
    ]
    if bad:
        raise ValueError(f"transmla_from_gqa cannot convert a layer with {', '.join(bad)}")


def _rot_dim(attn: Attention) -> int:
    return 0 if attn.rope is None else attn.rope.rot_dim


def transmla_latent_width(attn: Attention, rope_heads: int = 1) -> int:
    """``W``: the width of the joint latent before truncation, ``(G - rope_heads) d_rot + G (d - d_rot)
    + G d`` (the largest useful ``rank``).

    Example::

        >>> transmla_latent_width(Attention(64, 4, kv_heads=2), rope_heads=1)
        48
    """
    G, hd, rot = attn.kv_heads, attn.head_dim, _rot_dim(attn)
    m = _check_rope_heads(rope_heads, G, rot)
    return (G - m) * rot + G * (hd - rot) + G * hd


def transmla_cache_bytes(rank: int, rope_heads: int, rot_dim: int, *, tokens: int = 1, element_size: int = 4) -> int:
    """Cache bytes of a converted layer: ``tokens * (rank + rope_heads * rot_dim) * element_size``
    (against ``tokens * 2 * G * d * element_size`` for the GQA layer).

    Example::

        >>> transmla_cache_bytes(16, 1, 16, tokens=10)
        1280
    """
    return tokens * (rank + rope_heads * rot_dim) * element_size


def _check_rope_heads(rope_heads: int, G: int, rot: int) -> int:
    check_int("rope_heads", rope_heads, minimum=0)
    if rot and rope_heads > G:
        raise ValueError(f"rope_heads must lie in [0, kv_heads={G}], got {rope_heads}")
    return rope_heads if rot else 0


def _affine(lin: torch.nn.Linear) -> torch.Tensor:
    """``[W | b]`` in float64 (a zero bias column when there is none)."""
    W = lin.weight.double()
    b = lin.bias.double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.cat([W, b[:, None]], 1)


@torch.no_grad()
def transmla_from_gqa(
    attn: Attention,
    calib: torch.Tensor,
    *,
    rank: int | None = None,
    rope_heads: int = 1,
    balance: bool = True,
) -> MLA:
    """Compress the GQA/MQA/MHA layer ``attn`` into an :class:`MLA` layer by RoRoPE and a joint K/V
    PCA fitted on ``calib`` (inputs of the layer, ``[..., dim]``), as TransMLA (Meng et al. 2025,
    "TransMLA: Multi-Head Latent Attention Is All You Need"); the steps are in the module docstring.

    Args:
        attn: the layer (no qk_norm, sinks or mods).
        calib: calibration inputs ``[..., dim]`` (any leading shape; padding rows must be left out).
        rank: latent width ``r`` (``1 <= r <= W``, :func:`transmla_latent_width`); ``None``: ``W``.
        rope_heads: components per frequency that keep RoPE (``0 <= m <= kv_heads``); the cache's
            decoupled RoPE key has ``m * d_rot`` channels. Ignored (0) for a layer without RoPE.
        balance: divide the key rows by ``||K|| / ||V||`` before the PCA (the paper's BKV).

    Cache per token: ``r + m d_rot`` numbers (:func:`transmla_cache_bytes`).

    Example::

        >>> gqa = Attention(32, 4, kv_heads=2)
        >>> x = torch.randn(2, 40, 32)
        >>> mla = transmla_from_gqa(gqa, x, rope_heads=2)      # full rank, every RoPE component kept
        >>> torch.allclose(mla(x)[0], gqa(x)[0], atol=1e-5)
        True
        >>> small = transmla_from_gqa(gqa, x, rank=12)
        >>> small.state_size(1, 1), gqa.state_size(1, 1)
        (80, 128)
    """
    _check_layer(attn)
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[-1] != attn.dim:
        raise ValueError(f"calib must have shape [..., dim={attn.dim}], got {getattr(calib, 'shape', calib)!r}")
    if not bool(torch.isfinite(calib).all()):
        raise ValueError("calib must be finite")
    if not isinstance(balance, bool):
        raise TypeError(f"balance must be a bool, got {balance!r}")
    H, G, hd, rot = attn.heads, attn.kv_heads, attn.head_dim, _rot_dim(attn)
    m = _check_rope_heads(rope_heads, G, rot)
    width = (G - m) * rot + G * (hd - rot) + G * hd
    rank = width if rank is None else rank
    check_int("rank", rank, minimum=1)
    if rank > width:
        raise ValueError(f"rank must be <= the latent width {width} (kv_heads={G}, head_dim={hd}), got {rank}")
    half, rep = rot // 2, H // G
    ref = attn.q_proj.weight
    dev = ref.device
    X = calib.reshape(-1, attn.dim).to(dev).double()
    X = torch.cat([X, torch.ones(X.shape[0], 1, device=dev, dtype=X.dtype)], 1)  # affine: [x | 1]
    Aq, Ak, Av = _affine(attn.q_proj), _affine(attn.k_proj), _affine(attn.v_proj)  # [rows, dim + 1]
    Ak3, Aq3 = Ak.view(G, hd, -1), Aq.view(H, hd, -1)

    # 1. RoRoPE: per frequency, PCA of the (a, b) pair over the kv heads -> U [half, G, G]
    K = (X @ Ak.T).view(-1, G, hd)
    U = torch.zeros(half, G, G, dtype=torch.float64, device=dev)
    for i in range(half):
        a, b = K[:, :, i], K[:, :, i + half]
        _, vecs = torch.linalg.eigh(a.T @ a + b.T @ b)
        U[i] = vecs.flip(-1)  # columns by falling eigenvalue
    # component rows: comp[j, i, side] = sum_g U[i, g, j] * Ak3[g, i + side * half]
    comp = torch.stack([torch.einsum("igj,gie->jie", U, Ak3[:, s * half : (s + 1) * half]) for s in (0, 1)], 2)

    # 2./3. the latent c = [components j >= m (a rows, b rows) ; no-RoPE channels ; v]
    k_rows = [comp[m:, :, 0].reshape(-1, X.shape[1]), comp[m:, :, 1].reshape(-1, X.shape[1])]
    k_rows.append(Ak3[:, rot:].reshape(-1, X.shape[1]))
    Ck = torch.cat(k_rows, 0)  # [W_k, dim + 1]
    Ac = torch.cat([Ck, Av], 0)  # [W, dim + 1]
    nk = Ck.shape[0]
    scale_rows = torch.ones(width, dtype=torch.float64, device=dev)
    if balance and nk:
        kn, vn = (X @ Ck.T).norm(), (X @ Av.T).norm()
        if kn > 0 and vn > 0:
            scale_rows[:nk] = vn / kn
    C = X @ (Ac * scale_rows[:, None]).T
    _, vecs = torch.linalg.eigh(C.T @ C)
    Ur = vecs.flip(-1)[:, :rank]  # [W, r]
    down = Ur.T @ (Ac * scale_rows[:, None])  # [r, dim + 1]
    up = Ur / scale_rows[:, None]  # c ~= up @ c_kv

    # read-back maps S_h: latent c -> no-RoPE key of head h (d rows), and v of kv head g
    n_comp = (G - m) * half
    Sk = torch.zeros(G, hd, width, dtype=torch.float64, device=dev)
    for g in range(G):
        for s in (0, 1):  # a rows at [0, n_comp), b rows at [n_comp, 2 n_comp): index (j - m) * half + i
            idx = s * n_comp + torch.arange(n_comp, device=dev)
            ch = s * half + torch.arange(half, device=dev).repeat(G - m)
            Sk[g, ch, idx] = U[:, g, m:].T.reshape(-1)
        nope = torch.arange(hd - rot, device=dev)
        Sk[g, rot + nope, 2 * n_comp + g * (hd - rot) + nope] = 1.0
    W_uk = torch.einsum("gdw,wr->gdr", Sk, up)
    W_uv = up[nk:].view(G, hd, rank)

    dr = m * rot
    mla = MLA(
        attn.dim,
        H,
        kv_lora_rank=rank,
        qk_nope_head_dim=hd,
        qk_rope_head_dim=dr,
        v_head_dim=hd,
        rope_base=attn.rope.base if attn.rope is not None else 10000.0,
        kv_norm=False,
        causal=attn.causal,
        window=attn.window,
        softcap=attn.softcap,
        backend=attn.backend,
        bias=attn.q_proj.bias is not None,
    ).to(device=dev, dtype=ref.dtype)
    mla.scale = hd**-0.5  # the GQA layer's scale: the extra query channels split its scores, not add to them
    # queries of head h: [q_h ; for s, j < m, i: U[i, g, j] * q_{h, s * half + i}]
    gidx = torch.arange(H, device=dev) // rep
    Ug = U[:, gidx, :m]  # [half, H, m]
    q_pe = [
        torch.einsum("ihj,hie->hjie", Ug, Aq3[:, s * half : (s + 1) * half]).reshape(H, m * half, X.shape[1])
        for s in (0, 1)
    ]
    Aq_new = torch.cat([Aq3, q_pe[0], q_pe[1]], 1).reshape(H * (hd + dr), -1)
    Akpe = torch.cat([comp[:m, :, 0].reshape(-1, X.shape[1]), comp[:m, :, 1].reshape(-1, X.shape[1])], 0)
    Adown = torch.cat([down, Akpe], 0)
    mla.q_proj.weight.copy_(Aq_new[:, :-1])
    mla.kv_down.weight.copy_(Adown[:, :-1])
    if attn.q_proj.bias is not None:
        mla.q_proj.bias.copy_(Aq_new[:, -1])
        mla.kv_down.bias.copy_(Adown[:, -1])
        mla.o_proj.bias.copy_(attn.o_proj.bias)
    mla.o_proj.weight.copy_(attn.o_proj.weight)
    Wk, Wv = mla._up_weights()
    Wk.copy_(W_uk[gidx])
    Wv.copy_(W_uv[gidx])
    if dr:
        mla.rope = RotaryEmbedding(dr, attn.rope.base)
        mla.rope.inv_freq = attn.rope.inv_freq.repeat(m)  # component j, frequency i at (j, i)
    return mla


def attention_from_llama(hf_attn: torch.nn.Module) -> Attention:
    """An :class:`Attention` with the weights of a Hugging Face Llama-architecture attention module
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and its ``config``: heads, kv heads, head_dim,
    default RoPE with ``rope_theta`` and ``partial_rotary_factor``), computing the same causal
    attention (HF's rotate-half RoPE is this library's convention). Read by duck typing; transformers
    is not imported. Then :func:`transmla_from_gqa` compresses it.

    Example::

        >>> from transformers import LlamaConfig
        >>> from transformers.models.llama.modeling_llama import LlamaAttention
        >>> cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
        >>> attention_from_llama(LlamaAttention(cfg, 0)).kv_heads
        2
    """
    cfg = getattr(hf_attn, "config", None)
    if cfg is None or not all(hasattr(hf_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise TypeError(f"hf_attn must be a Llama-style attention module with a config, got {type(hf_attn).__name__}")
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    if rp.get("rope_type", "default") != "default":
        raise ValueError(f"only the default RoPE is supported, got rope_type={rp.get('rope_type')!r}")
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    fraction = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    hd = getattr(hf_attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bias = hf_attn.q_proj.bias is not None
    attn = Attention(
        cfg.hidden_size,
        cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=hd,
        rope_base=theta,
        rope_fraction=fraction,
        bias=bias,
    ).to(device=hf_attn.q_proj.weight.device, dtype=hf_attn.q_proj.weight.dtype)
    with torch.no_grad():
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(attn, n).weight.copy_(getattr(hf_attn, n).weight)
            if bias and getattr(hf_attn, n).bias is not None:
                getattr(attn, n).bias.copy_(getattr(hf_attn, n).bias)
    return attn
