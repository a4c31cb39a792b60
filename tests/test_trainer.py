import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from steper_dspy.training import TrainingConfig, train_student
from steper_dspy.training.data import (
    StageCollator,
    build_training_data,
    data_hash,
    tokenize_sample,
    validate_samples,
)
from steper_dspy.training.trainer import StageTrainer
from steper_dspy.training.weighting import StageWeighting

STAGES = ("init", "expand", "aggregate")
TARGETS = {
    "init": "[[ ## rationale ## ]]\nThe question asks who was born in Paris.\n\n[[ ## completed ## ]]",
    "expand": "[[ ## rationale ## ]]\nPassages: title | text.\n\n[[ ## completed ## ]]",
    "aggregate": "[[ ## rationale ## ]]\nSo the answer is: Paris.\n\n[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]",
}


def _samples(n=24):
    samples = []
    for i in range(n):
        stage = STAGES[i % 3]
        question = f"Question {i}: the question asks who was born in which city. " * (1 + i % 4)
        messages = [
            {"role": "system", "content": "Your input fields are: question, passages."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": TARGETS[stage]},
        ]
        samples.append({"messages": messages, "stage": stage, "step": i % 3, "example_id": f"q{i // 3}", "score": 1.0})
    return samples


def _config(**overrides):
    settings = {
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_steps": 4,
        "learning_rate": 1e-2,
        "sigma_learning_rate": 5e-2,
        "max_steps": 12,
    }
    return TrainingConfig(**{**settings, **overrides})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def adaptive_run(tiny_model_dir, tmp_path_factory):
    samples = _samples()
    config = _config()
    result = train_student(
        samples, tiny_model_dir, tmp_path_factory.mktemp("adaptive") / "student", config, progress=False
    )
    return samples, config, result


def test_adaptive_training_lowers_the_loss_and_learns_stage_sigmas(adaptive_run):
    _, _, result = adaptive_run
    rows = _rows(result.log_path)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for row in rows:
        assert {"step", "epoch", "loss", "ce"} <= row.keys()
        assert all(f"sigma_{s}" in row for s in STAGES)
    assert all(any(f"loss_{s}" in r for r in rows) for s in STAGES)
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.15
    assert result.final_loss == pytest.approx(rows[-1]["ce"])
    assert set(result.stage_losses) == set(STAGES)
    assert result.sigmas == pytest.approx({s: rows[-1][f"sigma_{s}"] for s in STAGES})
    assert all(abs(sigma - 1.0) > 0.05 for sigma in result.sigmas.values())
    assert result.num_samples == {"init": 8, "expand": 8, "aggregate": 8}
    assert result.tokens_per_second > 0


def test_output_is_a_merged_model_folder_with_the_run_record(adaptive_run, tiny_model_dir):
    samples, config, result = adaptive_run
    folder = result.output_dir
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"

    record = json.loads((folder / "steper_training.json").read_text())
    assert record["data_hash"] == data_hash(samples)
    assert record["config"] == config.to_dict()
    assert record["num_samples"] == result.num_samples
    assert record["sigmas"] == pytest.approx(result.sigmas)
    assert record["base_fingerprint"]

    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-12", "checkpoint-8"]
    saved = load_file(str(checkpoints[0] / "stage_weighting.safetensors"))["log_vars"]
    assert torch.allclose(torch.exp(0.5 * saved), torch.tensor([result.sigmas[s] for s in STAGES]))
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))


def test_a_finished_run_is_returned_without_retraining(adaptive_run, tiny_model_dir, monkeypatch):
    samples, config, result = adaptive_run

    def fail(*args, **kwargs):
        raise AssertionError("retrained a finished run")

    monkeypatch.setattr(StageTrainer, "train", fail)
    again = train_student(samples, tiny_model_dir, result.output_dir, config, progress=False)
    assert again == result


def test_uniform_full_finetuning_keeps_sigmas_at_one(tiny_model_dir, tmp_path):
    config = _config(weighting="uniform", use_lora=False, max_steps=4, learning_rate=3e-3)
    result = train_student(_samples(), tiny_model_dir, tmp_path / "uniform", config, progress=False)
    rows = _rows(result.log_path)
    assert rows[-1]["ce"] < rows[0]["ce"]
    assert all(row[f"sigma_{s}"] == 1.0 for row in rows for s in STAGES)
    assert result.sigmas == {s: 1.0 for s in STAGES}
    AutoModelForCausalLM.from_pretrained(result.output_dir)


