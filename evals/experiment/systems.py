"""The systems a run trains: STEPER, the paper's baselines and its ablations, each a teleprompter with its settings.

Every system is one of the teleprompter classes (`STEPER`, `VanillaKD`, `StepwiseKD`) with a stage subset, a
weighting or the step filter; all of them train on the same harvested chains (the run's ``harvest.jsonl``).
"""

from dataclasses import dataclass, field
from pathlib import Path

from steper_dspy.compilers import STEPER, GroundedStepFilter, StepwiseKD, VanillaKD
from steper_dspy.errors import SteperError
from steper_dspy.evals.experiment.config import RunConfig
from steper_dspy.evals.experiment.lms import student_lm_kwargs
from steper_dspy.metrics import METRICS
from steper_dspy.stages import STAGES

HARVEST_FILE = "harvest.jsonl"
ALL_STAGES = tuple(stage.value for stage in STAGES)


@dataclass(frozen=True)
class System:
    """A student system: a teleprompter class and what it changes from the class's defaults.

    Attributes:
        name: The name shown in reports.
        teleprompter: `STEPER`, `VanillaKD` or `StepwiseKD`.
        stages: Which stages' samples it trains on (None: the class's default).
        weighting: ``adaptive``, ``uniform`` or ``fixed`` (None: the class's default).
        stage_weights: The stage weights of ``fixed``.
        step_filter: Train without the steps the grounded-step filter flagged at harvest.
    """

    name: str
    teleprompter: type[STEPER]
    stages: tuple[str, ...] | None = None
    weighting: str | None = None
    stage_weights: dict[str, float] = field(default_factory=dict)
    step_filter: bool = False


SYSTEMS = {
    "vanilla-kd": System("Vanilla-KD", VanillaKD),
    "stepwise-kd": System("step-wise KD (uniform)", StepwiseKD),
    "steper": System("STEPER", STEPER),
    # Ablations: the data of which stages (adaptive weighting) ...
    "steper-agg-init": System("STEPER: aggregate + init data", STEPER, stages=("init", "aggregate")),
    "steper-agg-expand": System("STEPER: aggregate + expand data", STEPER, stages=("expand", "aggregate")),
    # ... which weighting on all stages (uniform is stepwise-kd) ...
    "fixed": System(
        "step-wise KD (fixed 1:1:1 per stage)",
        StepwiseKD,
        weighting="fixed",
        stage_weights=dict.fromkeys(ALL_STAGES, 1.0),
    ),
    # ... and which steps (the paper's open question 1: a correct chain's ungrounded steps).
    "steper-grounded": System("STEPER + grounded-step filter", STEPER, step_filter=True),
}
MAIN_SYSTEMS = ("vanilla-kd", "stepwise-kd", "steper")
ABLATIONS = ("steper-agg-init", "steper-agg-expand", "fixed", "steper-grounded")


def configured_system(config: RunConfig) -> System:
    """The system a run's own settings describe (`steper compile`, `steper train`, the quickstart)."""
    return System(
        f"STEPER student ({config.weighting})",
        STEPER,
        stages=tuple(config.stages),
        weighting=config.weighting,
        stage_weights=dict(config.training.get("stage_weights") or {}),
        step_filter=config.step_filter,
    )


def make_teleprompter(config: RunConfig, system: System, output: str | Path, *, progress: bool = True) -> STEPER:
    """The system's teleprompter for a run: trains into `output`, on the run's shared harvest file."""
    training = config.training_config()
    if system.stage_weights:
        training = type(training).from_dict({**training.to_dict(), "stage_weights": system.stage_weights})
    output = Path(output)
    return system.teleprompter(
        config.student,
        output_dir=output,
        metric=METRICS[config.metric],
        threshold=config.threshold,
        training=training,
        weighting=system.weighting,
        stages=system.stages,
        rollouts=config.rollouts,
        step_filter=GroundedStepFilter() if system.step_filter else None,
        harvest_path=Path(config.output) / HARVEST_FILE,
        num_threads=config.threads,
        lm_kwargs=student_lm_kwargs(config, output / "model"),
        progress=progress,
    )


def chosen_systems(names: list[str] | tuple[str, ...], *, ablations: bool = False) -> list[str]:
    """The systems named (and the ablations when asked), checked against `SYSTEMS`."""
    chosen = list(dict.fromkeys(names))
    if ablations:
        chosen += [name for name in ABLATIONS if name not in chosen]
    unknown = [name for name in chosen if name not in SYSTEMS]
    if unknown:
        raise SteperError(f"Unknown system(s) {unknown}: choose from {sorted(SYSTEMS)}.")
    return chosen
