"""`train_student`: fine-tune a local student on harvested step-wise samples with stage-weighted loss."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steper_dspy.errors import SteperError
from steper_dspy.training.config import TrainingConfig
from steper_dspy.training.data import TrainingData, build_training_data, data_hash, validate_samples
from steper_dspy.training.trainer import (
    StageLogCallback,
    StageProgressCallback,
    StageTrainer,
    last_checkpoint,
    trim_log,
)
from steper_dspy.training.weighting import StageWeighting

logger = logging.getLogger(__name__)

RESULT_FILE = "steper_training.json"
LOG_FILE = "stage_log.jsonl"
CHECKPOINTS = "checkpoints"
RUN_FILE = "steper_run.json"
FORMAT_VERSION = 1
# Model files a previous run may have left in the output folder; removed so the folder never mixes two runs.
_MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "model.safetensors.index.json")
_MODEL_GLOBS = ("model*.safetensors", "adapter_model.safetensors", "pytorch_model*.bin", "adapter_model.bin")


@dataclass
class TrainingResult:
    """What a training run produced.

    Attributes:
        output_dir: The trained model folder: merged weights (or the LoRA adapter when `merge=False`),
            the tokenizer and `steper_training.json`.
        log_path: `stage_log.jsonl`, one JSON row per logging step.
        final_loss: Mean token cross-entropy over all target tokens in the last logging window (the same
            quantity under every weighting mode, unlike the weighted objective logged as `loss`).
        stage_losses: Mean token cross-entropy per stage in the last logging window.
        sigmas: Final sigma per stage (1.0 unless the weighting is adaptive).
        num_samples: Samples trained on, per stage.
        train_seconds: Wall time of the training loop in the run that finished the model.
        tokens_per_second: Non-padding tokens processed per second in that run.
    """

    output_dir: Path
    log_path: Path
    final_loss: float
    stage_losses: dict[str, float]
    sigmas: dict[str, float]
    num_samples: dict[str, int]
    train_seconds: float
    tokens_per_second: float

    def figures(self) -> dict[str, Any]:
        """The run's figures as JSON-ready data: every attribute but the two paths."""
        fields = asdict(self)
        fields.pop("output_dir")
        fields.pop("log_path")
        return fields


def train_student(
    samples: Iterable[dict[str, Any]],
    base_model: str | Path,
    output_dir: str | Path,
    config: TrainingConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
) -> TrainingResult:
    """Fine-tune `base_model` on step-wise samples with STEPER's stage-weighted loss.

    Samples are tokenised exactly as the local engine prompts at inference (chat template of every
    message but the last, generation prompt on), and the loss covers the assistant target and eos only.

    Args:
        samples: Harvested samples: `{"messages": [...], "stage": "init" | "expand" | "aggregate", ...}`,
            the last message being the assistant target.
        base_model: The student: a model folder, a `.gguf` file or a cached hub id.
        output_dir: Where the trained model, `steper_training.json`, `stage_log.jsonl` and `checkpoints/` go.
        config: Training settings (defaults: LoRA, adaptive weighting, 2 epochs).
        resume: Reuse a finished output for the same data, config and base model, or continue from the
            last checkpoint of a compatible run. `False` trains afresh and deletes old checkpoints.
        progress: Show a progress bar with the running losses.

    Returns:
        The `TrainingResult`.

    Raises:
        SteperError: A sample is malformed, no sample fits `max_length`, or the base model cannot be loaded.
    """
    config = config or TrainingConfig()
    output_dir = Path(output_dir).expanduser()
    samples = validate_samples(samples)
    run = training_identity(samples, base_model, config)
    if resume and (done := _finished_result(output_dir, run)) is not None:
        logger.info("%s already holds this training run; not retraining.", output_dir)
        return done

    from peft.helpers import disable_input_dtype_casting
    from transformers import set_seed

    from steper_dspy.lm.models import load_model

    bf16 = _autocast_bf16(config)
    # The training arguments set up the processes of an `accelerate launch` (gloo on CPUs, NCCL on GPUs): their
    # view of who is the main process is the one the Trainer acts on.
    args = _training_arguments(output_dir / CHECKPOINTS, config, progress, bf16)
    with args.main_process_first(local=False, desc="preparing the output folder"):
        main = args.process_index == 0
        checkpoint = _prepare_output_dir(output_dir, run, resume) if main else None
    if not main:
        checkpoint = last_checkpoint(output_dir / CHECKPOINTS) if resume else None

    set_seed(config.seed)
    # LoRA under bf16 autocast: the frozen base computes in bf16 anyway, so it is stored in bf16 too (the adapter
    # stays fp32: peft upcasts it). Full fine-tuning keeps fp32 master weights.
    bf16_base = config.use_lora and bf16
    model, tokenizer = load_model(base_model, device="cpu", trainable=True, dtype="bfloat16" if bf16_base else "auto")
    data = build_training_data(samples, tokenizer, config.stages, config.max_length, pack=config.pack_steps)
    model = _prepare_model(model, config)
    weighting = StageWeighting(config.stages, config.weighting, config.stage_weights)

    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(data),
        data_collator=_collator(tokenizer),
        processing_class=tokenizer,
        stage_weighting=weighting,
        sigma_learning_rate=config.sigma_learning_rate,
        callbacks=[StageLogCallback(output_dir / LOG_FILE)],
    )
    _set_progress(trainer, progress)
    start = time.perf_counter()
    # peft would cast every LoRA input up to the fp32 adapter's dtype, only for autocast to cast it straight back.
    with disable_input_dtype_casting(model, active=bf16_base):
        trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    result = _result(output_dir, trainer, data, seconds, trainer.tokens_seen)
    if trainer.is_world_process_zero():
        _save_model(trainer, output_dir, config, base_model, reload_base=bf16_base)
        record = {**run, **_counts(data), **result.figures(), "global_step": trainer.state.global_step}
        _write_json(output_dir / RESULT_FILE, record)
    args.distributed_state.wait_for_everyone()
    return result


