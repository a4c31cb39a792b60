"""STEPER end to end on a tiny local student and a scripted teacher: harvest, train, compiled program, save/load."""

import contextlib
import json

import dspy
import pytest

from steper_dspy import SteperError
from steper_dspy.adapter import SharedPrefixAdapter
from steper_dspy.compilers import STEPER, StepwiseKD, VanillaKD, load_compiled
from steper_dspy.programs import IRCoT
from steper_dspy.retrieval import BM25Retriever
from steper_dspy.training import TrainingConfig
from tests.scripted import scripted_teacher
from tests.test_harvest import ANSWERS, PASSAGES, SCRIPT, examples

TINY_TRAINING = TrainingConfig(
    max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=100, max_length=2048
)


def exact(example, pred, trace=None):
    return float(pred.answer == example.answer)


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("steper")
    teacher, _ = scripted_teacher(SCRIPT, ANSWERS)
    teleprompter = STEPER(tiny_model_dir, output_dir=out, metric=exact, training=TINY_TRAINING, progress=False)
    program = IRCoT(BM25Retriever(PASSAGES), k=1, max_steps=5)
    gold = {**ANSWERS, "What is wrong?": "Venus"}
    result = teleprompter.compile(program, trainset=examples(list(SCRIPT), gold), teacher=teacher)
    return teleprompter, program, result, out


def test_compile_returns_a_copy_running_on_the_trained_student(compiled):
    teleprompter, program, result, out = compiled
    assert program.initialize.lm is None, "the student program passed in is not modified"
    model_strings = {p.lm.model for p in result.predictors()}
    assert len(model_strings) == 1 and model_strings.pop().startswith("steper-local/model@")
    assert teleprompter.harvest_report.kept == 3 and teleprompter.harvest_report.dropped == {"metric": 1}
    assert teleprompter.training_result.num_samples == {"init": 3, "expand": 5, "aggregate": 3}
    meta = json.loads((out / "model" / "steper_training.json").read_text())
    assert meta["config"]["weighting"] == "adaptive"


def test_compiled_program_uses_the_student_adapter_without_json_fallback(compiled):
    _, _, result, _ = compiled
    adapter = result._run_adapter
    assert type(adapter) is SharedPrefixAdapter and adapter.use_json_adapter_fallback is False
    lm = result.initialize.lm
    before = len(lm.history)
    with dspy.context(adapter=dspy.JSONAdapter()), contextlib.suppress(Exception):
        result(question="Where was Alpha born?")  # the untrained tiny student may not parse
    calls = lm.history[before:]
    assert len(calls) == 1, "a parse failure does not trigger a second (JSON) generation"
    assert "[[ ## question ## ]]" in calls[0]["messages"][-1]["content"], "the chat format it was trained on"


def test_saved_program_folder_loads_back_with_the_same_model(compiled):
    _, _, result, out = compiled
    loaded = load_compiled(out / "program")
    assert (
        isinstance(loaded, IRCoT) and type(loaded).__qualname__ == "IRCoT" and loaded.k == 1 and loaded.max_steps == 5
    )
    assert isinstance(loaded._run_adapter, SharedPrefixAdapter) and loaded.deepcopy()._run_adapter is not None
    assert loaded.initialize.lm.model == result.initialize.lm.model
    prompt = "Where was Alpha born?"
    assert loaded.initialize.lm(prompt) == result.initialize.lm(prompt)
    assert not list(out.rglob("*.pkl"))


def test_baselines_differ_only_in_their_training_data_and_weighting(tmp_path):
    assert VanillaKD("m", output_dir=tmp_path).training.stages == ("aggregate",)
    assert VanillaKD("m", output_dir=tmp_path).training.weighting == "uniform"
    assert StepwiseKD("m", output_dir=tmp_path).training.stages == ("init", "expand", "aggregate")
    assert StepwiseKD("m", output_dir=tmp_path).training.weighting == "uniform"
    weights = {"init": 1.0, "expand": 1.0, "aggregate": 2.0}
    fixed = STEPER("m", output_dir=tmp_path, weighting="fixed", training=TrainingConfig(stage_weights=weights))
    assert fixed.training.weighting == "fixed" and fixed.training.stage_weights == weights
    with pytest.raises(SteperError, match="stage_weights"):
        STEPER("m", output_dir=tmp_path, weighting="fixed")


def test_vanilla_kd_trains_on_the_shared_harvest_final_steps_only(compiled, tiny_model_dir, tmp_path):
    _, _, _, out = compiled
    teacher, engine = scripted_teacher(SCRIPT, ANSWERS)
    vanilla = VanillaKD(
        tiny_model_dir,
        output_dir=tmp_path,
        harvest_path=out / "harvest.jsonl",
        metric=exact,
        training=TINY_TRAINING,
        progress=False,
    )
    gold = {**ANSWERS, "What is wrong?": "Venus"}
    vanilla.compile(IRCoT(BM25Retriever(PASSAGES), k=1), trainset=examples(list(SCRIPT), gold), teacher=teacher)
    assert engine.calls == 0, "the shared harvest is reused, no teacher call repeated"
    assert vanilla.training_result.num_samples == {"aggregate": 3}


def test_compile_errors_are_clear(tiny_model_dir, tmp_path):
    teleprompter = STEPER(tiny_model_dir, output_dir=tmp_path, progress=False)
    with pytest.raises(SteperError, match="trainset is empty"):
        teleprompter.compile(IRCoT(BM25Retriever(PASSAGES)), trainset=[], teacher=scripted_teacher(SCRIPT, ANSWERS)[0])
    with pytest.raises(SteperError, match="teacher must be"):
        teleprompter.compile(IRCoT(BM25Retriever(PASSAGES)), trainset=examples(list(SCRIPT)), teacher="gpt")
    nothing_passes = STEPER(tiny_model_dir, output_dir=tmp_path / "x", metric=lambda e, p, t=None: 0.0, progress=False)
    with pytest.raises(SteperError, match="No teacher chain passed"):
        nothing_passes.compile(
            IRCoT(BM25Retriever(PASSAGES), k=1),
            trainset=examples(list(SCRIPT)[:1]),
            teacher=scripted_teacher(SCRIPT, ANSWERS)[0],
        )


def test_training_refuses_samples_formatted_in_another_prompt_layout(compiled, tmp_path):
    _, _, _, out = compiled
    lines = [json.loads(line) for line in (out / "harvest.jsonl").read_text().splitlines()]
    for line in lines:
        for sample in line["samples"]:
            sample["layout"] = SharedPrefixAdapter().layout
    harvest = tmp_path / "harvest.jsonl"
    harvest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    teleprompter = STEPER("m", output_dir=tmp_path, harvest_path=harvest, progress=False)
    with pytest.raises(SteperError, match="prompt layout 'shared-prefix'"):
        teleprompter.train()
