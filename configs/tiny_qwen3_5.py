"""A small Qwen3.5 (gated delta-net layers, three for every full-attention layer) trained from scratch on the
built-in tasks, on a CPU.

    python -m experiments.train --config=configs/tiny_qwen3_5.py --workdir=/tmp/qwen3_5_tiny

Everything as configs/tiny.py, with Qwen3.5's decoder in place of Qwen3's: 8 layers (two periods of three gated
delta-net layers and one gated full-attention layer), rotary on half of each attention head, zero-centred norms and
no DeepStack. The run ends by exporting an HF checkpoint that transformers' Qwen3_5ForConditionalGeneration loads.
"""

from configs import tiny
from qwen3vl_jax.training.run_config import model_settings

QWEN3_5_TEXT = dict(architecture="qwen3_5", num_hidden_layers=8, partial_rotary_factor=0.5, mrope_section=(3, 3, 2))
QWEN3_5_TEXT.update(linear_num_key_heads=2, linear_key_head_dim=32, linear_num_value_heads=4, linear_value_head_dim=32)


def get_config():
    c = tiny.get_config()
    c.model = model_settings("tiny-cpu", remat="dots", text=QWEN3_5_TEXT, vision=dict(deepstack_visual_indexes=()))
    return c
