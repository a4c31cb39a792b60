"""`steper speed training|retrieval`: the speed benchmarks, ours beside the baseline from the same run."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from steper_dspy.errors import SteperError
from steper_dspy.evals.experiment.report import console
from steper_dspy.evals.speed import generation as generation_bench
from steper_dspy.evals.speed import retrieval as retrieval_bench
from steper_dspy.evals.speed import training as training_bench

# The option defaults below are the benchmarks' own.
T, R, G = training_bench.TrainingBenchmark, retrieval_bench.RetrievalBenchmark, generation_bench.GenerationBenchmark

speed_app = typer.Typer(
    help="Speed benchmarks: generation engines (sequential, batched, vLLM), our trainer vs TRL's SFTTrainer, our BM25 retriever vs rank_bm25 (the last two need `pip install -e .\\[bench]`).",
    no_args_is_help=True,
)

OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder. Example: -o runs/speed")]


@speed_app.command()
def training(
    model: Annotated[
        str | None, typer.Option(help="Student base model (default SmolLM2-135M). Example: --model qwen.gguf")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps per trainer.")] = T.steps,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = T.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Forward passes per optimizer step.")] = T.grad_accum,
    max_length: Annotated[int, typer.Option(help="Longest sample in tokens; longer ones are left out.")] = T.max_length,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (linear decay).")] = T.learning_rate,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (alpha is twice it unless given).")] = T.lora_r,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha.")] = None,
    weighting: Annotated[
        str, typer.Option(help="Our loss weighting: uniform (TRL's objective) or adaptive.")
    ] = T.weighting,
    eval_samples: Annotated[
        int, typer.Option(help="Held-out samples both trained models are scored on.")
    ] = T.eval_samples,
    harvest: Annotated[
        str | None,
        typer.Option(help="Train on this harvest file's samples. Example: --harvest runs/quickstart/harvest.jsonl"),
    ] = None,
    trainers: Annotated[
        str, typer.Option(help="Comma-separated: ours (packed chains), ours-unpacked, trl.")
    ] = ",".join(training_bench.TRAINERS),
    seed: Annotated[int, typer.Option(help="Seed of LoRA, data order and questions.")] = T.seed,
    output: OutputOpt = None,
) -> None:
    """Tokens/s, peak memory and loss of train_student vs TRL's SFTTrainer on the same step samples,
    model, precision, LoRA config, sequence length and batch size.

    Example: steper speed training --steps 8 --batch-size 4 -o runs/speed-training
    """
    with _errors():
        settings = T(
            model=model,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_length=max_length,
            learning_rate=learning_rate,
            lora_r=lora_r,
            lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_r,
            weighting=weighting,
            eval_samples=eval_samples,
            harvest=harvest,
            trainers=tuple(t.strip() for t in trainers.split(",") if t.strip()),
            seed=seed,
        )
        out = output or Path("runs/speed-training")
        training_bench.print_results(training_bench.run_training_benchmark(settings, out))
    console.print(f"results: {out / 'results.json'} (plot beside it)")


@speed_app.command()
def retrieval(
    sizes: Annotated[str, typer.Option(help="Comma-separated corpus sizes.")] = ",".join(str(n) for n in R.sizes),
    baseline_max_size: Annotated[int, typer.Option(help="Largest corpus rank_bm25 indexes.")] = R.baseline_max_size,
    queries: Annotated[int, typer.Option(help="Queries timed on our retriever per size.")] = R.queries,
    baseline_queries: Annotated[
        int, typer.Option(help="Queries timed (and top-k compared) on rank_bm25.")
    ] = R.baseline_queries,
    k: Annotated[int, typer.Option(help="Passages per query.")] = R.k,
    k1: Annotated[float, typer.Option(help="BM25 k1 (both libraries).")] = R.k1,
    b: Annotated[float, typer.Option(help="BM25 b (both libraries).")] = R.b,
    seed: Annotated[int, typer.Option(help="Seed of the corpus and queries.")] = R.seed,
    output: OutputOpt = None,
) -> None:
    """Index build time, memory and query latency p50/p99 of our bm25s retriever vs rank_bm25 on synthetic
    Zipfian corpora, with a top-k agreement check on the same tokens.

    Example: steper speed retrieval --sizes 10000,100000 -o runs/speed-retrieval
    """
    with _errors():
        settings = R(
            sizes=_sizes(sizes),
            baseline_max_size=baseline_max_size,
            queries=queries,
            baseline_queries=baseline_queries,
            k=k,
            k1=k1,
            b=b,
            seed=seed,
        )
        out = output or Path("runs/speed-retrieval")
        retrieval_bench.print_results(retrieval_bench.run_retrieval_benchmark(settings, out))
    console.print(f"results: {out / 'results.json'} (plot beside it)")


@speed_app.command()
def generation(
    teacher: Annotated[str, typer.Option(help="Teacher model (folder, GGUF file or hub id).")] = G.teacher,
    student: Annotated[
        str | None, typer.Option(help="Student model (default SmolLM2-135M). Example: --student runs/demo/model")
    ] = None,
    models: Annotated[str, typer.Option(help="Comma-separated: teacher,student.")] = ",".join(G.models),
    engines: Annotated[str, typer.Option(help="Comma-separated engines.")] = ",".join(G.engines),
    workloads: Annotated[
        str, typer.Option(help="Comma-separated: recording (the shipped recording's requests), 2wiki, hotpotqa.")
    ] = ",".join(G.workloads),
    recording_calls: Annotated[int, typer.Option(help="Requests of the recording per run.")] = G.recording_calls,
    questions: Annotated[int, typer.Option(help="Dev questions (whole chains) per dataset.")] = G.questions,
    batch_size: Annotated[int, typer.Option(help="Batch size of the batched in-process engine.")] = G.batch_size,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrent requests of the vLLM runs.")] = ",".join(
        str(c) for c in G.concurrency
    ),
    data_dir: Annotated[str, typer.Option(help="Folder of the 2Wiki / HotpotQA dev files.")] = G.data_dir,
    output: OutputOpt = None,
) -> None:
    """Seconds per call and per question, tokens/s and greedy agreement of the sequential in-process engine,
    the batched one and vLLM at several concurrencies, on the same real requests and questions.

    Example: steper speed generation --models student --engines transformers-sequential,transformers-batched -o runs/speed-generation
    """
    with _errors():
        settings = G(
            teacher=teacher,
            student=student,
            models=_names(models),
            engines=_names(engines),
            workloads=_names(workloads),
            recording_calls=recording_calls,
            questions=questions,
            batch_size=batch_size,
            concurrency=_sizes(concurrency),
            data_dir=data_dir,
        )
        out = output or Path("runs/speed-generation")
        generation_bench.print_results(generation_bench.run_generation_benchmark(settings, out))
    console.print(f"results: {out / 'results.json'} (plot beside it)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s.replace("_", "")) for s in text.split(",") if s.strip())
    except ValueError:
        raise SteperError(f"{text!r} is not a comma-separated list of whole numbers, e.g. 10000,100000.") from None


@contextmanager
def _errors() -> Iterator[None]:
    """User errors as one line and exit code 2, like `main`, but with the text escaped: the install hint
    `pip install -e .[bench]` would otherwise lose `[bench]` to rich's markup."""
    try:
        yield
    except SteperError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from None
