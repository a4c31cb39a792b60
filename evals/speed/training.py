"""Training speed: the project's trainer (`train_student`) against TRL's `SFTTrainer` on the same step samples.

Both train the same LoRA adapter (one `LoraConfig`) on the same base model loaded the same way (fp32
master weights, bf16 autocast where the hardware has it), on the same samples, for the same number of
optimizer steps with the same batch size, learning rate, schedule and seed, and each learns the targets
only: our samples go through `tokenize_sample`, TRL gets the same messages as conversational
prompt-completion rows (the format DSPy's local fine-tuning feeds it). Each trainer runs in a fresh process,
so peak memory is its own. Reported: non-padding tokens per second over `Trainer.train`, peak memory,
the last steps' training loss and the loss on held-out samples computed the same way for both.

Run it with `steper speed training`.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steper_dspy.errors import SteperError
from steper_dspy.evals.speed.common import (
    Row,
    bar_plot,
    comparison_table,
    machine,
    markdown_table,
    peak_rss_mb,
    ratio,
    require,
    write_json,
)

# "ours" packs each chain's steps into one sequence (the default of train_student); "ours-unpacked" trains on one
# sample per sequence, as before packing and as TRL does.
TRAINERS = ("ours", "ours-unpacked", "trl")
LAST_STEPS = 3  # the final loss is the mean over this many last steps: one step's loss is one batch's


@dataclass
class TrainingBenchmark:
    """Settings of one training comparison; both trainers get the same ones.

    Args:
        model: The student base model (folder, GGUF file or cached hub id); default SmolLM2-135M.
        steps: Optimizer steps per trainer.
        batch_size: Samples per forward pass.
        grad_accum: Forward passes per optimizer step.
        max_length: Longest sample in tokens; samples longer than this are left out for both trainers.
        learning_rate: Peak learning rate (linear decay, no warmup, as our default).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        weighting: Our loss weighting; `"uniform"` is TRL's objective (mean token cross-entropy).
        bf16: bf16 autocast; None picks it where the hardware runs bf16 natively (as our trainer does).
        seed: Seed of the LoRA initialisation, the data order and the synthetic questions.
        eval_samples: Held-out samples to compute both trained models' loss on (0: skip).
        harvest: Train on the kept samples of this harvest file (cycled when too few) instead of the
            gold-chain harvest.
        trainers: Which trainers to run.
        isolate: Run each trainer in its own process (its own peak memory); False runs them in this one.
    """

    model: str | None = None
    steps: int = 8
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1536
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    weighting: str = "uniform"
    bf16: bool | None = None
    seed: int = 0
    eval_samples: int = 8
    harvest: str | None = None
    trainers: tuple[str, ...] = TRAINERS
    isolate: bool = True

    def __post_init__(self) -> None:
        unknown = [t for t in self.trainers if t not in TRAINERS]
        if unknown or not self.trainers:
            raise SteperError(f"Unknown trainers {unknown}: choose from {list(TRAINERS)}.")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise SteperError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.eval_samples < 0:
            raise SteperError("--eval-samples must be 0 or more.")

    @property
    def train_samples(self) -> int:
        """Samples consumed: one epoch of exactly `steps` optimizer steps."""
        return self.steps * self.batch_size * self.grad_accum

    def training_config(self, *, pack: bool = True) -> Any:
        """Our `TrainingConfig` for these settings (TRL's `SFTConfig` and `LoraConfig` are derived from it)."""
        from steper_dspy.training import TrainingConfig

        return TrainingConfig(
            pack_steps=pack,
            weighting=self.weighting,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            learning_rate=self.learning_rate,
            max_steps=self.steps,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            max_length=self.max_length,
            bf16=self.bf16,
            logging_steps=1,
            save_steps=self.steps,
            save_total_limit=1,
            seed=self.seed,
            merge=False,
            lr_scheduler_type="linear",
            warmup_ratio=0.0,
            weight_decay=0.0,
        )


@dataclass
class _Job:
    trainer: str
    model: str
    samples: list[dict[str, Any]]
    eval_samples: list[dict[str, Any]]
    settings: TrainingBenchmark
    output_dir: str


def run_training_benchmark(settings: TrainingBenchmark, output: str | Path) -> dict[str, Any]:
    """Train with each trainer on the same samples and compare them; writes `results.json` and `training_speed.png`.

    Args:
        settings: The comparison's settings.
        output: The output folder.

    Returns:
        The results: `settings`, `machine`, `data`, one entry per trainer and `ratios` (ours / TRL).

    Raises:
        SteperError: TRL is not installed (when asked for), or the samples do not fit.
    """
    if "trl" in settings.trainers:
        require("trl", "trl")
    out = Path(output)
    model = settings.model or _default_model()
    train, held_out, data = _samples(settings, model)
    runs: dict[str, dict[str, Any]] = {}
    for trainer in settings.trainers:
        job = _Job(trainer, model, train, held_out, settings, str(out / f"run-{trainer}"))
        runs[trainer] = _run(job, settings.isolate)
        shutil.rmtree(job.output_dir, ignore_errors=True)
    results: dict[str, Any] = {
        "benchmark": "training",
        "command": " ".join(sys.argv),
        "settings": {**dataclasses.asdict(settings), "model": model},
        "machine": machine(),
        "data": data,
        **runs,
    }
    figures = ("tokens_per_second", "peak_memory_mb", "final_loss", "heldout_loss", "train_seconds")
    if "ours" in runs and "trl" in runs:
        results["ratios"] = {key: ratio(runs["ours"][key], runs["trl"][key]) for key in figures}
    if "ours" in runs and "ours-unpacked" in runs:
        results["packing_ratios"] = {key: ratio(runs["ours"][key], runs["ours-unpacked"][key]) for key in figures}
    write_json(out / "results.json", results)
    _plot(runs, out / "training_speed.png")
    return results


def table_rows(results: dict[str, Any], baseline: str = "trl") -> list[Row]:
    """The comparison's figures as table rows (ours vs `baseline`: ``trl`` or ``ours-unpacked``)."""
    ours, base = results.get("ours", {}), results.get(baseline, {})
    memory = "peak GPU memory (MiB)" if ours.get("memory_kind", base.get("memory_kind")) == "cuda" else "peak RSS (MiB)"
    return [
        ("tokens/s (non-padding)", ours.get("tokens_per_second"), base.get("tokens_per_second"), ".0f", True),
        ("train seconds", ours.get("train_seconds"), base.get("train_seconds"), ".1f", False),
        ("tokens processed", ours.get("tokens"), base.get("tokens"), ".0f", True),
        ("target tokens", ours.get("target_tokens"), base.get("target_tokens"), ".0f", True),
        (memory, ours.get("peak_memory_mb"), base.get("peak_memory_mb"), ".0f", False),
        (f"final train loss (last {LAST_STEPS} steps)", ours.get("final_loss"), base.get("final_loss"), ".3f", False),
        ("held-out loss after training", ours.get("heldout_loss"), base.get("heldout_loss"), ".3f", False),
    ]


def print_results(results: dict[str, Any]) -> None:
    """Print the comparison table and where the files went."""
    from steper_dspy.evals.experiment.report import console

    settings = results["settings"]
    title = (
        f"Training: ours vs TRL SFTTrainer ({settings['steps']} steps x {settings['batch_size']} samples"
        f" x {settings['grad_accum']} accumulation, LoRA r={settings['lora_r']}, {results['data']['precision']})"
    )
    if "trl" in results:
        console.print(
            comparison_table(title, table_rows(results), ours="ours (train_student)", baseline="TRL SFTTrainer")
        )
    if "ours-unpacked" in results:
        rows = table_rows(results, "ours-unpacked")
        console.print(
            comparison_table("Packed chains vs one sample a sequence", rows, ours="packed", baseline="unpacked")
        )
    data = results["data"]
    console.print(
        f"samples: {data['train_samples']} train + {data['eval_samples']} held-out from {data['source']}, "
        f"prompt {data['prompt_tokens_mean']:.0f} / target {data['target_tokens_mean']:.0f} tokens on average; "
        f"base model held-out loss {_fmt_loss(data.get('base_heldout_loss'))}"
    )


def markdown(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    return markdown_table(table_rows(results), ours="ours (train_student)", baseline="TRL SFTTrainer")


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _default_model() -> str:
    from steper_dspy.evals.experiment.quickstart import smollm2_student

    return smollm2_student()


def _samples(settings: TrainingBenchmark, model: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The training and held-out samples (only ones both trainers take whole) and a description of them."""
    from steper_dspy.evals.speed.samples import gold_chain_samples, harvest_file_samples
    from steper_dspy.training.data import tokenize_sample, validate_samples

    needed = settings.train_samples + settings.eval_samples
    if settings.harvest:
        source = settings.harvest
        pool = validate_samples(harvest_file_samples(settings.harvest))
    else:
        source = "gold-chain harvest of IRCoT on the synthetic questions"
        pool = validate_samples(gold_chain_samples(math.ceil(needed * 1.2), seed=settings.seed))
    tokenizer = _tokenizer(model)
    lengths = []
    fitting = []
    for sample in pool:
        encoded = tokenize_sample(tokenizer, sample)
        # TRL's chat template also ends the completion with a newline after the end-of-turn token: leave room
        # for it, so that neither trainer truncates or drops a sample the other keeps.
        if len(encoded["input_ids"]) + 2 <= settings.max_length:
            fitting.append(sample)
            target = sum(label >= 0 for label in encoded["labels"])
            lengths.append((len(encoded["input_ids"]) - target, target))
    if not fitting:
        raise SteperError(f"No sample fits --max-length {settings.max_length}: raise it.")
    repeated = len(fitting) < needed
    if repeated and not settings.harvest:
        raise SteperError(f"Only {len(fitting)} of the samples fit --max-length {settings.max_length}; raise it.")
    if settings.eval_samples and len(fitting) <= settings.eval_samples:
        raise SteperError(f"{source} has {len(fitting)} fitting samples: too few to hold out {settings.eval_samples}.")
    held_out = fitting[-settings.eval_samples :] if settings.eval_samples else []
    train_pool = fitting[: len(fitting) - settings.eval_samples]
    train = [train_pool[i % len(train_pool)] for i in range(settings.train_samples)]
    used = lengths[: min(len(train_pool), len(train))]
    data = {
        "source": source,
        "train_samples": len(train),
        "distinct_train_samples": min(len(train_pool), len(train)),
        "eval_samples": len(held_out),
        "repeated": repeated,
        "prompt_tokens_mean": sum(p for p, _ in used) / len(used),
        "target_tokens_mean": sum(t for _, t in used) / len(used),
        "prompt_tokens_range": [min(p for p, _ in used), max(p for p, _ in used)],
        "target_tokens_range": [min(t for _, t in used), max(t for _, t in used)],
        "precision": _precision(settings),
    }
    if settings.eval_samples:
        data["base_heldout_loss"] = _base_heldout_loss(model, held_out, settings)
    return train, held_out, data


def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from steper_dspy.lm.models import quiet_transformers, resolve_model

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_model(model))


def _precision(settings: TrainingBenchmark) -> str:
    return "bf16 autocast" if _use_bf16(settings) else "fp32"


def _use_bf16(settings: TrainingBenchmark) -> bool:
    import torch

    from steper_dspy.lm.models import default_dtype

    if settings.bf16 is not None:
        return settings.bf16
    return default_dtype("cuda" if torch.cuda.is_available() else "cpu") == torch.bfloat16


def _base_heldout_loss(model: str, held_out: list[dict[str, Any]], settings: TrainingBenchmark) -> float:
    from steper_dspy.lm.models import load_model

    net, tokenizer = load_model(model, dtype="float32")
    return heldout_loss(net, tokenizer, held_out, settings)


def heldout_loss(net: Any, tokenizer: Any, samples: list[dict[str, Any]], settings: TrainingBenchmark) -> float:
    """Mean token cross-entropy of `net` on the targets of `samples`, computed the same way for any model.

    Args:
        net: A causal LM (plain or peft), in any mode; it is put in eval mode.
        tokenizer: Its tokenizer.
        samples: Validated step samples.
        settings: Give the batch size, length limit and precision.
    """
    import torch

    from steper_dspy.training.data import StageCollator, build_training_data
    from steper_dspy.training.trainer import accepts_logits_to_keep, target_token_losses

    data = build_training_data(samples, tokenizer, ("init", "expand", "aggregate"), settings.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = StageCollator(pad_token_id=pad)
    device = next(net.parameters()).device
    total, count = 0.0, 0
    net.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=_use_bf16(settings)):
        for start in range(0, len(data.features), settings.batch_size):
            batch = {k: v.to(device) for k, v in collate(data.features[start : start + settings.batch_size]).items()}
            losses, _ = target_token_losses(net, batch, trim_logits=accepts_logits_to_keep(net))
            total += float(losses.sum())
            count += losses.numel()
    return total / max(count, 1)


def _run(job: _Job, isolate: bool) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    if isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            run = pool.submit(_train, job).result()
    else:
        run = _train(job)
    # The 1-minute load average around the run: above the core count, other work competed for the CPU.
    run["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return run


def _train(job: _Job) -> dict[str, Any]:
    """One trainer's run (in its own process when isolated): train, then measure the held-out loss."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = _train_trl(job) if job.trainer == "trl" else _train_ours(job, pack=job.trainer == "ours")
    if cuda:
        run["peak_memory_mb"], run["memory_kind"] = torch.cuda.max_memory_allocated() / 2**20, "cuda"
    else:
        run["peak_memory_mb"], run["memory_kind"] = peak_rss_mb(), "rss"
    run["memory_isolated"] = multiprocessing.current_process().name != "MainProcess"
    net, tokenizer = run.pop("_model")
    if job.eval_samples:
        run["heldout_loss"] = heldout_loss(net, tokenizer, job.eval_samples, job.settings)
    losses = run["losses"]
    run["final_loss"] = sum(losses[-LAST_STEPS:]) / len(losses[-LAST_STEPS:]) if losses else None
    run["tokens_per_second"] = run["tokens"] / run["train_seconds"] if run["train_seconds"] > 0 else None
    return run


def _train_ours(job: _Job, *, pack: bool) -> dict[str, Any]:
    import json

    from steper_dspy.lm.models import load_model
    from steper_dspy.training import train_student

    config = job.settings.training_config(pack=pack)
    result = train_student(job.samples, job.model, job.output_dir, config, resume=False, progress=False)
    rows = [json.loads(line) for line in result.log_path.read_text().splitlines() if line.strip()]
    tokenizer = _tokenizer(job.model)
    targets = sum(sum(x >= 0 for x in _encode(tokenizer, s)["labels"]) for s in job.samples)
    net, tokenizer = load_model(result.output_dir, dtype="float32")
    return {
        "trainer": "steper_dspy.training.train_student",
        "train_seconds": result.train_seconds,
        "tokens": round(result.tokens_per_second * result.train_seconds),
        "target_tokens": targets,
        "losses": [row["ce"] for row in rows if "ce" in row],
        "steps": rows[-1]["step"] if rows else 0,
        "_model": (net, tokenizer),
    }


def _encode(tokenizer: Any, sample: dict[str, Any]) -> dict[str, list[int]]:
    from steper_dspy.training.data import tokenize_sample

    return tokenize_sample(tokenizer, sample)


def _train_trl(job: _Job) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    trl = require("trl", "trl")
    from steper_dspy.lm.models import load_model
    from steper_dspy.training.train import checkpointing_arguments, lora_config

    config = job.settings.training_config()
    cuda = torch.cuda.is_available()
    net, tokenizer = load_model(job.model, device="cpu", trainable=True)
    net.config.use_cache = False
    rows = [{"prompt": s["messages"][:-1], "completion": [s["messages"][-1]]} for s in job.samples]
    lora = lora_config(config)  # the very LoRA settings our trainer uses
    args = trl.SFTConfig(
        output_dir=job.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=0,
        max_steps=config.max_steps,
        bf16=_use_bf16(job.settings),
        use_cpu=not cuda,
        **checkpointing_arguments(trl.SFTConfig, False),  # SFTConfig turns it on by default; ours is off
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = trl.SFTTrainer(
        model=net, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    trainer.remove_callback(PrinterCallback)  # as ours: no log line per step on stdout
    targets = sum(sum(x >= 0 for x in labels) for labels in trainer.train_dataset["labels"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [row for row in trainer.state.log_history if "loss" in row]
    return {
        "trainer": f"trl.SFTTrainer {trl.__version__}",
        "train_seconds": seconds,
        "tokens": float(logs[-1]["num_tokens"]) if logs else 0.0,
        "target_tokens": targets,
        "losses": [row["loss"] for row in logs],
        "steps": trainer.state.global_step,
        "_model": (trainer.model, tokenizer),
    }


def _plot(runs: dict[str, dict[str, Any]], out: Path) -> Path:
    names = {"ours": "ours (packed)", "ours-unpacked": "ours (unpacked)", "trl": "TRL SFTTrainer"}
    figures = [("tokens/s (higher is better)", "tokens_per_second"), ("peak memory MiB", "peak_memory_mb")]
    figures.append(("held-out loss", "heldout_loss"))
    panels = [(title, [""], {names[k]: [run.get(key)] for k, run in runs.items()}) for title, key in figures]
    return bar_plot(out, panels)
