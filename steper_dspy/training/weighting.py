"""Combining per-stage losses: STEPER's difficulty-aware (uncertainty) weighting and its baselines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from steper_dspy.errors import SteperError

WEIGHTING_FILE = "stage_weighting.safetensors"


def stage_token_losses(
    token_losses: torch.Tensor, token_stages: torch.Tensor, num_stages: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and token count per stage.

    Args:
        token_losses: Cross-entropy of each target token, shape `[N]`.
        token_stages: The stage index of each target token, shape `[N]`.
        num_stages: How many stages there are.

    Returns:
        `(losses, counts)`, shape `[num_stages]` each; a stage without tokens has loss 0 and count 0.
    """
    sums = token_losses.new_zeros(num_stages).index_add(0, token_stages, token_losses)
    counts = torch.bincount(token_stages, minlength=num_stages).to(token_losses.dtype)
    return sums / counts.clamp(min=1), counts


class StageWeighting(nn.Module):
    """Turns per-token losses tagged with stages into the training objective.

    `adaptive` is STEPER's difficulty-aware loss, `sum_j L_j / (2 sigma_j^2) + log sigma_j`, with one
    learnable log-variance `s_j = log sigma_j^2` per stage (initialised to 0, sigma 1), which gives
    `sum_j 0.5 * exp(-s_j) * L_j + 0.5 * s_j`: a stage whose loss stays high gets a larger sigma and a
    smaller weight. `uniform` is the mean token cross-entropy over every target token of the batch;
    `fixed` is `sum_j w_j L_j`. `L_j` is the mean token cross-entropy of stage `j`'s targets in the batch,
    and stages absent from a batch contribute nothing.

    Args:
        stages: The stage names, in the order of the stage indices passed to `forward`.
        mode: `"adaptive"`, `"uniform"` or `"fixed"`.
        fixed_weights: Weight per stage name, for `"fixed"`.
    """

    def __init__(
        self,
        stages: Sequence[str],
        mode: str = "adaptive",
        fixed_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.stages = tuple(str(getattr(s, "value", s)) for s in stages)
        if mode not in ("adaptive", "uniform", "fixed"):
            raise SteperError(f"Unknown stage weighting {mode!r}: use 'adaptive', 'uniform' or 'fixed'.")
        self.mode = mode
        weights = [1.0] * len(self.stages)
        if mode == "fixed":
            missing = [s for s in self.stages if s not in (fixed_weights or {})]
            if missing:
                raise SteperError(f"Fixed stage weighting needs a weight for every stage; missing {missing}.")
            weights = [float(fixed_weights[s]) for s in self.stages]
        self.register_buffer("fixed_weights", torch.tensor(weights), persistent=False)
        # Learnable only in adaptive mode; kept in the other modes so every run saves the same state.
        self.log_vars = nn.Parameter(torch.zeros(len(self.stages)), requires_grad=mode == "adaptive")

    def combine(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """The adaptive or fixed objective from per-stage mean losses.

        Args:
            losses: `L_j` per stage, shape `[num_stages]`.
            present: Which stages had tokens in the batch (default: all).

        Returns:
            A scalar loss.
        """
        if self.mode == "uniform":
            raise SteperError("Uniform weighting averages tokens, not stage losses: call forward() with token losses.")
        present = torch.ones_like(losses, dtype=torch.bool) if present is None else present.bool()
        if self.mode == "adaptive":
            log_vars = self.log_vars.to(losses.dtype)
            terms = 0.5 * torch.exp(-log_vars) * losses + 0.5 * log_vars
        else:
            terms = self.fixed_weights.to(losses) * losses
        return torch.where(present, terms, torch.zeros_like(terms)).sum()

    def forward(self, token_losses: torch.Tensor, token_stages: torch.Tensor) -> torch.Tensor:
        """The objective for one batch.

        Args:
            token_losses: Cross-entropy of every target token, shape `[N]`.
            token_stages: Each token's stage index into `stages`, shape `[N]`.

        Returns:
            The scalar objective.
        """
        if self.mode == "uniform":
            return token_losses.mean() if token_losses.numel() else token_losses.sum()
        losses, counts = stage_token_losses(token_losses, token_stages, len(self.stages))
        return self.combine(losses, counts > 0)

    def sigmas(self) -> dict[str, float]:
        """The current sigma per stage, `exp(s_j / 2)` (1.0 for all stages unless adaptive)."""
        values = torch.exp(0.5 * self.log_vars.detach().float()).tolist()
        return dict(zip(self.stages, values, strict=True))

    def effective_weights(self) -> dict[str, float]:
        """The factor each stage's loss is multiplied by: `1 / (2 sigma_j^2)`, `w_j`, or 1 (uniform)."""
        if self.mode == "adaptive":
            values = (0.5 * torch.exp(-self.log_vars.detach().float())).tolist()
        else:
            values = self.fixed_weights.tolist()
        return dict(zip(self.stages, values, strict=True))

    def save(self, folder: str | Path) -> Path:
        """Write the log-variances to `folder/stage_weighting.safetensors` (with the stage names and mode)."""
        from safetensors.torch import save_file

        path = Path(folder) / WEIGHTING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"stages": ",".join(self.stages), "mode": self.mode}
        save_file({"log_vars": self.log_vars.detach().float().cpu().contiguous()}, str(path), metadata=metadata)
        return path

    def load(self, folder: str | Path) -> bool:
        """Restore the log-variances saved by `save` in `folder`; returns False when there is no file.

        Raises:
            SteperError: The file was saved for other stages.
        """
        from safetensors import safe_open

        path = Path(folder) / WEIGHTING_FILE
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            saved_stages = tuple((f.metadata() or {}).get("stages", "").split(","))
            log_vars = f.get_tensor("log_vars")
        if saved_stages != self.stages:
            raise SteperError(
                f"{path} holds stage weights for stages {list(saved_stages)}, not {list(self.stages)}: "
                "resume with the same TrainingConfig.stages, or start afresh with resume=False."
            )
        with torch.no_grad():
            self.log_vars.copy_(log_vars.to(self.log_vars))
        return True

    def extra_repr(self) -> str:
        sigmas = ", ".join(f"{k}={v:.3g}" for k, v in self.sigmas().items())
        return f"mode={self.mode!r}, sigmas=({sigmas})"
