"""An analytic model of compute and communication time for sequence-parallel attention.

Gloo over loopback on a CPU says nothing about speed on a GPU cluster, so speed at scale is this
model: one attention layer's forward pass on ``P`` devices at a total sequence length ``T``, from
published FLOP rates and link bandwidths. All times are seconds; ``c = T / P`` is the block (shard)
length; ``b`` bytes per element of q/k/v/o; ``R = flops * efficiency`` the achieved FLOP rate; ``W``
the link bandwidth per device in one direction (NVLink inside a node of ``devices_per_node``
devices, InfiniBand across nodes; a ring that spans nodes is paced by its inter-node hops).

Compute (softmax attention, FLOPs of ``QK^T`` and ``PV``; causal halves it)::

    F = 4 B T^2 H D * (1/2 if causal),      compute time  t_c = F / (P R)

Ring attention (Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for
Near-Infinite Context", 2023; zigzag layout for causal balance): ``P - 1`` steps, each passes one
K/V block of ``m = 2 B c H_kv D b`` bytes while the current block is computed
(``t_c / P`` per step). Communication hides when ``m / W <= t_c / P``, i.e. when the block is at
least::

    c_min = (b H_kv / (2 f H)) * R / W        (f = 1/2 causal, 1 otherwise)

which for ``H_kv = H``, ``b = 2``, non-causal is the paper's condition ``c >= F/B`` (FLOP rate over
bandwidth). Time: ``t_c + (P - 1) max(0, m / W - t_c / P)``.

TokenRing (Wang et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs
via Bidirectional Communication", 2024): queries travel one way (``B c H D b`` bytes per step) while
partial outputs and their log-sum-exp travel the other (``B c H (D b + 4)``), using both directions
of every link: per step ``max(q, o + lse) / W``, same overlap rule as the ring. It beats the ring
when the link is the bottleneck and ``H_kv = H`` (it sends half as much per direction); with GQA
(``2 H_kv < H``) the ring sends less.

Ulysses (Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models", 2023): all-to-alls of q, k, v in and o out, each device sending
``(P-1)/P`` of ``B c (2 H + 2 H_kv) D b`` bytes (k/v heads replicated up to ``P`` when
``H_kv < P``); not overlapped with compute: ``t_c + bytes / W_a2a``. Across nodes the all-to-all
sends ``(P - n)/P`` of its data over InfiniBand and ``(n - 1)/P`` over NVLink at the same time
(``n`` devices per node), taking the longer of the two. Needs ``P <= H``; beyond that combine it
with a ring (USP).

LASP-2 (Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid",
2025) for a linear-attention layer (chunk size ``C``): compute ``B T H (4 C D + 4 D^2) / (P R)``
(intra-chunk ``QK^T``, ``AV`` and the state products), communication one all-gather of ``P``
float32 states ``B H D^2 * 4`` bytes: ``(P - 1) s / W``, independent of ``T``; counted as not
overlapped. LASP-1 (the sequential pass the delta-rule family uses here) runs the ``P`` shards one
after the other: ``P`` times the per-shard compute plus ``P - 1`` state messages.

Hardware defaults (:data:`H100_CLUSTER`), from vendors' published figures: NVIDIA H100 SXM5
datasheet: 989 TFLOP/s dense bf16 (1,979 with 2:4 sparsity), NVLink 4 at 900 GB/s per GPU
bidirectional (450 GB/s each way); NVIDIA Quantum-2 / ConnectX-7 InfiniBand NDR at 400 Gb/s
(50 GB/s each way) per port, one port per GPU (DGX H100: 8 GPUs per node). Attention kernels reach
about 75% of the bf16 peak (Shah et al., "FlashAttention-3", 2024: up to 740 TFLOP/s), the default
``efficiency``. Links are taken at their peak rate (real collectives reach roughly 70-90% of it),
and latencies are ignored, which favours small messages (LASP-2 at 1,024 devices) slightly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from effattn._checks import check_positive_int

__all__ = [
    "H100_CLUSTER",
    "METHODS",
    "Estimate",
    "Hardware",
    "Workload",
    "attention_flops",
    "estimate",
    "linear_attention_flops",
    "markdown_table",
    "ring_min_block",
    "sweep",
]


@dataclass(frozen=True)
class Hardware:
    """One device type and its links: ``flops`` (dense FLOP/s), ``efficiency`` (fraction of it an
    attention kernel reaches), ``intra_bw``/``inter_bw`` (bytes/s per device, one direction, inside
    a node and across nodes), ``devices_per_node``."""

    name: str
    flops: float
    intra_bw: float
    inter_bw: float
    devices_per_node: int = 8
    efficiency: float = 0.75

    @property
    def rate(self) -> float:
        """The achieved FLOP rate ``R = flops * efficiency``."""
        return self.flops * self.efficiency

    def bandwidth(self, devices: int) -> float:
        """The per-device link bandwidth that paces a ring over ``devices`` devices."""
        return self.intra_bw if devices <= self.devices_per_node else self.inter_bw


H100_CLUSTER = Hardware(
    name="H100 SXM, NVLink 4 (450 GB/s each way) in nodes of 8, InfiniBand NDR (50 GB/s) across",
    flops=989e12,
    intra_bw=450e9,
    inter_bw=50e9,
    devices_per_node=8,
    efficiency=0.75,
)


@dataclass(frozen=True)
class Workload:
    """One attention layer's forward pass: total ``seq_len`` tokens, ``batch``, ``heads`` query
    heads, ``kv_heads``, ``head_dim``, ``bytes_per_element`` (2 for bf16), ``causal``, and the
    linear-attention ``chunk`` size for LASP."""

    seq_len: int
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    batch: int = 1
    bytes_per_element: int = 2
    causal: bool = True
    chunk: int = 64


@dataclass(frozen=True)
class Estimate:
    """The model's answer for one method at ``devices`` devices (seconds, bytes per device)."""

    method: str
    devices: int
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    total_s: float
    bytes_sent: float
    feasible: bool = True
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


