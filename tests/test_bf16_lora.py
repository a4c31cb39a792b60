"""LoRA under bf16 autocast trains on a bf16 base without peft's input casting, and saves a full-precision merge."""

import json
import math

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import steper_dspy.training.train as train
from steper_dspy.training.trainer import StageTrainer

from .test_trainer import _config, _samples


class _RecordingTrainer(StageTrainer):
    """Records, at every training forward pass, the dtypes the model trains in and peft's input-casting flags."""

    runs: list["_RecordingTrainer"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict] = []
        self.layer_inputs: list[tuple[torch.dtype, bool]] = []
        _RecordingTrainer.runs.append(self)
        # accelerate applies autocast inside the model's forward, so it is observed from within a layer.
        self.tuners = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        if self.tuners:
            self.tuners[0].register_forward_pre_hook(self._record_layer_input)

    def _record_layer_input(self, module, args):
        if module.training:
            self.layer_inputs.append((args[0].dtype, torch.is_autocast_enabled(args[0].device.type)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            params = dict(model.named_parameters())
            tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            self.seen.append(
                {
                    "frozen": {p.dtype for n, p in params.items() if not p.requires_grad},
                    "trained": {p.dtype for n, p in params.items() if p.requires_grad},
                    "casting": {m.cast_input_dtype_enabled for m in tuners},
                }
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.fixture
def recording(monkeypatch):
    _RecordingTrainer.runs = []
    monkeypatch.setattr(train, "StageTrainer", _RecordingTrainer)
    return _RecordingTrainer.runs


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bf16_lora_trains_a_bf16_base_and_saves_an_fp32_merge(tiny_model_dir, tmp_path, recording):
    # bf16 forced: on a CPU without native bf16 autocast still runs it, only slower.
    config = _config(bf16=True, max_steps=8, logging_steps=1, lr_scheduler_type="constant")
    result = train.train_student(_samples(), tiny_model_dir, tmp_path / "student", config, progress=False)

    (trainer,) = recording
    assert len(trainer.seen) == 8
    # Each LoRA layer gets bf16 activations under autocast (its adapter matmul runs in bf16 there).
    assert trainer.layer_inputs == [(torch.bfloat16, True)] * 8
    for seen in trainer.seen:
        assert seen["frozen"] == {torch.bfloat16}
        assert seen["trained"] == {torch.float32}  # the adapter, which peft upcasts
        assert seen["casting"] == {False}
    # The context manager gives peft its casting back once training is over.
    assert {m.cast_input_dtype_enabled for m in trainer.tuners} == {True}

    ce = [row["ce"] for row in _rows(result.log_path)]
    assert all(math.isfinite(v) for v in ce)
    assert ce[-1] < ce[0] - 0.15

    # The saved model is the trained adapter merged into the fp32 base, not into the bf16 copy trained on.
    saved = load_file(str(result.output_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_embed = base.model.embed_tokens.weight.detach().clone()
    base_up = base.model.layers[0].mlp.up_proj.weight.detach().clone()  # the merge below overwrites the base
    adapter = result.output_dir / "checkpoints" / "checkpoint-8"
    expected = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    assert saved.keys() <= expected.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    # The embeddings carry no adapter: they must be the base's fp32 weights, which bf16 would have rounded.
    assert torch.equal(saved["model.embed_tokens.weight"], base_embed)
    assert not torch.equal(base_embed.to(torch.bfloat16).float(), base_embed)
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], base_up)  # the adapter was merged


def test_bf16_full_finetuning_keeps_fp32_weights_and_peft_untouched(tiny_model_dir, tmp_path, recording):
    config = _config(bf16=True, use_lora=False, weighting="uniform", max_steps=2, learning_rate=3e-3)
    train.train_student(_samples(), tiny_model_dir, tmp_path / "full", config, progress=False)

    (trainer,) = recording
    assert len(trainer.seen) == 2
    for seen in trainer.seen:
        assert seen["trained"] == {torch.float32} and not seen["frozen"]
        assert seen["casting"] == set()


def test_bf16_lora_resumed_run_matches_an_uninterrupted_one(tiny_model_dir, tmp_path, recording):
    settings = {"bf16": True, "logging_steps": 1, "save_steps": 2, "lr_scheduler_type": "constant"}
    samples = _samples()
    whole = train.train_student(
        samples, tiny_model_dir, tmp_path / "whole", _config(max_steps=6, **settings), progress=False
    )
    out = tmp_path / "resumed"
    train.train_student(samples, tiny_model_dir, out, _config(max_steps=4, **settings), progress=False)
    resumed = train.train_student(samples, tiny_model_dir, out, _config(max_steps=6, **settings), progress=False)

    assert recording[-1].seen[0]["frozen"] == {torch.bfloat16}  # the resumed run trains on the bf16 base too
    whole_rows, resumed_rows = _rows(whole.log_path), _rows(resumed.log_path)
    assert [r["step"] for r in resumed_rows] == list(range(1, 7))
    for a, b in zip(whole_rows, resumed_rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert all(b[k] == pytest.approx(a[k], abs=1e-4) for k in a if k.startswith(("loss_", "sigma_")))
    a, b = load_file(str(whole.output_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
