"""The speed benchmarks at toy sizes: they run, report every figure beside the baseline's, and check agreement.

No test asserts a time: the figures depend on the machine, only their presence and sanity are checked.
"""

import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steper_dspy import SteperError
from steper_dspy.evals.speed.common import require
from steper_dspy.evals.speed.retrieval import (
    RetrievalBenchmark,
    agreement,
    run_retrieval_benchmark,
    synthetic_passages,
    synthetic_queries,
    tokenizer,
)
from steper_dspy.evals.speed.training import TrainingBenchmark, run_training_benchmark
from steper_dspy.retrieval import BM25Retriever

SPEED_FIGURES = ("build_seconds", "index_mb", "build_peak_mb", "query_p50_ms", "query_p99_ms")


def _small(**overrides):
    settings = {"sizes": (300,), "queries": 40, "baseline_queries": 25, "vocab_size": 3000, "mean_words": 40}
    return RetrievalBenchmark(**{**settings, **overrides})


def test_synthetic_corpus_is_seeded_zipfian_and_answers_its_queries():
    settings = _small()
    passages = synthetic_passages(settings, 300)
    assert passages == synthetic_passages(settings, 300)
    assert passages != synthetic_passages(_small(seed=1), 300)
    assert all(" | " in p for p in passages)
    words = " ".join(p.partition(" | ")[2] for p in passages).split()
    counts = sorted((words.count(w) for w in set(words)), reverse=True)
    assert counts[0] > 20 * counts[len(counts) // 2]  # a heavy head: Zipf, not uniform
    queries = synthetic_queries(settings, passages, 20)
    retriever = BM25Retriever(passages)
    assert all(retriever(q).indices for q in queries)


def test_benchmark_tokenizer_is_the_retrievers():
    passages = synthetic_passages(_small(), 50)
    retriever = BM25Retriever(passages)
    assert tokenizer()(passages) == retriever._tokenize(passages, return_ids=False)


def test_agreement_counts_same_sets_and_boundary_ties():
    ours = [([1, 2, 3], [3.0, 2.0, 1.0]), ([1, 2, 3], [3.0, 2.0, 1.0]), ([1, 2, 3], [3.0, 2.0, 1.0])]
    theirs = [([3, 2, 1], [3.0, 2.0, 1.0]), ([1, 2, 4], [3.0, 2.0, 1.0]), ([1, 4, 3], [3.0, 2.0, 1.0])]
    result = agreement(ours, theirs)
    assert (result["same_set"], result["tie_only"], result["differ"]) == (1, 1, 1)
    assert result["share"] == pytest.approx(2 / 3)


def test_retrieval_benchmark_matches_rank_bm25_on_identical_bm25(tmp_path):
    pytest.importorskip("rank_bm25")
    results = run_retrieval_benchmark(_small(sizes=(200, 300)), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "retrieval_speed.png").stat().st_size > 0
    for entry in results["sizes"].values():
        for side in ("ours", "baseline"):
            assert all(entry[side][key] is not None and entry[side][key] >= 0 for key in SPEED_FIGURES)
            assert entry[side]["memory_isolated"]
        assert entry["ours"]["queries"] == 40 and entry["baseline"]["queries"] == 25
        assert set(entry["ratios"]) == set(SPEED_FIGURES)
        matched = entry["agreement"]["matched"]
        assert matched["queries"] == 25 and matched["differ"] == 0 and matched["share"] == 1.0
        assert 0.0 <= entry["agreement"]["as_shipped"]["share"] <= 1.0


def test_retrieval_benchmark_runs_ours_alone_past_the_baseline_size(tmp_path):
    results = run_retrieval_benchmark(_small(baseline_max_size=0, isolate=False), tmp_path)
    entry = results["sizes"]["300"]
    assert "baseline" not in entry and "agreement" not in entry
    assert entry["ours"]["query_p50_ms"] > 0


def test_training_benchmark_both_trainers_on_the_same_samples(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    settings = TrainingBenchmark(
        model=str(tiny_model_dir), steps=2, batch_size=2, max_length=4096, eval_samples=2, isolate=False
    )
    results = run_training_benchmark(settings, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "training_speed.png").stat().st_size > 0
    assert results["data"]["train_samples"] == 4 and results["data"]["eval_samples"] == 2
    assert math.isfinite(results["data"]["base_heldout_loss"])
    for name in ("ours", "trl"):
        run = results[name]
        assert run["steps"] == 2 and len(run["losses"]) == 2
        assert run["tokens"] > 0 and run["target_tokens"] > 0 and run["tokens_per_second"] > 0
        assert run["peak_memory_mb"] > 0
        assert all(math.isfinite(x) for x in (*run["losses"], run["final_loss"], run["heldout_loss"]))
    # The same samples: TRL's chat template adds at most a newline after each target's end-of-turn token.
    assert 0 <= results["trl"]["tokens"] - results["ours"]["tokens"] <= results["data"]["train_samples"]
    assert set(results["ratios"]) >= {"tokens_per_second", "peak_memory_mb", "final_loss", "heldout_loss"}
    assert results["trl"]["heldout_loss"] == pytest.approx(results["ours"]["heldout_loss"], rel=0.05)


def test_training_benchmark_runs_ours_alone(tiny_model_dir, tmp_path):
    settings = TrainingBenchmark(
        model=str(tiny_model_dir), steps=1, batch_size=2, max_length=4096, eval_samples=0, trainers=("ours",)
    )
    settings.isolate = False
    results = run_training_benchmark(settings, tmp_path)
    assert "trl" not in results and "ratios" not in results
    assert results["ours"]["tokens"] > 0 and "heldout_loss" not in results["ours"]


def test_training_benchmark_compares_packed_chains_with_one_sample_a_sequence(tiny_model_dir, tmp_path):
    settings = TrainingBenchmark(
        model=str(tiny_model_dir),
        steps=1,
        batch_size=2,
        max_length=4096,
        eval_samples=2,
        trainers=("ours", "ours-unpacked"),
    )
    settings.isolate = False
    results = run_training_benchmark(settings, tmp_path)
    assert results["ours"]["tokens"] > 0 and results["ours-unpacked"]["tokens"] > 0
    assert set(results["packing_ratios"]) >= {"tokens_per_second", "heldout_loss"} and "ratios" not in results


def test_missing_baseline_names_the_bench_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(SteperError, match=r"pip install -e \.\[bench\]"):
        require("trl", "trl")


def test_bad_settings_are_user_errors():
    with pytest.raises(SteperError, match="trainers"):
        TrainingBenchmark(trainers=("ours", "axolotl"))
    with pytest.raises(SteperError, match="baseline-queries"):
        RetrievalBenchmark(queries=10, baseline_queries=20)


def test_cli_speed_retrieval_prints_both_columns_and_writes_results(tmp_path):
    pytest.importorskip("rank_bm25")
    from steper_dspy.cli.app import app

    out = tmp_path / "speed"
    args = ["speed", "retrieval", "--sizes", "200", "--queries", "20", "--baseline-queries", "10", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rank_bm25" in result.output and "bm25s (ours)" in result.output and "agreement" in result.output
    assert json.loads((out / "results.json").read_text())["sizes"]["200"]["agreement"]["matched"]["share"] == 1.0


def test_cli_speed_errors_keep_the_install_hint(monkeypatch, tmp_path):
    from steper_dspy.cli.app import app

    monkeypatch.setitem(sys.modules, "rank_bm25", None)
    result = CliRunner().invoke(app, ["speed", "retrieval", "--sizes", "200", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "pip install -e .[bench]" in " ".join(result.output.split())


def test_generation_benchmark_runs_every_engine_on_the_same_requests(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from steper_dspy.evals.speed.generation import GenerationBenchmark, markdown, run_generation_benchmark
    from steper_dspy.lm import vllm as vllm_module
    from tests.test_datasets import HOTPOT_ROW, write_jsonl

    # vLLM's place is taken by the stand-in server of tests/fake_vllm.py (scripted replies, no vLLM needed).
    monkeypatch.setattr(vllm_module, "SERVER_MODULE", "tests.fake_vllm")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    monkeypatch.setenv("STEPER_CACHE", str(tmp_path / "cache"))
    rows = [{**HOTPOT_ROW, "_id": f"h{i}"} for i in range(2)]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "hotpotqa_dev200.jsonl", rows)
    settings = GenerationBenchmark(
        teacher=str(tiny_model_dir),
        student=str(tiny_model_dir),
        models=("student",),
        workloads=("recording", "hotpotqa"),
        recording_calls=3,
        questions=2,
        batch_size=2,
        concurrency=(1, 2),
        max_tokens=8,
        data_dir=str(tmp_path / "data"),
    )
    from steper_dspy.lm.engine import TransformersEngine

    closed = []
    close = TransformersEngine.close
    monkeypatch.setattr(TransformersEngine, "close", lambda self: (closed.append(self), close(self))[1])
    try:
        results = run_generation_benchmark(settings, tmp_path / "out")
    finally:
        vllm_module.stop_all()
    assert len(closed) == 3  # every in-process model freed before the vLLM server starts
    runs = [(r["engine"], r["concurrency"], r["workload"]) for r in results["rows"]]
    assert runs == [
        (engine, concurrency, workload)
        for engine, concurrency in (
            ("transformers-sequential", 1),
            ("transformers-batched", 2),
            ("transformers-workers", 2),  # one worker here (STEPER_WORKERS=1 in the tests)
            ("vllm", 1),
            ("vllm", 2),
        )
        for workload in ("recording", "hotpotqa")
    ]
    for row in results["rows"]:
        assert row["seconds"] > 0 and row["tokens_per_second"] >= 0 and 0 <= row["greedy_identical"] <= 1
        assert (row["seconds_per_call"] if row["workload"] == "recording" else row["seconds_per_question"]) > 0
        assert row["speedup"] > 0
    sequential = [r for r in results["rows"] if r["engine"] == "transformers-sequential"]
    assert all(r["greedy_identical"] == 1 and r["speedup"] == 1 for r in sequential)
    vllm_rows = [r for r in results["rows"] if r["engine"] == "vllm"]
    assert all(r["cached_prompt_tokens"] > 0 for r in vllm_rows)  # the server's prefix-cache counts arrive
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == results["rows"] and {"cpu", "cpu_family", "cpu_native_bf16"} <= saved["machine"].keys()
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert progress[0].startswith("[1/10] student transformers-sequential x1 recording:") and progress[-1].startswith(
        "[10/10]"
    )
    assert (tmp_path / "out" / "generation.png").stat().st_size > 0
    assert markdown(results).count("\n") == len(results["rows"]) + 1


def test_generation_benchmark_of_the_teacher_alone_needs_no_student(tiny_model_dir, tmp_path, monkeypatch):
    from steper_dspy.evals.experiment import quickstart
    from steper_dspy.evals.speed.generation import GenerationBenchmark, run_generation_benchmark

    def unavailable() -> str:
        raise SteperError("SmolLM2-135M-Instruct is not available offline")

    monkeypatch.setattr(quickstart, "smollm2_student", unavailable)
    settings = GenerationBenchmark(
        teacher=str(tiny_model_dir),
        models=("teacher",),
        engines=("transformers-sequential",),
        workloads=("recording",),
        recording_calls=1,
        max_tokens=4,
    )
    results = run_generation_benchmark(settings, tmp_path / "out")
    assert [(r["model"], r["engine"]) for r in results["rows"]] == [("teacher", "transformers-sequential")]
    with pytest.raises(SteperError, match="Unknown models"):
        run_generation_benchmark(GenerationBenchmark(models=("teachr",)), tmp_path / "bad")