METHODS = ("ring", "token_ring", "ulysses", "lasp2", "lasp1")


def attention_flops(w: Workload) -> float:
    """``4 B T^2 H D``, halved when causal (matmul FLOPs of ``QK^T`` and ``PV``).

    >>> attention_flops(Workload(seq_len=1024, heads=2, kv_heads=2, head_dim=8, causal=False))
    67108864.0
    """
    f = 4.0 * w.batch * w.seq_len**2 * w.heads * w.head_dim
    return f / 2 if w.causal else f


def linear_attention_flops(w: Workload) -> float:
    """Chunked linear attention: ``B T H (4 C D + 4 D^2)`` (``QK^T`` and ``AV`` inside chunks of
    ``C``, ``q S`` and the ``k^T v`` state update)."""
    D = w.head_dim
    return float(w.batch * w.seq_len * w.heads * (4 * w.chunk * D + 4 * D * D))


def ring_min_block(hw: Hardware, w: Workload, devices: int) -> float:
    """The smallest block ``c = T/P`` (tokens) for which ring attention's K/V passing hides behind
    the block computation: ``c >= (b H_kv / (2 f H)) R / W`` (``f = 1/2`` causal).

    >>> hw = Hardware("toy", flops=1e12, intra_bw=1e9, inter_bw=1e8, devices_per_node=4, efficiency=1.0)
    >>> ring_min_block(hw, Workload(seq_len=1024, heads=2, kv_heads=2, head_dim=8, causal=False), 4)
    1000.0
    """
    f = 0.5 if w.causal else 1.0
    return (w.bytes_per_element * w.kv_heads / (2 * f * w.heads)) * hw.rate / hw.bandwidth(devices)


def _ring_like(method, P, hw, w, step_bytes_fwd, step_bytes_bwd, t_c):
    W = hw.bandwidth(P)
    step_comm = max(step_bytes_fwd, step_bytes_bwd) / W
    step_compute = t_c / P
    exposed = (P - 1) * max(0.0, step_comm - step_compute)
    return Estimate(
        method, P, t_c, (P - 1) * step_comm, exposed, t_c + exposed, (P - 1) * (step_bytes_fwd + step_bytes_bwd)
    )


