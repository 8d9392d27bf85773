"""The ``MoE`` feed-forward layer: router, dispatcher and experts as separate pieces.

``y = sum_{(e, w) routed for x} w * expert_e(x) + sum_s shared_s(x)``

(routing: :mod:`effattn.moe.router`; dispatch: :mod:`effattn.moe.dispatch`; experts:
:mod:`effattn.moe.experts`; losses: :mod:`effattn.moe.losses`). Shared experts are always active
(Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models",
2024); ``shared_experts=s`` adds one dense SwiGLU of hidden size ``s * hidden``.

Expert parallelism (``ep_group``): the ``E`` experts are split into ``P`` equal contiguous shards, one
per rank of the group (rank ``r`` holds experts ``r*E/P .. (r+1)*E/P - 1``); the router and the shared
experts are replicated. Each rank routes its own tokens, the per-expert counts are exchanged with one
``all_to_all_single``, the tokens travel to the rank of their expert with a second one, the local
experts run on what arrives (regrouped by expert), and a third exchange brings the outputs back
(GShard 2020; Tutel, "Tutel: Adaptive Mixture-of-Experts at Scale", 2023). With ``ep_chunks=c > 1`` the
tokens are cut into ``c`` chunks and the exchange of chunk ``i+1`` (``async_op=True``) runs while the
experts compute chunk ``i``, and the return of chunk ``i`` while they compute chunk ``i+1`` (the
pipelining of FSMoE, 2025 and Tutel). The backward is the same exchanges in reverse, synchronous. With a
capacity factor, each rank applies the capacity to its own tokens before sending them (GShard's
per-group capacity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from effattn._checks import check_float, check_int, check_positive_int, check_tensor
from effattn.moe.comm import all_to_all
from effattn.moe.dispatch import capacity, capacity_keep, dispatch_combine
from effattn.moe.experts import EXPERT_KINDS, GEMM_IMPLS, Experts, SwiGLU
from effattn.moe.losses import load_balancing_loss, router_probs, z_loss
from effattn.moe.router import ROUTER_KINDS, ROUTINGS, Router

__all__ = ["MoE", "MoEAux", "LBL_SCOPES", "reset_lbl_stats", "update_bias"]

LBL_SCOPES = ("micro", "global")


@dataclass
class MoEAux:
    """Auxiliary losses and routing statistics of one :class:`MoE` call (``moe.last_aux``).

    ``loss = aux_loss_coef * lbl + z_loss_coef * z_loss`` (add it to the training loss); ``lbl`` the
    load-balancing loss (micro- or global-batch ``f``), ``z_loss`` the router z-loss;
    ``routed_per_expert [E]`` assignments chosen by the router, ``tokens_per_expert [E]`` those served
    (after capacity drops), ``dropped_fraction`` the share of assignments dropped, ``num_tokens`` the
    routed (valid) tokens of this rank, ``bytes_sent`` bytes this rank sent to other ranks by all-to-all
    (expert parallelism; 0 otherwise).
    """

    loss: torch.Tensor
    lbl: torch.Tensor
    z_loss: torch.Tensor
    routed_per_expert: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: float
    num_tokens: int
    bytes_sent: int = 0

    def max_over_mean_load(self) -> float:
        """``max_i tokens_i / mean_i tokens_i`` (1 = perfectly balanced)."""
        t = self.tokens_per_expert.double()
        return float(t.max() / t.mean()) if t.sum() > 0 else 1.0


def _group_size_rank(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class MoE(nn.Module):
    """Mixture-of-experts feed-forward layer ``x [B, T, dim] -> y [B, T, dim]``.

    Arguments: ``hidden`` is each expert's hidden size; ``router`` ``"softmax"`` or ``"sigmoid"``
    (DeepSeek-V3, with the balancing bias of :meth:`update_bias`); ``routing`` ``"token_choice"`` (top-k)
    or ``"expert_choice"``; ``capacity_factor=None`` dispatches dropless, a number sets GShard's capacity
    (token choice) or the expert-choice capacity; ``shared_experts`` always-on experts; ``expert``
    ``"swiglu"`` or ``"gelu"``; ``normalize`` renormalises the top-k weights; ``lbl_scope``
    ``"micro"`` or ``"global"`` and ``lbl_group`` the data-parallel group the global counts are
    all-reduced over (``None``: the default group when initialized); ``ep_group`` shards the experts
    over a process group, ``ep_chunks`` pipelines its exchanges; ``gemm`` the grouped-matmul form
    (``"auto"``, ``"grouped_mm"``, ``"loop"``).

    ``forward(x, valid=None)``: ``valid [B, T]`` bool marks real tokens; the others are not routed,
    count in no loss or statistic and get output 0. After each call ``last_aux`` holds a
    :class:`MoEAux`.

    >>> import torch
    >>> moe = MoE(16, 32, num_experts=4, top_k=2)
    >>> y = moe(torch.randn(2, 5, 16))
    >>> tuple(y.shape), moe.last_aux.tokens_per_expert.sum().item()
    ((2, 5, 16), 20)
    >>> (y.sum() + moe.last_aux.loss).backward()
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        router: str = "softmax",
        routing: str = "token_choice",
        capacity_factor: float | None = None,
        shared_experts: int = 0,
        expert: str = "swiglu",
        normalize: bool = True,
        lbl_scope: str = "micro",
        lbl_group=None,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        ep_group=None,
        ep_chunks: int = 1,
        gemm: str = "auto",
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("hidden", hidden)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        check_int("shared_experts", shared_experts, minimum=0)
        check_positive_int("ep_chunks", ep_chunks)
        for name, val, allowed in (
            ("router", router, ROUTER_KINDS),
            ("routing", routing, ROUTINGS),
            ("expert", expert, EXPERT_KINDS),
            ("lbl_scope", lbl_scope, LBL_SCOPES),
            ("gemm", gemm, GEMM_IMPLS),
        ):
            if val not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {val!r}")
        if capacity_factor is not None:
            check_float("capacity_factor", capacity_factor, 0.0, math.inf, lo_open=True)
        check_float("aux_loss_coef", aux_loss_coef, 0.0, math.inf)
        check_float("z_loss_coef", z_loss_coef, 0.0, math.inf)
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.routing, self.capacity_factor, self.lbl_scope = routing, capacity_factor, lbl_scope
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.lbl_group, self.ep_group, self.ep_chunks = lbl_group, ep_group, ep_chunks
        self.ep_size, self.ep_rank = 1, 0
        if ep_group is not None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("ep_group needs an initialized torch.distributed process group")
            self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
            if num_experts % self.ep_size:
                raise ValueError(
                    f"num_experts ({num_experts}) must be divisible by the expert-parallel group size "
                    f"({self.ep_size}): each rank holds num_experts / group_size experts"
                )
        self.local_experts = num_experts // self.ep_size
        self.router = Router(
            dim, num_experts, top_k, kind=router, routing=routing, normalize=normalize, capacity_factor=capacity_factor
        )
        self.experts = Experts(self.local_experts, dim, hidden, kind=expert, gemm=gemm)
        self.shared = SwiGLU(dim, hidden * shared_experts) if shared_experts else None
        # integer counts (assignments per expert, then tokens): model.to(dtype) leaves them exact
        self.register_buffer("lbl_counts", torch.zeros(num_experts + 1, dtype=torch.int64), persistent=False)
        self.last_aux: MoEAux | None = None

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Re-initialise the router and expert weights: normal with ``std`` (a model's own init scale, e.g.
        0.02) or, with ``None``, ``1/sqrt(fan_in)``; shared experts' linears likewise. Buffers are kept."""
        if std is not None:
            check_float("std", std, 0.0, math.inf, lo_open=True)
        for p, fan_in in (
            (self.router.weight, self.dim),
            (self.experts.w_in, self.dim),
            (self.experts.w_out, self.hidden),
        ):
            p.normal_(0.0, fan_in**-0.5 if std is None else std)
        if self.shared is not None:
            for lin in (self.shared.gate, self.shared.up, self.shared.down):
                lin.weight.normal_(0.0, lin.in_features**-0.5 if std is None else std)

    # -- training-loop hooks ------------------------------------------------------------------------------
    def reset_lbl_stats(self) -> None:
        """Start a new global batch: clear the expert counts that ``lbl_scope="global"`` accumulates over
        gradient-accumulation micro-batches (call before the first micro-batch of each optimizer step)."""
        self.lbl_counts.zero_()

    def update_bias(self, rate: float = 1e-3, group=None) -> torch.Tensor:
        """Auxiliary-loss-free balancing (DeepSeek-V3) step after ``optimizer.step()``; see
        :meth:`effattn.moe.Router.update_bias`."""
        return self.router.update_bias(rate, group)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, 3, "[batch, seq, dim]")
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"x must have last dim {self.dim} [batch, seq, dim], got shape {tuple(x.shape)}")
        flat = x.reshape(B * T, D)
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, T):
                raise ValueError(f"valid must be a bool tensor of shape {(B, T)}, got {valid!r:.60}")
            idx = valid.reshape(-1).nonzero().squeeze(1)
            xv = flat.index_select(0, idx)
        else:
            xv = flat
        yv = self._moe(xv)
        if self.shared is not None:
            yv = yv + self.shared(xv)
        if valid is not None:
            return flat.new_zeros(flat.shape).index_copy(0, idx, yv).view(B, T, D)
        return yv.view(B, T, D)

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        N, E, k = x.shape[0], self.num_experts, self.top_k
        rt = self.router(x)
        token, expert, weight = rt.token, rt.expert, rt.weight
        routed = torch.bincount(expert, minlength=E)
        if self.capacity_factor is not None and self.routing == "token_choice":
            keep = capacity_keep(expert, rt.priority, E, capacity(N, E, k, self.capacity_factor))
            token, expert, weight = token[keep], expert[keep], weight[keep]
        bytes_sent = 0
        if self.ep_group is not None:
            y, bytes_sent = self._expert_parallel(x, token, expert, weight)
        else:
            y = dispatch_combine(x, token, expert, weight, self.experts)
        served = torch.bincount(expert, minlength=E)
        lbl = self._lbl(router_probs(rt.scores, self.router.kind).sum(0), routed, N)
        zl = z_loss(rt.logits)
        total = max(int(routed.sum()), 1)
        self.last_aux = MoEAux(
            loss=self.aux_loss_coef * lbl + self.z_loss_coef * zl,
            lbl=lbl,
            z_loss=zl,
            routed_per_expert=routed,
            tokens_per_expert=served,
            dropped_fraction=1.0 - float(served.sum()) / total if routed.sum() > 0 else 0.0,
            num_tokens=N,
            bytes_sent=bytes_sent,
        )
        return y

    def _lbl(self, prob_sum: torch.Tensor, routed: torch.Tensor, n_tokens: int) -> torch.Tensor:
        if self.lbl_scope == "micro":
            return load_balancing_loss(prob_sum, n_tokens, routed, float(routed.sum()))
        world, _ = _group_size_rank(self.lbl_group)
        stats = torch.cat([routed.to(torch.int64), torch.tensor([n_tokens], dtype=torch.int64, device=routed.device)])
        if world > 1:
            dist.all_reduce(stats, group=self.lbl_group)
        if self.training and torch.is_grad_enabled():
            self.lbl_counts += stats
            acc = self.lbl_counts
        else:
            acc = stats
        counts = acc[:-1].to(prob_sum.dtype)
        # this rank's share of the call's global tokens: averaging the ranks' losses gives the loss of the
        # concatenated batch (what data-parallel gradient averaging does)
        return load_balancing_loss(prob_sum, float(stats[-1]) / world, counts, float(counts.sum()))

    def _expert_parallel(self, x, token, expert, weight) -> tuple[torch.Tensor, int]:
        P, L, group = self.ep_size, self.local_experts, self.ep_group
        c = self.ep_chunks
        N = x.shape[0]
        bounds = [(i * N) // c for i in range(c + 1)]
        chunks = []
        for i in range(c):
            sel = ((token >= bounds[i]) & (token < bounds[i + 1])).nonzero().squeeze(1)
            tok, exp, w = token[sel], expert[sel], weight[sel]
            order = torch.argsort(exp, stable=True)
            chunks.append((tok[order], exp[order], w[order], torch.bincount(exp, minlength=self.num_experts)))
        send_counts = torch.stack([ch[3] for ch in chunks])  # [c, E]
        send = send_counts.view(c, P, L).transpose(0, 1).contiguous()  # [P, c, L]: rows for each destination
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # recv[s, i, j]: from rank s, chunk i, my expert j
        itemsize = x.element_size() * x.shape[1]
        plans = []
        for i in range(c):
            in_splits = send[:, i].sum(1).tolist()
            rc = recv[:, i]  # [P, L]
            out_splits = rc.sum(1).tolist()
            seg = torch.repeat_interleave(torch.arange(P * L), rc.reshape(-1))
            perm = torch.argsort((seg % L) * P + seg // L, stable=True)  # (source, expert) -> (expert, source)
            plans.append((in_splits, out_splits, perm, rc.sum(0)))
        bytes_sent = 0
        for i in range(c):
            in_splits = plans[i][0]
            bytes_sent += 2 * itemsize * (sum(in_splits) - in_splits[self.ep_rank])
        if c == 1:
            in_splits, out_splits, perm, counts = plans[0]
            tok, _, w, _ = chunks[0]
            got = all_to_all(x[tok], out_splits, in_splits, group)
            out = got.new_zeros(got.shape).index_copy(0, perm, self.experts(got[perm], counts))
            back = all_to_all(out, in_splits, out_splits, group)
            return x.new_zeros(x.shape).index_add(0, tok, back * w[:, None].to(x.dtype)), bytes_sent
        # overlapped schedule: exchange of chunk i+1 and return of chunk i-1 in flight while chunk i computes
        dispatch_work: list = []
        combine_work: list = []
        received = [None] * c
        returned = [None] * c
        received[0] = all_to_all(x[chunks[0][0]], plans[0][1], plans[0][0], group, pending=dispatch_work)
        for i in range(c):
            dispatch_work[i].wait()
            if i + 1 < c:
                received[i + 1] = all_to_all(
                    x[chunks[i + 1][0]], plans[i + 1][1], plans[i + 1][0], group, pending=dispatch_work
                )
            in_splits, out_splits, perm, counts = plans[i]
            got = received[i]
            out = got.new_zeros(got.shape).index_copy(0, perm, self.experts(got[perm], counts))
            returned[i] = all_to_all(out, in_splits, out_splits, group, pending=combine_work)
        for wk in combine_work:
            wk.wait()
        y = x.new_zeros(x.shape)
        for i in range(c):
            tok, _, w, _ = chunks[i]
            y = y.index_add(0, tok, returned[i] * w[:, None].to(x.dtype))
        return y, bytes_sent

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"routing={self.routing!r}, capacity_factor={self.capacity_factor}, lbl_scope={self.lbl_scope!r}, "
            f"ep_size={self.ep_size}"
        )


def reset_lbl_stats(model: nn.Module) -> int:
    """:meth:`MoE.reset_lbl_stats` on every MoE layer of ``model`` (call before each optimizer step's first
    micro-batch when ``lbl_scope="global"``; without it the counts keep growing and ``f`` becomes a running
    frequency over all of training). Returns the number of MoE layers.

    >>> import torch
    >>> model = torch.nn.Sequential(MoE(8, 8, 2, 1, lbl_scope="global"), MoE(8, 8, 2, 1))
    >>> reset_lbl_stats(model)
    2
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in layers:
        m.reset_lbl_stats()
    return len(layers)


def update_bias(model: nn.Module, rate: float = 1e-3, group=None) -> int:
    """DeepSeek-V3's balancing step (:meth:`MoE.update_bias`) on every sigmoid-routed MoE layer of ``model``;
    call after ``optimizer.step()``. Returns the number of layers updated."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.router.kind == "sigmoid"]
    for m in layers:
        m.update_bias(rate, group)
    return len(layers)
