"""Harvesting: run a teacher program over a trainset, trace it, and keep stage-tagged step samples."""

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError, ContextWindowExceededError
from dspy.utils.parallelizer import ParallelExecutor
from tqdm.auto import tqdm

from steper_dspy.adapter import student_adapter
from steper_dspy.adapter import teacher_adapter as default_teacher_adapter
from steper_dspy.compilers.filters import GroundedStepFilter, StepFilter
from steper_dspy.compilers.store import ChainRecord, HarvestStore
from steper_dspy.errors import SteperError
from steper_dspy.lm.errors import ServerDiedError
from steper_dspy.programs.stages import stage_by_predictor_id
from steper_dspy.samples import StepSample
from steper_dspy.stages import STAGES

logger = logging.getLogger(__name__)

Metric = Callable[..., Any]


@dataclass
class HarvestReport:
    """What a harvest produced: chains kept and dropped (and why), and step samples per stage."""

    path: Path
    chains: int = 0
    kept: int = 0
    questions: int = 0
    questions_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    samples_by_stage: dict[str, int] = field(default_factory=dict)
    filtered_steps: dict[str, int] = field(default_factory=dict)
    new_chains: int = 0
    lm_failures: int = 0
    failed_chains: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def from_store(
        cls,
        store: HarvestStore,
        *,
        new_chains: int = 0,
        lm_failures: int = 0,
        failed_chains: Sequence[tuple[str, int]] = (),
        example_ids: Collection[str] | None = None,
        rollouts: int | None = None,
    ) -> "HarvestReport":
        """The report over the chains in `store`, with the counts of the harvest that just ran.

        Args:
            store: The harvest file.
            new_chains: Chains this harvest added.
            lm_failures: Chains this harvest could not record because the teacher failed.
            failed_chains: Those chains' ``(example_id, rollout)``, rollout by rollout in trainset order.
            example_ids: Count only these questions' chains (default every chain), e.g. to compare the yield of
                two teachers on the same questions.
            rollouts: Count only each question's first `rollouts` chains (1: the greedy chain alone).
        """
        report = cls(path=store.path, new_chains=new_chains, lm_failures=lm_failures, failed_chains=list(failed_chains))
        wanted = None if example_ids is None else set(example_ids)  # a list would be searched once per record
        dropped: Counter[str] = Counter()
        filtered: Counter[str] = Counter()
        per_stage: Counter[str] = Counter({stage.value: 0 for stage in STAGES})
        questions: set[str] = set()
        questions_kept: set[str] = set()
        for record in store.records():
            if (wanted is not None and record.example_id not in wanted) or (
                rollouts is not None and record.rollout >= rollouts
            ):
                continue
            report.chains += 1
            questions.add(record.example_id)
            if record.kept:
                report.kept += 1
                questions_kept.add(record.example_id)
                per_stage.update(sample["stage"] for sample in record.samples)
                filtered.update(record.filtered)
            else:
                dropped[record.reason or "unknown"] += 1
        report.dropped, report.filtered_steps, report.samples_by_stage = dict(dropped), dict(filtered), dict(per_stage)
        report.questions, report.questions_kept = len(questions), len(questions_kept)
        return report

    def summary(self) -> str:
        """A few lines for a person: chains kept and dropped (and why), samples per stage."""
        stages = ", ".join(f"{stage} {n}" for stage, n in self.samples_by_stage.items())
        dropped = ", ".join(f"{why} {n}" for why, n in sorted(self.dropped.items())) or "none"
        lines = [
            f"harvest {self.path}: {self.chains} chains of {self.questions} questions ({self.new_chains} new), "
            f"{self.kept} kept ({self.questions_kept} questions with a kept chain), dropped: {dropped}",
            f"step samples: {stages}",
        ]
        if self.filtered_steps:
            lines.append(
                "steps the step filter flagged: " + ", ".join(f"{k} {v}" for k, v in self.filtered_steps.items())
            )
        if self.lm_failures:
            failed = f"{self.lm_failures} chains failed on teacher errors and will be retried by a rerun"
            if self.failed_chains:
                failed += ": " + _chain_list(self.failed_chains)
            lines.append(failed)
        return "\n".join(lines)


