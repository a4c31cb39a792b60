"""STEPER: step-wise distillation of a multi-step RAG teacher into a local student, as a DSPy teleprompter."""

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt.bootstrap_finetune import assert_structural_equivalency
from dspy.teleprompt.teleprompt import Teleprompter

from steper_dspy.adapter import student_adapter
from steper_dspy.compilers.filters import StepFilter
from steper_dspy.compilers.harvest import HarvestReport, Metric, harvest
from steper_dspy.compilers.store import HarvestStore
from steper_dspy.compilers.student import run_on_student, save_compiled, student_lm
from steper_dspy.errors import SteperError
from steper_dspy.lm.local import program_concurrency
from steper_dspy.metrics import answer_exact_match
from steper_dspy.programs.stages import predictor_stages
from steper_dspy.stages import STAGES
from steper_dspy.training import TrainingConfig, TrainingResult, train_student, training_identity, validate_samples

logger = logging.getLogger(__name__)


class STEPER(Teleprompter):
    """Compile a staged multi-step RAG program into a small local student (Lee et al., EMNLP 2025).

    ``compile`` runs the teacher over the trainset, keeps the chains whose answer passes the metric,
    turns every reasoning step into a stage-tagged sample, trains the student with a loss weighted per
    stage by learnable difficulty parameters, and returns the program running on the trained student.

    Example:
        ```python
        teleprompter = STEPER("HuggingFaceTB/SmolLM2-135M-Instruct", output_dir="runs/steper")
        compiled = teleprompter.compile(IRCoT(retriever), trainset=train, teacher=dspy.LM("openai/gpt-4o-mini"))
        ```

    Args:
        student_model: The student's base model: a hub id, a local folder or a GGUF file.
        output_dir: Where the harvest file, the trained model and the compiled program go.
        metric: Scores a teacher chain's prediction; ``metric(example, prediction, trace)``.
        threshold: Least metric score for a chain to be kept.
        training: Training settings; their `weighting` and `stages` are set from the arguments below.
        weighting: ``"adaptive"`` (learnable per-stage difficulty), ``"uniform"`` or ``"fixed"``.
        stages: Which stages' samples train the student (default all three).
        rollouts: Teacher chains per question (extra ones sampled at `rollout_temperature`).
        rollout_temperature: Sampling temperature for rollouts after the first.
        step_filter: Trains without the steps of kept chains that a step filter flags (e.g.
            ``GroundedStepFilter()``, the paper's open question 1). The harvest records every step with the
            verdict of this filter (of `GroundedStepFilter` when None), so compilers sharing a harvest file
            can differ in this setting alone.
        harvest_path: The harvest JSONL (default ``<output_dir>/harvest.jsonl``); share it between
            compilers to train them all on the same chains.
        num_threads: Parallel teacher calls; by default what the teacher's LM serves at once (see
            :func:`steper_dspy.lm.program_concurrency`), 1 for an API model.
        lm_kwargs: Passed to :func:`steper_dspy.compilers.student_lm` for the returned student LM.
        progress: Show progress bars.
    """

    weighting_default = "adaptive"
    stages_default: tuple[str, ...] = tuple(stage.value for stage in STAGES)

    def __init__(
        self,
        student_model: str | Path,
        *,
        output_dir: str | Path,
        metric: Metric = answer_exact_match,
        threshold: float = 1.0,
        training: TrainingConfig | None = None,
        weighting: str | None = None,
        stages: Sequence[str] | None = None,
        rollouts: int = 1,
        rollout_temperature: float = 0.7,
        step_filter: StepFilter | None = None,
        harvest_path: str | Path | None = None,
        num_threads: int | None = None,
        lm_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
    ):
        super().__init__()
        self.student_model = student_model
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.threshold = threshold
        self.training = dataclasses.replace(
            training or TrainingConfig(),
            weighting=weighting or self.weighting_default,
            stages=tuple(stages or self.stages_default),
        )
        self.rollouts = rollouts
        self.rollout_temperature = rollout_temperature
        self.step_filter = step_filter
        self.harvest_path = Path(harvest_path) if harvest_path else self.output_dir / "harvest.jsonl"
        self.num_threads = num_threads
        self.lm_kwargs = lm_kwargs or {}
        self.progress = progress
        self.harvest_report: HarvestReport | None = None
        self.training_result: TrainingResult | None = None

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.LM | dspy.Module,
        valset: list[dspy.Example] | None = None,
    ) -> dspy.Module:
        """Harvest the teacher's chains, train the student, and return `student` running on it.

        Args:
            student: The staged program to compile (a copy is returned; it is not modified).
            trainset: Training questions with gold answers.
            teacher: The teacher: an LM (the student program runs on it) or a teacher program (for
                instance one improved with DSPy's few-shot optimizers; its demos never reach the samples).
            valset: Unused by training; accepted for the teleprompter interface.

        Returns:
            A copy of `student` whose predictors run on the trained student model.
        """
        self.harvest(student, trainset=trainset, teacher=teacher)
        self.train()
        return self._compiled_program(student, self.training_result.output_dir)

    def harvest(
        self, student: dspy.Module, *, trainset: list[dspy.Example], teacher: dspy.LM | dspy.Module
    ) -> HarvestReport:
        """The first half of ``compile``: run the teacher and append its chains to the harvest file (resumable)."""
        predictor_stages(student)
        self.harvest_report = self._harvest(student, self._prepare_teacher(student, teacher), trainset)
        return self.harvest_report

    def train(self) -> TrainingResult:
        """The second half of ``compile``: train the student on the harvest file's kept samples."""
        self.training_result = self._train()
        return self.training_result

    def _prepare_teacher(self, student: dspy.Module, teacher: dspy.LM | dspy.Module) -> dspy.Module:
        if isinstance(teacher, dspy.Module):
            try:
                assert_structural_equivalency(student, teacher)
            except AssertionError as err:
                raise SteperError(f"The teacher program must have the student program's predictors: {err}") from None
            return teacher
        if isinstance(teacher, dspy.BaseLM):
            program = student.deepcopy()
            program.set_lm(teacher)
            return program
        raise SteperError(f"teacher must be a dspy.LM or a dspy.Module, not {type(teacher).__name__}.")

    def _harvest(self, student: dspy.Module, teacher: dspy.Module, trainset: list[dspy.Example]) -> HarvestReport:
        if not trainset:
            raise SteperError("The trainset is empty: STEPER needs training questions with gold answers.")
        report = harvest(
            student,
            teacher,
            trainset,
            HarvestStore(self.harvest_path),
            metric=self.metric,
            threshold=self.threshold,
            rollouts=self.rollouts,
            rollout_temperature=self.rollout_temperature,
            step_filter=self.step_filter,
            adapter=student_adapter(),
            num_threads=self.num_threads or program_concurrency(teacher),
            progress=self.progress,
        )
        logger.info(report.summary())
        if self.progress:
            print(report.summary())
        if report.kept == 0 and report.chains:
            raise SteperError(
                f"No teacher chain passed the metric ({report.chains} tried, dropped: {report.dropped}); "
                "use a stronger teacher, more rollouts, or a lower threshold."
            )
        return report

    def training_identity(self) -> dict[str, Any]:
        """What decides the model ``train`` makes from the harvest file (samples' hash, base model, settings),
        computed without training: results derived from the trained student can be keyed on it."""
        return training_identity(validate_samples(self._samples()), self.student_model, self.training)

    def _train(self) -> TrainingResult:
        return train_student(
            self._samples(), self.student_model, self.output_dir / "model", self.training, progress=self.progress
        )

    def _samples(self) -> list[dict[str, Any]]:
        if not self.harvest_path.exists():
            raise SteperError(f"No harvest at {self.harvest_path}: harvest first (`steper harvest` or compile).")
        store = HarvestStore(self.harvest_path)
        store.check_layout(student_adapter().layout)
        samples = list(store.samples(drop_filtered=self.step_filter is not None, rollouts=self.rollouts))
        if not samples:
            raise SteperError(f"{self.harvest_path} holds no kept chain: use a stronger teacher or a lower threshold.")
        return samples

    def _compiled_program(self, student: dspy.Module, model_dir: Path) -> dspy.Module:
        program = run_on_student(student.deepcopy(), student_lm(model_dir, **self.lm_kwargs))
        if hasattr(getattr(program, "retriever", None), "save"):
            save_compiled(program, self.output_dir / "program", model_dir=model_dir)
        return program


class VanillaKD(STEPER):
    """The paper's baseline: train only on the final step (the aggregation call with all passages and
    the teacher's final output), with a plain token-mean loss. Same interface as :class:`STEPER`."""

    weighting_default = "uniform"
    stages_default = ("aggregate",)


class StepwiseKD(STEPER):
    """Uniform step-wise distillation: every step, equal weight per token (what DSPy's
    ``BootstrapFinetune`` does, with stage-correct samples). Same interface as :class:`STEPER`."""

    weighting_default = "uniform"
