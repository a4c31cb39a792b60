"""A `transformers.Trainer` that weights the loss per reasoning stage, and its logging callbacks."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import TrainOutput

from steper_dspy.errors import SteperError
from steper_dspy.lm.chat import IGNORE_INDEX
from steper_dspy.training.weighting import WEIGHTING_FILE, StageWeighting, stage_token_losses

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.bin"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class _AlreadyFinished(Exception):
    """The run was resumed from a checkpoint of its last step: there is nothing left to train."""


class StageTrainer(Trainer):
    """`Trainer` with STEPER's per-stage loss.

    The loss is computed from the logits (the model never sees the labels): per-token cross-entropy on
    the target tokens, grouped by each sample's stage and combined by a `StageWeighting`. The weighting's
    log-variances are trained in their own optimizer parameter group, kept out of the model's weights, and
    saved with every checkpoint (`stage_weighting.safetensors`) so that resuming restores them.

    Everything else (the loop, mixed precision, gradient accumulation, checkpoints, `accelerate launch`)
    is the stock Trainer's. Batches must carry `labels` and `label_stages` (see `StageCollator`).

    Args:
        *args: Passed to `Trainer`.
        stage_weighting: How to combine the stage losses.
        sigma_learning_rate: Learning rate of the weighting's log-variances.
        **kwargs: Passed to `Trainer`.
    """

    # compute_loss returns a per-batch mean; the Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, stage_weighting: StageWeighting, sigma_learning_rate: float = 1e-2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage_weighting = stage_weighting.to(self.args.device)
        self.sigma_learning_rate = sigma_learning_rate
        num_stages = len(stage_weighting.stages)
        self._stage_loss_sums = torch.zeros(num_stages, device=self.args.device)
        self._stage_token_counts = torch.zeros(num_stages, device=self.args.device)
        self._tokens_seen = torch.zeros((), dtype=torch.long, device=self.args.device)
        self._trim_logits = accepts_logits_to_keep(self.model)

    @property
    def tokens_seen(self) -> int:
        """Tokens of the samples (prompt and target, as they would be unpacked) trained on so far."""
        return int(self._tokens_seen.item())

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer plus a group for the stage log-variances (own lr, no weight decay)."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        log_vars = self.stage_weighting.log_vars
        if created and log_vars.requires_grad:
            optimizer.add_param_group({"params": [log_vars], "lr": self.sigma_learning_rate, "weight_decay": 0.0})
            # The Trainer clears gradients with model.zero_grad(), which does not reach these parameters.
            optimizer.register_step_post_hook(lambda *_: setattr(log_vars, "grad", None))
        return optimizer

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The stage-weighted loss of one batch; also tallies per-stage losses for the logs.

        Batches come from `StageCollator`: `labels` holds the id each position predicts (already shifted, so
        that packed chains need no next-position rule) and `label_stages` the stage of each.
        """
        num_tokens = inputs.get("num_tokens")
        token_losses, token_stages = target_token_losses(model, inputs, trim_logits=self._trim_logits)
        loss = self.stage_weighting(token_losses, token_stages)
        if model.training:
            with torch.no_grad():
                means, counts = stage_token_losses(token_losses, token_stages, len(self.stage_weighting.stages))
                self._stage_loss_sums += means * counts
                self._stage_token_counts += counts
                self._tokens_seen += num_tokens if num_tokens is not None else inputs["input_ids"].numel()
        return (loss, None) if return_outputs else loss

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step; across processes, averages the log-variance gradients as DDP does the model's."""
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the checkpoint of the run's last step, the Trainer's loop would take one step past
            # max_steps (it checks for the end only after a step) unless the last step closed an epoch.
            raise _AlreadyFinished
        loss = super().training_step(model, inputs, num_items_in_batch)
        log_vars = self.stage_weighting.log_vars
        if self.accelerator.num_processes > 1 and log_vars.grad is not None:
            log_vars.grad = self.accelerator.reduce(log_vars.grad, reduction="mean")
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the per-stage losses (`loss_<stage>`), sigmas (`sigma_<stage>`) and the plain token
        cross-entropy (`ce`) since the last log to each training log."""
        if "loss" in logs:  # a training log, which every process writes: the reduction below is collective
            sums = self.accelerator.reduce(self._stage_loss_sums.clone(), reduction="sum")
            counts = self.accelerator.reduce(self._stage_token_counts.clone(), reduction="sum")
            self._stage_loss_sums.zero_()
            self._stage_token_counts.zero_()
            if counts.sum() > 0:
                logs["ce"] = float(sums.sum() / counts.sum())
            for stage, total, count in zip(self.stage_weighting.stages, sums.tolist(), counts.tolist(), strict=True):
                if count > 0:
                    logs[f"loss_{stage}"] = total / count
            for stage, sigma in self.stage_weighting.sigmas().items():
                logs[f"sigma_{stage}"] = sigma
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`, first restoring the stage weighting from the checkpoint resumed from."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise SteperError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            restored = self.stage_weighting.load(resume_from_checkpoint)
            if not restored and self.stage_weighting.mode == "adaptive":
                logger.warning(
                    "Checkpoint %s has no %s: the stage weights restart from sigma = 1.",
                    resume_from_checkpoint,
                    WEIGHTING_FILE,
                )
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except _AlreadyFinished:
            # The checkpoint's weights, optimizer and state are loaded: the model is the finished one.
            self.is_in_train = False
            return TrainOutput(self.state.global_step, 0.0, {})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; a checkpoint (internal call) also gets the stage weighting, before its
        trainer state is written, so that a complete checkpoint always holds it."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            # A pickle of the arguments, which nothing reads back; the settings live in JSON files instead.
            (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            if _internal_call:
                self.stage_weighting.save(folder)


def target_token_losses(
    model: torch.nn.Module, batch: dict[str, Any], *, trim_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of every target token of a `StageCollator` batch, and the stage index of each.

    `labels` holds the id each position predicts (already shifted, so that packed chains need no next-position
    rule). With `trim_logits`, logits are computed only at the positions where some row has a target: the
    vocabulary projection (a fifth of a 135M model's compute) and the fp32 cross-entropy then skip the prompts,
    which are most of a packed chain.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_stages", "num_tokens", "length")}
    labels, label_stages = batch["labels"], batch["label_stages"]
    if inputs["attention_mask"].dim() == 4:
        inputs["attention_mask"] = _attention_mask_for(model, inputs["attention_mask"])
    if trim_logits:
        positions = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        inputs["logits_to_keep"] = positions
        labels, label_stages = labels[:, positions], label_stages[:, positions]
    outputs = model(**inputs, use_cache=False)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if trim_logits and logits.shape[1] != labels.shape[1]:  # a forward that takes the argument but ignores it
        logits = logits[:, positions]
    token_ce = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    mask = labels.reshape(-1) != IGNORE_INDEX
    return token_ce[mask], label_stages.reshape(-1)[mask]


class StageLogCallback(TrainerCallback):
    """Appends every training log (step, epoch, loss, `loss_<stage>`, `sigma_<stage>`, ...) to a JSONL file,
    and makes sure the last step is logged.

    Args:
        path: The `stage_log.jsonl` file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class StageProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar, showing the loss and per-stage losses as its postfix instead of printing logs."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs or "loss" not in logs:
            return
        shown = {"loss": logs["loss"]}
        shown.update({k[5:]: v for k, v in logs.items() if k.startswith("loss_")})
        self.training_bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)


