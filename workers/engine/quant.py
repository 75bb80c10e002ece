"""Weight-only W4A16 quantisation of a loaded model's linear layers."""

from __future__ import annotations

import logging

from torch import nn

from workers.engine.lora_layers import LoRALinear

logger = logging.getLogger(__name__)


def quantize_linear_layers(model: nn.Module, *, group_size: int = 128) -> int:
    """Quantise every adaptable projection (q/k/v/o, gate/up/down) in place; returns how many.

    Embeddings, the LM head, routers and stacked MoE experts stay dense: the first two
    are lookups or run once per step, the others are not plain linear layers. A layer whose
    input width is not a multiple of `group_size` stays dense too, and is logged.
    """
    num_quantized = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        if module.in_features % group_size:
            logger.warning("w4a16 skipped layer=%s in_features=%d group_size=%d", name, module.in_features, group_size)
            continue
        module.quantize_w4a16(group_size)
        num_quantized += 1
    logger.info("w4a16 quantized layers=%d group_size=%d", num_quantized, group_size)
    return num_quantized
