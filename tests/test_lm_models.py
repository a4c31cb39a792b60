import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steper_dspy.errors import SteperError
from steper_dspy.lm import models
from steper_dspy.lm.models import default_dtype, load_model, model_fingerprint, resolve_model

REAL_GGUF = Path("~/.cache/steper/models/smollm2-135m.gguf").expanduser()


@pytest.fixture(autouse=True)
def steper_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPER_CACHE", str(tmp_path / "steper-cache"))
    return tmp_path / "steper-cache"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


def _permute(w, n_head):
    # llama.cpp's q/k row order (rotary halves interleaved per head), which transformers undoes on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """Convert the tiny Llama folder to an F32 GGUF file the way llama.cpp's converter lays it out."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    weights = {k: v.float().numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    vocab = dict(tok["model"]["vocab"])
    vocab.update({added["content"]: added["id"] for added in tok["added_tokens"]})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a.get("special")}
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text())
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    layer_names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for gguf_name, hf_name in layer_names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weights[f"{prefix}{hf_name}.weight"])
        q, k = weights[f"{prefix}self_attn.q_proj.weight"], weights[f"{prefix}self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(q, config["num_attention_heads"]))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(k, config["num_key_value_heads"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.float()


def test_resolve_folder_is_itself(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_missing_path_names_it(tmp_path):
    with pytest.raises(SteperError, match="does not exist"):
        resolve_model(tmp_path / "no-such-model")
    with pytest.raises(SteperError, match="does not exist"):
        resolve_model("./missing.gguf")


def test_resolve_plain_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SteperError, match="not a model folder"):
        resolve_model(tmp_path / "weights.bin")


def test_resolve_uncached_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SteperError, match="steper-tests/no-such-model.*unreachable"):
        resolve_model("steper-tests/no-such-model")


def test_fingerprint_stable_and_follows_the_weights(model_copy):
    first = model_fingerprint(model_copy)
    assert first == model_fingerprint(model_copy) == model_fingerprint(str(model_copy))
    assert len(first) == 12
    (model_copy / "trainer_state.json").write_text("{}")  # checkpoint bookkeeping does not count
    (model_copy / "README.md").write_text("notes")
    assert model_fingerprint(model_copy) == first
    weights = load_file(model_copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5  # same shapes and file size
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(model_copy) != first


def test_fingerprint_of_an_empty_folder(tmp_path):
    with pytest.raises(SteperError, match="no weights or config"):
        model_fingerprint(tmp_path)


def test_load_model(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, dtype="float32")
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    auto, _ = load_model(tiny_model_dir)
    assert auto.dtype == default_dtype("cpu")


def test_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert default_dtype("cpu") == torch.float32


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(SteperError, match="Unknown dtype"):
        load_model(tiny_model_dir, dtype="float7")


def test_corrupt_weights_name_the_file(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SteperError, match="model.safetensors"):
        load_model(model_copy)


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(SteperError, match=r"no \*\.safetensors"):
        load_model(model_copy)


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_folder_loads_base_and_adapter(tiny_model_dir, adapter_dir):
    from peft import PeftModel

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, tokenizer = load_model(tiny_model_dir, dtype="float32")
    tuned, _ = load_model(adapter_dir, dtype="float32")
    same, _ = load_model(tiny_model_dir, adapter=adapter_dir, dtype="float32")
    assert isinstance(tuned, PeftModel)
    ids = tokenizer("The answer is: Paris.")["input_ids"]
    assert not torch.allclose(_logits(base, ids), _logits(tuned, ids))
    assert torch.allclose(_logits(tuned, ids), _logits(same, ids))
    assert model_fingerprint(adapter_dir) != model_fingerprint(tiny_model_dir)


def test_trainable_adapter(adapter_dir):
    model, _ = load_model(adapter_dir, trainable=True)
    assert model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_missing_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(SteperError, match="not a peft adapter folder"):
        load_model(tiny_model_dir, adapter=tmp_path / "nothing-here")


def test_gguf_is_materialised_once(tiny_model_dir, tmp_path, steper_cache):
    gguf_file = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    folder = resolve_model(gguf_file)
    assert folder.parent == steper_cache / "materialized" and folder.name.startswith("tiny-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(gguf_file) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    original, tokenizer = load_model(tiny_model_dir, dtype="float32")
    converted, converted_tokenizer = load_model(gguf_file, dtype="float32")
    assert converted_tokenizer.eos_token == tokenizer.eos_token
    messages = [{"role": "user", "content": "Who was born in Paris?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert converted_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ] == list(ids)
    np.testing.assert_allclose(_logits(converted, ids), _logits(original, ids), rtol=1e-2, atol=1e-3)
    assert len(model_fingerprint(gguf_file)) == 12


def test_corrupt_gguf(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SteperError, match="Cannot read GGUF file"):
        resolve_model(tmp_path / "broken.gguf")
    assert not list((tmp_path / "steper-cache" / "materialized").iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not REAL_GGUF.is_file(), reason="needs ~/.cache/steper/models/smollm2-135m.gguf")
def test_real_gguf_materialises_and_loads(monkeypatch):
    monkeypatch.delenv("STEPER_CACHE")
    model, tokenizer = load_model(REAL_GGUF)
    assert model.config.model_type == "llama" and tokenizer.chat_template


def test_cpu_info_reads_the_first_processor_and_native_bf16_follows_its_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: another\n"
    )
    info = models.cpu_info(cpuinfo)
    assert (info["model name"], info["cpu family"], info["model"]) == ("AMD EPYC", "25", "1")
    assert models.cpu_info(tmp_path / "missing") == {}
    monkeypatch.setattr(models, "cpu_info", lambda: info)
    assert not models.cpu_has_native_bf16()  # Zen 3: AVX2 only
    info["flags"] += " avx512f avx512_bf16"
    assert models.cpu_has_native_bf16()