def training_identity(samples: list[dict[str, Any]], base_model: str | Path, config: TrainingConfig) -> dict[str, Any]:
    """What decides a training run's model: the samples' hash, the base model's fingerprint and the settings.

    `train_student` reuses a finished output whose identity matches; a caller can also key results derived
    from the trained model (e.g. its evaluations) on it without training.

    Args:
        samples: The validated samples (see `validate_samples`).
        base_model: The student's base model.
        config: The training settings.
    """
    from steper_dspy.lm.models import model_fingerprint

    try:
        fingerprint = model_fingerprint(base_model)
    except (SteperError, OSError):
        fingerprint = None
    return {
        "format": FORMAT_VERSION,
        "base_model": str(base_model),
        "base_fingerprint": fingerprint,
        "data_hash": data_hash(samples),
        "stages": list(config.stages),
        "weighting": config.weighting,
        "config": config.to_dict(),
    }


def _same_base(saved: dict[str, Any], run: dict[str, Any]) -> bool:
    if saved.get("base_fingerprint") and run["base_fingerprint"]:
        return saved["base_fingerprint"] == run["base_fingerprint"]
    return saved.get("base_model") == run["base_model"]


def _finished_result(output_dir: Path, run: dict[str, Any]) -> TrainingResult | None:
    saved = _read_json(output_dir / RESULT_FILE)
    if not saved or saved.get("data_hash") != run["data_hash"] or saved.get("config") != run["config"]:
        return None
    if not _same_base(saved, run):
        return None
    return TrainingResult(
        output_dir=output_dir,
        log_path=output_dir / LOG_FILE,
        final_loss=saved["final_loss"],
        stage_losses=saved["stage_losses"],
        sigmas=saved["sigmas"],
        num_samples=saved["num_samples"],
        train_seconds=saved["train_seconds"],
        tokens_per_second=saved["tokens_per_second"],
    )


def _prepare_output_dir(output_dir: Path, run: dict[str, Any], resume: bool) -> str | None:
    """Clear what a new run must not mix with; return the checkpoint to resume from, if any."""
    checkpoints = output_dir / CHECKPOINTS
    resume_key = {**run, "config": TrainingConfig.from_dict(run["config"]).resume_key()}
    checkpoint = last_checkpoint(checkpoints) if resume else None
    if checkpoint is not None:
        saved = _read_json(checkpoints / RUN_FILE) or {}
        same = all(saved.get(k) == resume_key[k] for k in ("format", "data_hash", "config"))
        if not (same and _same_base(saved, resume_key)):
            logger.warning(
                "Checkpoints in %s come from another run (data, base model or settings differ); training afresh.",
                checkpoints,
            )
            checkpoint = None
    if checkpoint is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        (output_dir / LOG_FILE).unlink(missing_ok=True)
    else:
        _remove_checkpoints_after(checkpoints, _checkpoint_step(checkpoint))
        trim_log(output_dir / LOG_FILE, _checkpoint_step(checkpoint))
    (output_dir / RESULT_FILE).unlink(missing_ok=True)
    _write_json(checkpoints / RUN_FILE, resume_key)
    return checkpoint


def _checkpoint_step(checkpoint: str) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def _remove_checkpoints_after(checkpoints: Path, step: int) -> None:
    """Remove the checkpoints after `step`, the last complete one: a run killed while writing them left them
    incomplete, and the resumed run writes those steps again."""
    for path in checkpoints.glob("checkpoint-*"):
        number = path.name.removeprefix("checkpoint-")
        if number.isdigit() and int(number) > step:
            shutil.rmtree(path, ignore_errors=True)