def estimate(method: str, devices: int, w: Workload, hw: Hardware = H100_CLUSTER) -> Estimate:
    """Compute, communication and total time of one layer's forward pass for ``method`` (one of
    :data:`METHODS`) on ``devices`` devices; formulas in the module docstring.

    >>> e = estimate("ring", 8, Workload(seq_len=2**20))
    >>> e.exposed_comm_s == 0.0 and e.total_s == e.compute_s   # 131k-token blocks: hidden
    True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_positive_int("devices", devices)
    P, b, B = devices, w.bytes_per_element, w.batch
    c = w.seq_len / P
    D, H, Hkv = w.head_dim, w.heads, w.kv_heads
    if method in ("lasp2", "lasp1"):
        t_c = linear_attention_flops(w) / (P * hw.rate)
        state = 4.0 * B * H * D * D
        W = hw.bandwidth(P)
        if method == "lasp2":
            comm = (P - 1) * state / W
            return Estimate(method, P, t_c, comm, comm, t_c + comm, (P - 1) * state)
        comm = (P - 1) * state / W
        return Estimate(
            method,
            P,
            t_c * P,
            comm,
            comm,
            t_c * P + comm,
            state if P > 1 else 0.0,
            note="sequential: no speed-up over one device",
        )
    t_c = attention_flops(w) / (P * hw.rate)
    if P == 1:
        return Estimate(method, 1, t_c, 0.0, 0.0, t_c, 0.0)
    if method == "ring":
        return _ring_like(method, P, hw, w, 2 * B * c * Hkv * D * b, 0.0, t_c)
    if method == "token_ring":
        return _ring_like(method, P, hw, w, B * c * H * D * b, B * c * H * (D * b + 4), t_c)
    # ulysses
    if P > H:
        return Estimate(
            method,
            P,
            t_c,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            feasible=False,
            note=f"needs devices <= heads ({H}); combine with a ring (USP)",
        )
    kv = max(Hkv, P)  # k/v heads replicated up to P
    data = B * c * (2 * H + 2 * kv) * D * b  # q, k, v in and o out, per device
    n = hw.devices_per_node
    if P <= n:
        comm = (P - 1) / P * data / hw.intra_bw
    else:
        comm = max((n - 1) / P * data / hw.intra_bw, (P - n) / P * data / hw.inter_bw)
    return Estimate(method, P, t_c, comm, comm, t_c + comm, (P - 1) / P * data)


def sweep(
    w: Workload, hw: Hardware = H100_CLUSTER, devices: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
) -> list[Estimate]:
    """:func:`estimate` for every method of :data:`METHODS` at every device count."""
    return [estimate(m, P, w, hw) for P in devices for m in METHODS]


def markdown_table(rows: list[Estimate], w: Workload, hw: Hardware = H100_CLUSTER) -> str:
    """A markdown table of :func:`sweep`'s rows (milliseconds), with the ring's overlap block."""
    lines = [
        "| devices | block c=T/P | ring c_min | method | compute ms | comm ms | exposed comm ms | total ms "
        "| MB sent/device |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for e in rows:
        c = w.seq_len / e.devices
        cmin = ring_min_block(hw, w, e.devices)
        if not e.feasible:
            lines.append(f"| {e.devices} | {c:,.0f} | {cmin:,.0f} | {e.method} | - | - | - | - | {e.note} |")
            continue
        lines.append(
            f"| {e.devices} | {c:,.0f} | {cmin:,.0f} | {e.method} | {e.compute_s * 1e3:.3f} | {e.comm_s * 1e3:.3f} "
            f"| {e.exposed_comm_s * 1e3:.3f} | {e.total_s * 1e3:.3f} | {e.bytes_sent / 1e6:.2f} |"
        )
    return "\n".join(lines)
