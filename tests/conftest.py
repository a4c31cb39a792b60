"""Shared fixtures: an offline environment and a tiny random chat model built on the spot."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", str(Path(__file__).resolve().parent.parent / ".dspy_cache" / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Local models generate in process unless a test asks for vLLM (a server start takes minutes).
os.environ.setdefault("STEPER_ENGINE", "transformers")
# ... in this process: a tiny model gains nothing from worker processes, which take seconds to start.
os.environ.setdefault("STEPER_WORKERS", "1")
# The test models are tiny: a second thread only adds synchronisation (8 training steps: 1.5 s on one, 15 s on two).
torch.set_num_threads(1)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_model(
    path: Path, *, seed: int = 0, vocab_size: int = 384, hidden_size: int = 32, num_attention_heads: int = 4
) -> Path:
    """Write a tiny random Llama chat model with a byte-level BPE tokenizer (ChatML template) to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "[[ ## rationale ## ]] [[ ## answer ## ]] [[ ## completed ## ]] [[ ## sufficient ## ]] True False",
        "The question asks who was born in which city. Passages: title | text. So the answer is: Paris.",
        "Your input fields are: question, passages, rationales. Your output fields are: rationale, answer.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=max(1, num_attention_heads // 2),
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random chat model folder (about 50k parameters), the same for the whole session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