def _chain_list(chains: Sequence[tuple[str, int]], shown: int = 10) -> str:
    """`q3, q7 (rollout 1), ...` naming the first `shown` chains, then "and N more"."""
    names = [eid if rollout == 0 else f"{eid} (rollout {rollout})" for eid, rollout in chains[:shown]]
    more = f" and {len(chains) - shown} more" if len(chains) > shown else ""
    return ", ".join(names) + more


def example_id(example: dspy.Example) -> str:
    """The example's `id` field, or a stable hash of its question."""
    if example.get("id") is not None:
        return str(example.id)
    return hashlib.sha256(str(example.question).encode()).hexdigest()[:16]


def harvest(
    student: dspy.Module,
    teacher: dspy.Module,
    trainset: Sequence[dspy.Example],
    store: HarvestStore,
    *,
    metric: Metric,
    threshold: float = 1.0,
    rollouts: int = 1,
    rollout_temperature: float = 0.7,
    step_filter: StepFilter | None = None,
    adapter: dspy.ChatAdapter | None = None,
    teacher_adapter: dspy.Adapter | None = None,
    num_threads: int = 1,
    progress: bool = True,
) -> HarvestReport:
    """Run `teacher` on every (example, rollout) not yet in `store` and append one chain record each.

    Each predictor call of a chain becomes one `StepSample` tagged with its stage (from the program's stage
    mapping, by predictor identity) and step index, formatted with `adapter` against the STUDENT's
    signature and without demonstrations, exactly as the student will be prompted at inference.

    Args:
        student: The program the samples are for (gives each predictor's signature).
        teacher: The program that produces the chains; same predictor names and stages as `student`.
        trainset: Examples with a `question` input and the labels `metric` needs.
        store: Where chains are appended; chains already there are skipped (resume).
        metric: ``metric(example, prediction, trace)``; a chain is kept when its score >= `threshold`.
        threshold: Least score for a chain to be kept.
        rollouts: Teacher chains per question; rollouts after the first sample at `rollout_temperature`.
        rollout_temperature: Sampling temperature of the extra rollouts.
        step_filter: Flags single steps of kept chains (default `GroundedStepFilter`); every step is kept in
            the file with its verdict (`filtered`), and a teleprompter with a step filter trains without the
            flagged ones.
        adapter: The adapter the student will be prompted with (default :func:`student_adapter`).
        teacher_adapter: The adapter the teacher runs with (default :func:`teacher_adapter` with the teacher's demos); a teacher program
            set to run with its own adapter keeps it.
        num_threads: Parallel teacher calls (useful for API teachers).
        progress: Show a progress bar.

    Returns:
        The report over the whole store, old and new chains.

    Raises:
        SteperError: Another harvest is writing to the same file (the store is locked for the whole run).
    """
    adapter = adapter or student_adapter()
    teacher_adapter = teacher_adapter or default_teacher_adapter(teacher)
    step_filter = step_filter or GroundedStepFilter()
    signatures = {name: predictor.signature for name, predictor in student.named_predictors()}
    # Locked for the whole run, so that a second harvest into the same file fails at once.
    with store.writing():
        store.check_layout(adapter.layout)
        jobs = [
            (example, rollout)
            for rollout in range(rollouts)
            for example in trainset
            if (example_id(example), rollout) not in store
        ]
        teachers = {rollout: _teacher_for_rollout(teacher, rollout, rollout_temperature) for rollout in range(rollouts)}
        stage_maps = {rollout: stage_by_predictor_id(program) for rollout, program in teachers.items()}
        bar = tqdm(total=len(jobs), desc="harvest", unit="chain", disable=not progress, dynamic_ncols=True)
        lock = threading.Lock()
        counts = Counter({"kept": len([r for r in store.records() if r.kept])})
        failed: list[int] = []  # indices into jobs
        fatal: list[ServerDiedError] = []  # once the teacher's server is gone, the other chains are not tried

        def run(index: int) -> None:
            example, rollout = jobs[index]
            record = None
            if not fatal:
                try:
                    record = _run_chain(
                        teachers[rollout],
                        teacher_adapter,
                        stage_maps[rollout],
                        example,
                        rollout,
                        signatures,
                        adapter,
                        metric,
                        threshold,
                        step_filter,
                    )
                except ServerDiedError as err:
                    fatal.append(err)
            if record is not None:
                store.append(record)
            with lock:
                counts["lm_failures" if record is None else "kept" if record.kept else "dropped"] += 1
                if record is None:
                    failed.append(index)
                bar.update()
                bar.set_postfix(kept=counts["kept"], dropped=counts["dropped"], errors=counts["lm_failures"])

        executor = ParallelExecutor(
            num_threads=num_threads, max_errors=len(jobs) + 1, disable_progress_bar=True, timeout=10**6
        )
        try:
            executor.execute(run, list(range(len(jobs))))
        finally:
            bar.close()
        failed_chains = [(example_id(jobs[i][0]), jobs[i][1]) for i in sorted(failed)]
        report = HarvestReport.from_store(
            store,
            rollouts=rollouts,  # chains of further rollouts in the file are not this run's (nor trained on)
            new_chains=len(jobs) - counts["lm_failures"],
            lm_failures=counts["lm_failures"],
            failed_chains=failed_chains,
        )
    if fatal:
        raise SteperError(
            f"{fatal[0]} The harvest stopped: {report.chains} chains are saved in {store.path} ({report.new_chains} "
            "new); run the same command again to resume."
        )
    return report


