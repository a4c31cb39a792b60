"""The command line: configs, model specs, and one-line errors with exit code 2."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from steper_dspy import SteperError
from steper_dspy.cli.app import app
from steper_dspy.evals.experiment import RunConfig
from steper_dspy.lm import is_api_model, make_lm
from steper_dspy.programs import IRCoT, SelfAsk, make_program
from steper_dspy.retrieval import BM25Retriever

RETRIEVER = BM25Retriever(["A | alpha text", "B | beta text"])


def test_config_round_trip_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('program = "self-ask"\nk = 3\n[training]\nnum_train_epochs = 1.0\n')
    cfg = RunConfig.load(path, k=None, output=str(tmp_path / "out"))
    assert (cfg.program, cfg.k, cfg.output) == ("self-ask", 3, str(tmp_path / "out"))
    assert cfg.training_config().num_train_epochs == 1.0
    assert RunConfig.load(cfg.save(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("colour = 1\n", ".toml", r"unknown key\(s\) \['colour'\]"),
        ("[training]\nepochz = 2\n", ".toml", "epochz"),
        ("k = [\n", ".toml", "is not valid"),
        ("- 1\n- 2\n", ".yaml", "must hold a table"),
        ("k: 1\n", ".ini", "use a .toml"),
    ],
)
def test_bad_configs_are_named(tmp_path, text, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(SteperError, match=message):
        RunConfig.load(path)
    with pytest.raises(SteperError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k: four\n", r"k = 'four': Input should be a valid integer"),
        ("threads: many\n", r"threads = 'many': Input should be a valid integer"),
        ("step_filter: maybe\n", r"step_filter = 'maybe': Input should be a valid boolean"),
        ("engine: fast\n", r"engine = 'fast': Input should be 'auto', 'vllm' or 'transformers'"),
        ("metric: bleu\n", r"metric = 'bleu'"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_named_with_its_key_value_and_type(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(SteperError, match=message):
        RunConfig.load(path)
    result = subprocess.run(
        [sys.executable, "-m", "steper_dspy.cli", "harvest", "-c", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stdout.strip().splitlines()) <= 3 and "error:" in result.stdout  # one (wrapped) line


def test_the_package_exports_the_names_a_user_needs_and_imports_fast():
    import steper_dspy

    assert len(steper_dspy.__all__) <= 25
    for name in ("STEPER", "VanillaKD", "StepwiseKD", "IRCoT", "SelfAsk", "MultiStepRAG", "Stage", "BM25Retriever",
                 "local_lm", "recorded_lm", "load_compiled", "evaluate_program", "load_multihop", "TrainingConfig",
                 "SteperError"):  # fmt: skip
        assert name in steper_dspy.__all__ and getattr(steper_dspy, name) is not None
    code = "import sys, steper_dspy; print(int('dspy' in sys.modules), int('torch' in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["0", "0"]  # nothing heavy is imported until a name is used


def test_model_specs_tell_api_models_from_local_weights(tmp_path):
    assert is_api_model("openai/gpt-4o-mini")
    assert is_api_model("hosted_vllm/Qwen/Qwen2.5-7B-Instruct")
    assert is_api_model("ollama_chat/llama3.1")
    assert not is_api_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_api_model(str(tmp_path))


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SteperError, match="OPENAI_API_KEY"):
        make_lm("openai/gpt-4o-mini")
    lm = make_lm("openai/gpt-4o-mini", api_base="http://127.0.0.1:9/v1")  # a local server needs no key
    assert lm.model == "openai/gpt-4o-mini" and lm.kwargs["api_key"] == "EMPTY"


def test_programs_by_name_and_by_import_path():
    assert isinstance(make_program("ircot", RETRIEVER), IRCoT)
    assert isinstance(make_program("self-ask", RETRIEVER, k=2), SelfAsk)
    assert isinstance(make_program("steper_dspy.programs:IRCoT", RETRIEVER), IRCoT)
    with pytest.raises(SteperError, match="Unknown program 'cot'"):
        make_program("cot", RETRIEVER)
    with pytest.raises(SteperError, match="Cannot import program"):
        make_program("nowhere.module:Thing", RETRIEVER)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["harvest", "--data", "missing.jsonl", "--teacher", "x/y"], "missing.jsonl"),
        (["train", "-o", "{tmp}/empty"], "No harvest"),
        (["harvest", "-c", "{tmp}/none.toml"], "does not exist"),
        (["harvest", "--program", "cot"], "Unknown program"),
        (["eval", "--model", "{tmp}/no-model", "--test-size", "5"], "no-model"),
    ],
)
def test_user_errors_end_with_one_line_and_exit_code_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", "from steper_dspy.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert message in proc.stdout + proc.stderr


def test_every_command_explains_its_options_with_an_example():
    runner = CliRunner()
    for command in ("harvest", "train", "compile", "eval", "quickstart"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "Example:" in result.output


def test_harvest_and_train_record_their_config_before_the_long_run(tmp_path):
    # Written first: a stopped run leaves its record, and a config edited while it runs is not overwritten.
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "-o", str(out), "--epochs", "3"])
    assert result.exit_code != 0  # no harvest to train on
    assert RunConfig.load(out / "config.yaml").training["num_train_epochs"] == 3


def test_teacher_none_replays_the_recording_without_the_configs_live_teacher(tmp_path):
    from steper_dspy.cli.app import _config
    from steper_dspy.evals.experiment import recorded_teacher_path, teacher_lm

    config = tmp_path / "run.yaml"
    config.write_text(f"teacher: {tmp_path}/not-here.gguf\nrecording: {recorded_teacher_path()}\n")
    assert _config(config).teacher == f"{tmp_path}/not-here.gguf"
    replay = _config(config, teacher="none")
    assert replay.teacher is None and replay.recording == str(recorded_teacher_path())
    lm = teacher_lm(replay)  # a live teacher from the config would fail here: its model file does not exist
    assert lm.model.startswith("steper-replay/") and not lm.engine.live


def test_quickstart_teacher_none_is_the_shipped_recording(monkeypatch):
    from steper_dspy.cli import app as cli
    from steper_dspy.evals.experiment import recorded_teacher_path

    configs = []
    monkeypatch.setattr(cli, "run_experiment", lambda config, **_: configs.append(config))
    result = CliRunner().invoke(app, ["quickstart", "--teacher", "None", "--student", "any-local-student"])
    assert result.exit_code == 0, result.output
    assert configs[0].teacher is None and configs[0].recording == str(recorded_teacher_path())
