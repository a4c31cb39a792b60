"""The quickstart's shipped teacher recording covers every teacher call the quickstart makes."""

import dspy
import pytest

from steper_dspy import SteperError
from steper_dspy.adapter import student_adapter
from steper_dspy.compilers import HarvestStore, harvest
from steper_dspy.evals.experiment import (
    load_task,
    quickstart_config,
    recorded_teacher_path,
    teacher_lm,
    teacher_program,
)
from steper_dspy.metrics import METRICS


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    config = quickstart_config(output=str(tmp_path_factory.mktemp("qs")), student="unused-student")
    return config, load_task(config)


def test_the_recording_is_shipped_in_the_package():
    path = recorded_teacher_path()
    assert path.exists() and path.stat().st_size > 0


def test_recording_replays_the_whole_harvest_and_teacher_eval(quickstart, tmp_path):
    config, task = quickstart
    teacher = teacher_lm(config)  # replay only: no live teacher is given
    assert teacher.model.startswith("steper-replay/")
    report = harvest(
        task.program(config),
        teacher_program(config, task, teacher),
        task.trainset,
        HarvestStore(tmp_path / "harvest.jsonl"),
        metric=METRICS[config.metric],
        adapter=student_adapter(),
        progress=False,
    )
    assert report.lm_failures == 0, "a request missing from the recording would be a teacher failure"
    assert report.chains == len(task.trainset) and report.kept > 0
    program = teacher_program(config, task, teacher, task.testsets[0])
    for example in task.testsets[0].examples:
        program(question=example.question)  # raises SteperError on a request that was not recorded


def test_a_changed_prompt_is_caught_with_the_fix_named(quickstart):
    config, task = quickstart
    program = teacher_program(config, task, teacher_lm(config), task.testsets[0])
    program.initialize.signature = program.initialize.signature.with_instructions("A changed instruction.")
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    with pytest.raises(SteperError, match="not recorded"), dspy.context(adapter=adapter):
        program(question=task.testsets[0].examples[0].question)
