"""Decoding attention for CPU inference: grouped-query attention without copying the keys and values.

Decoding is most of a CPU evaluation's time, and attention over the cache most of decoding. For grouped-query
models (SmolLM2, Qwen2.5: several query heads per key/value head) transformers' SDPA path copies the whole
cache to one key/value head per query head at every step whenever a padding mask is present (`repeat_kv`),
and torch's bf16 SDPA kernel on a CPU is slow besides: over a 2,000-token cache it measured 7.9 ms per layer
and step on this project's 2-core CPU, against about 2 ms for the grouped matmuls below. Prompts (many query
tokens) keep transformers' SDPA, whose fused kernel does not materialise the score matrix.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "steper_cpu_decode"
# Query tokens up to which a forward pass counts as decoding (one token a step; a few with speculative decoding).
MAX_DECODE_QUERIES = 16


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention in transformers' calling convention (`query` `[B, H, Q, D]`, `key`/`value` `[B, KV, L, D]`,
    output `[B, Q, H, D]`): each key/value head attends for its group of query heads at once; softmax in fp32."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    # No mask for several queries means a causal prompt without padding (SDPA's `is_causal`): SDPA's job too.
    if queries > MAX_DECODE_QUERIES or module.training or dropout or (attention_mask is None and queries > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.view(batch, kv_heads, heads // kv_heads * queries, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(batch, kv_heads, heads // kv_heads, queries, length)
    if attention_mask is not None:
        mask = attention_mask[:, :, -queries:, -length:].unsqueeze(1)  # [B, 1, 1, Q, L]
        boolean = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if boolean else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, heads // kv_heads * queries, length)
    out = torch.matmul(probs, value).view(batch, heads, queries, dim)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_decode_attention(model: Any) -> bool:
    """Switch a CPU inference model that uses SDPA to `grouped_decode_attention`; returns whether it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