def last_checkpoint(folder: str | Path) -> str | None:
    """The latest complete checkpoint in `folder`, or None.

    The Trainer writes a checkpoint's trainer state last, so a checkpoint is complete once that file holds its
    step. A run killed while writing a checkpoint leaves it without that file, or with a torn one: such a
    checkpoint is passed over for the one before it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name))), reverse=True)
    for step, path in steps:
        if _saved_step(path) == step:
            return os.fspath(path)
    return None


def _saved_step(checkpoint: Path) -> int | None:
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, torn (JSONDecodeError) or not UTF-8
        return None
    return state.get("global_step") if isinstance(state, dict) else None


def trim_log(path: str | Path, max_step: int) -> None:
    """Drop the rows of a `stage_log.jsonl` after `max_step` (those a resumed run will log again)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by the interruption
    # Replaced in one step, so that a run killed right here keeps the old log rather than half of it.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def _attention_mask_for(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask (True: attend) as the model's attention takes it: SDPA and flex read booleans; eager
    attention adds the mask to its scores, so it gets 0 and the dtype's minimum."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if implementation == "sdpa":
        return mask
    if implementation != "eager":
        raise SteperError(
            f"Packed chains need an attention that takes a custom mask (sdpa or eager), not {implementation!r}: "
            "set TrainingConfig(pack_steps=False)."
        )
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min
    )


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (computes output logits for the last positions only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
