"""The CPU decoding attention gives transformers' SDPA results without copying the key/value heads."""

import torch
from transformers import AutoModelForCausalLM

from steper_dspy.lm.attention import NAME, grouped_decode_attention, use_grouped_decode_attention


def test_grouped_decode_attention_equals_sdpa_over_a_padded_cache():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = 3, True
    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[0, ..., :7] = False  # left padding of the first row
    ours, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == reference.shape == (2, 1, 6, 8)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_several_queries_without_a_mask_attend_causally_as_sdpa_does():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = 3, True
    query, key, value = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ours, _ = grouped_decode_attention(module, query, key, value, None, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_a_cpu_model_generates_the_same_greedy_tokens_with_it(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(5, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    mask[2, :25] = 0

    def greedy() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)

    expected = greedy()
    assert use_grouped_decode_attention(model) and model.config._attn_implementation == NAME
    assert torch.equal(greedy(), expected)


def test_the_in_process_engine_decodes_with_it(tiny_model_dir):
    from steper_dspy.lm import local_lm

    lm = local_lm(tiny_model_dir, engine="transformers", dtype="float32", max_tokens=4, cache=False)
    model, _ = lm.engine.load()
    assert model.config._attn_implementation == NAME