def _prepare_model(model: Any, config: TrainingConfig) -> Any:
    model.config.use_cache = False
    if not config.use_lora:
        return model
    return _peft_model(model, lora_config(config))


def lora_config(config: TrainingConfig) -> Any:
    """The peft `LoraConfig` of a training run (rank, alpha, dropout and target modules from `config`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def _peft_model(model: Any, lora: Any) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft probes a deprecated transformers attribute; the warning is theirs, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def _autocast_bf16(config: TrainingConfig) -> bool:
    """Whether the run trains under bf16 autocast: `config.bf16`, or where the hardware runs bf16 natively."""
    import torch

    from steper_dspy.lm.models import default_dtype

    if config.bf16 is not None:
        return config.bf16
    return default_dtype("cuda" if torch.cuda.is_available() else "cpu") == torch.bfloat16


def _training_arguments(checkpoints: Path, config: TrainingConfig, progress: bool, bf16: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        **checkpointing_arguments(TrainingArguments, config.gradient_checkpointing),
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        bf16=bf16,
        use_cpu=not cuda,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to=config.report_to,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter (adapter or model) gets a gradient
        train_sampling_strategy="group_by_length",
        length_column_name="length",
    )


def checkpointing_arguments(arguments_class: type, enabled: bool) -> dict[str, Any]:
    """The activation-checkpointing settings of a `TrainingArguments` class, under the names its transformers
    version uses (`activation_checkpointing` from 5.20 on, `gradient_checkpointing` before)."""
    import inspect

    names = inspect.signature(arguments_class.__init__).parameters
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def _dataset(data: TrainingData) -> Any:
    from datasets import Dataset

    return Dataset.from_list(data.features)


def _collator(tokenizer: Any) -> Any:
    from steper_dspy.training.data import StageCollator

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return StageCollator(pad_token_id=pad)


def _set_progress(trainer: StageTrainer, progress: bool) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(StageProgressCallback())


def _result(output_dir: Path, trainer: StageTrainer, data: TrainingData, seconds: float, tokens: int) -> TrainingResult:
    logs = [row for row in trainer.state.log_history if "ce" in row]
    last = logs[-1] if logs else {}
    stage_losses = {s: last[f"loss_{s}"] for s in data.stages if f"loss_{s}" in last}
    return TrainingResult(
        output_dir=output_dir,
        log_path=output_dir / LOG_FILE,
        final_loss=float(last.get("ce", float("nan"))),
        stage_losses=stage_losses,
        sigmas=trainer.stage_weighting.sigmas(),
        num_samples=dict(data.num_samples),
        train_seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
    )


def _save_model(
    trainer: StageTrainer, output_dir: Path, config: TrainingConfig, base_model: str | Path, *, reload_base: bool
) -> None:
    """Save the merged model in the base's own dtype, or the adapter alone.

    `reload_base`: the base was trained on in bf16, so the adapter is merged into a fresh fp32 copy instead.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for pattern in _MODEL_GLOBS:
        for stale in output_dir.glob(pattern):
            stale.unlink()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if config.use_lora and config.merge:
        model = _merge_into_fp32_base(model, base_model) if reload_base else model.merge_and_unload()
    if not (config.use_lora and not config.merge):
        model = model.to(_saved_dtype(base_model))
        model.config.use_cache = True
    model.save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)


def _merge_into_fp32_base(model: Any, base_model: str | Path) -> Any:
    """The trained (fp32) adapter of `model` merged into the base loaded afresh in fp32.

    Merging into the bf16 base trained on would bake its bf16-rounded weights into the saved model. fp32 holds
    any base exactly, and the merge is the same as that of a run trained on an fp32 base; `_save_model` then
    casts the result to the base's own dtype.
    """
    import copy

    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from steper_dspy.lm.models import load_model

    base, _ = load_model(base_model, device="cpu", dtype="float32")
    fresh = _peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter]))
    loaded = set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    if loaded.unexpected_keys:
        raise SteperError(f"The trained adapter does not fit the reloaded base model: {loaded.unexpected_keys[:5]}")
    return fresh.merge_and_unload()


def _saved_dtype(base_model: str | Path) -> Any:
    """The base model's own dtype (from its config.json), so that training does not change the file size."""
    import torch

    from steper_dspy.lm.models import resolve_model

    resolved = resolve_model(base_model)
    config = _read_json(Path(resolved) / "config.json") if isinstance(resolved, Path) else None
    name = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _counts(data: TrainingData) -> dict[str, Any]:
    return {
        "num_samples": data.num_samples,
        "dropped": data.dropped,
        "skipped": data.skipped,
        "num_target_tokens": data.num_target_tokens,
        "duplicates": data.duplicates,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
