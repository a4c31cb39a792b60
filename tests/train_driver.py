"""A small training run of the tiny test model: the process tests/test_train_crash_resume.py kills with SIGKILL.

Run as ``python -m tests.train_driver MODEL OUTPUT [--step-delay S] [--tear-checkpoint]`` from the repository
root. It trains on :func:`samples` with :func:`config` (8 steps, a checkpoint every 2) and prints ``step N`` after
each optimizer step, then one JSON line ``{"final_loss", "sigmas", "num_samples"}``.

Under ``accelerate launch`` every process prints its own JSON line, with its ``rank``; ``--batch-size`` sets the
samples per step and process.

``--step-delay`` sleeps that long after each step, so that a kill lands mid-run. ``--tear-checkpoint`` writes
only the first half of the trainer state of the first checkpoint this process saves (the Trainer's last file of a
checkpoint), prints ``torn PATH`` and waits to be killed: a kill in the middle of writing a checkpoint.
"""

import argparse
import json
import os
import time
from typing import Any

STAGES = ("init", "expand", "aggregate")
TARGETS = {
    "init": "[[ ## rationale ## ]]\nThe question asks who was born in Paris.\n\n[[ ## completed ## ]]",
    "expand": "[[ ## rationale ## ]]\nPassages: title | text.\n\n[[ ## completed ## ]]",
    "aggregate": "[[ ## rationale ## ]]\nSo the answer is: Paris.\n\n[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]",
}


def samples(n: int = 24) -> list[dict[str, Any]]:
    """`n` step samples, the three stages in turn, of four prompt lengths."""
    rows = []
    for i in range(n):
        stage = STAGES[i % 3]
        messages = [
            {"role": "system", "content": "Your input fields are: question, passages."},
            {"role": "user", "content": f"Question {i}: the question asks who was born in which city. " * (1 + i % 4)},
            {"role": "assistant", "content": TARGETS[stage]},
        ]
        rows.append({"messages": messages, "stage": stage, "step": i % 3, "example_id": f"q{i // 3}", "score": 1.0})
    return rows


def config(batch_size: int = 4) -> Any:
    """8 steps of LoRA with adaptive stage weights, logged every step, a checkpoint every 2 (the last 2 kept)."""
    from steper_dspy.training import TrainingConfig

    return TrainingConfig(
        per_device_train_batch_size=batch_size,
        max_steps=8,
        logging_steps=1,
        save_steps=2,
        learning_rate=1e-2,
        sigma_learning_rate=5e-2,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--tear-checkpoint", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4, help="Samples per step and process.")
    args = parser.parse_args(argv)

    from transformers.trainer_callback import TrainerState

    from steper_dspy.training import train_student
    from steper_dspy.training.trainer import StageLogCallback

    on_step_end = StageLogCallback.on_step_end

    def announced_step_end(self, args_, state, control, **kwargs):
        print(f"step {state.global_step}", flush=True)
        time.sleep(args.step_delay)
        return on_step_end(self, args_, state, control, **kwargs)

    StageLogCallback.on_step_end = announced_step_end

    if args.tear_checkpoint:

        def torn_save_to_json(self, json_path):
            text = json.dumps(self.__dict__, default=str, indent=2)
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
            print(f"torn {json_path}", flush=True)
            time.sleep(600)

        TrainerState.save_to_json = torn_save_to_json

    result = train_student(samples(), args.model, args.output, config(args.batch_size), progress=False)
    line = {"final_loss": result.final_loss, "sigmas": result.sigmas, "num_samples": result.num_samples}
    print(json.dumps({**line, "rank": int(os.environ.get("RANK", 0))}), flush=True)


if __name__ == "__main__":
    main()
