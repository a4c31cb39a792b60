"""`steper quickstart` end to end with the shipped teacher recording and a tiny student: table, report, plots."""

import json

from typer.testing import CliRunner

from steper_dspy.cli.app import app
from steper_dspy.evals.experiment import quickstart as quickstart_module


def test_quickstart_runs_end_to_end_and_writes_its_report(tiny_model_dir, tmp_path, monkeypatch):
    tiny_training = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 8192, "logging_steps": 1}
    monkeypatch.setattr(quickstart_module, "TRAINING", tiny_training)
    out = tmp_path / "qs"
    result = CliRunner().invoke(
        app, ["quickstart", "--student", str(tiny_model_dir), "--output", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for system in ("untrained student", "STEPER student (adaptive)", "teacher"):
        assert system in result.output
    for name in ("report.md", "results.json", "accuracy.png", "training.png", "config.yaml", "harvest.jsonl"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())["results"]["synthetic (held out)"]
    assert results["teacher"]["failures"] == 0 and results["teacher"]["n"] == quickstart_module.TEST_SIZE == 40
    assert results["untrained student"]["accuracy"] is not None and "accuracy_ci95" in results["teacher"]
    assert (out / "program" / "steper_program.json").exists()
    assert (out / "model" / "steper_training.json").exists()
    assert "## Time" in (out / "report.md").read_text()