def _teacher_for_rollout(teacher: dspy.Module, rollout: int, temperature: float) -> dspy.Module:
    if rollout == 0:
        return teacher
    sampled = teacher.deepcopy()
    for predictor in sampled.predictors():
        lm = predictor.lm or dspy.settings.lm
        if lm is None:
            raise ValueError("The teacher has no LM: pass teacher=dspy.LM(...) or set one on its predictors.")
        predictor.lm = lm.copy(rollout_id=rollout, temperature=temperature)
    return sampled


def _run_chain(
    teacher: dspy.Module,
    teacher_adapter: dspy.Adapter,
    stages: dict[int, tuple[str, Any]],
    example: dspy.Example,
    rollout: int,
    signatures: dict[str, type[dspy.Signature]],
    adapter: dspy.ChatAdapter,
    metric: Metric,
    threshold: float,
    step_filter: StepFilter,
) -> ChainRecord | None:
    eid = example_id(example)
    with dspy.context(trace=[], adapter=teacher_adapter):
        try:
            prediction = teacher(**example.inputs())
        except AdapterParseError:
            return ChainRecord(eid, rollout, kept=False, reason="parse_error", score=0.0)
        except ContextWindowExceededError as err:  # the same prompt would overflow again: drop the chain
            logger.warning(
                "dropped the chain of %s (%r): a prompt exceeds the teacher's context: %s",
                eid,
                str(example.question)[:120],
                err,
            )
            return ChainRecord(eid, rollout, kept=False, reason="context_length", score=0.0)
        except ServerDiedError:
            raise
        except Exception as err:  # a teacher that fails after its retries: not recorded, so a rerun retries it
            logger.warning("teacher failed on %s: %s: %s", eid, type(err).__name__, err)
            return None
        trace = list(dspy.settings.trace)
    score = float(metric(example, prediction, None))
    answer = prediction.get("answer")
    if score < threshold:
        return ChainRecord(eid, rollout, kept=False, reason="metric", score=score, answer=answer)

    samples: list[StepSample] = []
    filtered: Counter[str] = Counter()
    for step, (predictor, inputs, outputs) in enumerate(trace):
        name, stage = stages[id(predictor)]
        signature = signatures[name]
        inputs = {k: v for k, v in inputs.items() if k in signature.input_fields}
        outputs = {k: outputs[k] for k in signature.output_fields}
        why = step_filter(stage.value, inputs, outputs)
        if why:
            filtered[why] += 1
        formatted = adapter.format_finetune_data(signature=signature, demos=[], inputs=inputs, outputs=outputs)
        samples.append(
            StepSample(
                messages=formatted["messages"],
                stage=stage.value,
                step=step,
                predictor=name,
                example_id=eid,
                rollout=rollout,
                score=score,
                filtered=why,
                layout=adapter.layout,
            )
        )
    return ChainRecord(
        eid, rollout, kept=True, reason=None, score=score, answer=answer, samples=samples, filtered=dict(filtered)
    )
