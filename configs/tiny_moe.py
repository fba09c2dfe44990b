"""A small MoE Qwen3-VL (8 experts, top-2) trained from scratch on the built-in tasks, on a CPU.

    python -m experiments.train --config=configs/tiny_moe.py --workdir=/tmp/qwen3vl_tiny_moe

Everything as configs/tiny.py, with the MoE decoder; the load-balancing loss (coefficient
model.overrides.text.router_aux_loss_coef) is part of the objective and logged as aux_loss. On a CPU the dense
backend (every expert on every token) is the fastest of the three for 8 experts, top-2: XLA:CPU runs ragged_dot
as a masked matmul over all experts and megablox interpreted (a forward + backward of this model at batch 8 x 384:
dense 1.51 s, ragged_dot 1.90 s); on TPU use megablox (--config.model.overrides.moe_backend=megablox).
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, router_aux_loss_coef=0.01)
    c.model.overrides.text.update(moe)
    c.model.overrides.moe_backend = "dense"
    return c