def test_adapter_only_output_and_fresh_start_on_changed_settings(tiny_model_dir, tmp_path):
    from steper_dspy.lm.models import load_model

    fixed = {"weighting": "fixed", "stage_weights": {"init": 1.0, "expand": 0.5, "aggregate": 2.0}}
    out = tmp_path / "adapter"
    train_student(_samples(), tiny_model_dir, out, _config(merge=False, max_steps=2, **fixed), progress=False)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    model, _ = load_model(out, device="cpu")
    assert model.peft_config

    # Another seed is not resumable: the old checkpoints are set aside and training starts from step 0.
    result = train_student(
        _samples(), tiny_model_dir, out, _config(merge=False, max_steps=3, seed=1, **fixed), progress=False
    )
    assert [r["step"] for r in _rows(result.log_path)] == [2, 3]
    assert [c.name for c in sorted((out / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-3"]


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tiny_model_dir, tmp_path):
    # A constant learning rate, so that the schedule does not depend on max_steps; 6 steps make an epoch.
    settings = {"logging_steps": 1, "save_steps": 2, "lr_scheduler_type": "constant"}
    samples = _samples()
    whole = train_student(samples, tiny_model_dir, tmp_path / "whole", _config(max_steps=8, **settings), progress=False)

    out = tmp_path / "resumed"
    train_student(samples, tiny_model_dir, out, _config(max_steps=4, **settings), progress=False)
    saved = load_file(str(out / "checkpoints" / "checkpoint-4" / "stage_weighting.safetensors"))["log_vars"]
    assert saved.abs().min() > 0.01
    resumed = train_student(samples, tiny_model_dir, out, _config(max_steps=8, **settings), progress=False)

    whole_rows, resumed_rows = _rows(whole.log_path), _rows(resumed.log_path)
    assert [r["step"] for r in resumed_rows] == list(range(1, 9))
    for a, b in zip(whole_rows, resumed_rows, strict=True):
        # Step 5 is the first after the restart: a re-initialised sigma or a reshuffled batch would show here.
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert all(b[f"sigma_{s}"] == pytest.approx(a[f"sigma_{s}"], abs=1e-5) for s in STAGES)
    assert resumed.sigmas == pytest.approx(whole.sigmas, abs=1e-5)
    a, b = load_file(str(whole.output_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_batch_loss_is_independent_of_padding_packing_and_logit_trimming(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = validate_samples(_samples(6))
    encoded = [tokenize_sample(tokenizer, s) for s in samples]
    with torch.no_grad():
        references = [
            model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss for e in encoded
        ]
    targets = [sum(label != -100 for label in e["labels"]) for e in encoded]
    expected = sum(r.item() * n for r, n in zip(references, targets, strict=True)) / sum(targets)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
    trainer = StageTrainer(model=model, args=args, stage_weighting=StageWeighting(STAGES, "uniform"))
    assert trainer._trim_logits
    pad = tokenizer.pad_token_id
    projected = []
    model.lm_head.register_forward_hook(lambda _module, args, _out: projected.append(args[0].shape[1]))
    with torch.no_grad():
        for pack in (False, True):
            features = build_training_data(samples, tokenizer, STAGES, 1024, pack=pack).features
            assert len(features) == (2 if pack else 6)  # two chains of three steps
            batch = StageCollator(pad)(features)
            for trim in (True, False):
                trainer._trim_logits = trim
                loss = trainer.compute_loss(model, batch)
                assert loss.item() == pytest.approx(expected, abs=1e-5), (pack, trim)
            # Trimmed, the vocabulary projection sees only the positions where some row has a target.
            assert projected[-2:] == [int((batch["labels"] != -100).any(0).sum()), batch["labels"].shape[1]]


def test_a_forward_that_ignores_logits_to_keep_gives_the_untrimmed_losses(tiny_model_dir):
    from steper_dspy.training.trainer import target_token_losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    features = build_training_data(validate_samples(_samples(6)), tokenizer, STAGES, 1024, pack=True).features
    batch = StageCollator(tokenizer.pad_token_id)(features)
    forward = model.forward

    def forward_that_ignores_logits_to_keep(*args, logits_to_keep=0, **kwargs):
        return forward(*args, **kwargs)

    with torch.no_grad():
        losses, stages = target_token_losses(model, batch, trim_logits=False)
        model.forward = forward_that_ignores_logits_to_keep
        trimmed_losses, trimmed_stages = target_token_losses(model, batch, trim_logits=True)
    assert torch.allclose(trimmed_losses, losses, atol=1e-6) and torch.equal(trimmed_stages, stages)


def test_packed_chains_give_the_per_stage_losses_and_gradients_of_unpacked_samples(tiny_model_dir):
    from steper_dspy.training.trainer import target_token_losses
    from steper_dspy.training.weighting import stage_token_losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    samples = validate_samples(_samples(9))
    results = []
    for pack in (False, True):
        features = build_training_data(samples, tokenizer, STAGES, 1024, pack=pack).features
        model.zero_grad()
        losses, stages = target_token_losses(model, StageCollator(tokenizer.pad_token_id)(features))
        per_stage, counts = stage_token_losses(losses, stages, len(STAGES))
        per_stage.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((per_stage.detach(), counts, grads))
    (unpacked, unpacked_counts, unpacked_grads), (packed, packed_counts, packed_grads) = results
    assert torch.equal(unpacked_counts, packed_counts)
    assert torch.allclose(unpacked, packed, atol=1e-4)
    assert torch.allclose(unpacked_grads, packed_grads, atol=1e-4)


def test_packed_chains_work_with_eager_attention(tiny_model_dir):
    from steper_dspy.training.trainer import target_token_losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples = validate_samples(_samples(6))
    losses = []
    for implementation, pack in (("sdpa", False), ("eager", True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).eval()
        features = build_training_data(samples, tokenizer, STAGES, 1024, pack=pack).features
        with torch.no_grad():
            losses.append(target_token_losses(model, StageCollator(tokenizer.pad_token_id)(features))[0].mean())
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-4)
