"""effattn.moe: mixture-of-experts layers.

Router / dispatcher / experts as separate pieces (as Megatron-Core and MegaBlocks): :class:`Router`
(softmax or sigmoid token choice with renormalised top-k weights, DeepSeek-V3's loss-free balancing
bias, expert choice), dispatch (dropless sort-by-expert with grouped matmuls, or GShard capacity slots)
checked against :func:`reference_moe`, :class:`Experts` (stacked SwiGLU/GELU), the :class:`MoE` layer
with Switch load-balancing (micro- or global-batch) and z-losses, expert parallelism over a process
group with an overlapped chunked schedule, :func:`upcycle` (sparse upcycling of a dense SwiGLU) and
:class:`MixtureOfDepths`.
"""

from effattn.moe.comm import all_to_all
from effattn.moe.dispatch import capacity, capacity_keep, dispatch_combine, reference_moe
from effattn.moe.experts import Experts, SwiGLU, grouped_matmul
from effattn.moe.layer import MoE, MoEAux, reset_lbl_stats, update_bias
from effattn.moe.losses import load_balancing_loss, router_probs, z_loss
from effattn.moe.mod import MixtureOfDepths
from effattn.moe.router import Router, Routing
from effattn.moe.upcycling import upcycle

__all__ = [
    "Experts",
    "MixtureOfDepths",
    "MoE",
    "MoEAux",
    "Router",
    "Routing",
    "SwiGLU",
    "all_to_all",
    "capacity",
    "capacity_keep",
    "dispatch_combine",
    "grouped_matmul",
    "load_balancing_loss",
    "reference_moe",
    "reset_lbl_stats",
    "router_probs",
    "update_bias",
    "upcycle",
    "z_loss",
]
