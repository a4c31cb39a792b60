"""Running a program on a trained student: its LM, its adapter, and saving/loading it as a folder."""

import functools
import importlib
import json
from pathlib import Path
from typing import Any

import dspy

from steper_dspy.adapter import student_adapter
from steper_dspy.errors import SteperError

PROGRAM_FILE = "program.json"
MANIFEST_FILE = "steper_program.json"


# A student reply that has not begun a field marker by then never parses (an untrained student writing prose).
STUDENT_MARKER_PATIENCE = 32


def student_lm(model: str | Path, **kwargs: Any) -> dspy.LM:
    """A (trained or untrained) student model as an LM: :func:`steper_dspy.lm.local_lm`, stopping replies that
    cannot parse early.

    Args:
        model: The student's model folder, `.gguf` file or hub id.
        **kwargs: Passed to :func:`steper_dspy.lm.local_lm` (e.g. ``engine="vllm"``, ``device="cuda"``).
    """
    from steper_dspy.lm import local_lm

    kwargs.setdefault("marker_patience", STUDENT_MARKER_PATIENCE)
    return local_lm(model, **kwargs)


def run_on_student(program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter | None = None) -> dspy.Module:
    """Set `lm` on every predictor of `program` and make the program run with `adapter`.

    Args:
        program: The program (modified in place and returned).
        lm: The student LM (for instance :func:`steper_dspy.lm.local_lm` of a trained folder).
        adapter: The adapter to run under (default :func:`steper_dspy.adapter.student_adapter`).

    Returns:
        `program`, whose ``forward`` now runs under ``dspy.context(adapter=adapter)``.
    """
    program.set_lm(lm)
    return run_with_adapter(program, adapter or student_adapter())


def run_with_adapter(program: dspy.Module, adapter: dspy.Adapter) -> dspy.Module:
    """Make `program` (modified in place and returned) run under ``dspy.context(adapter=adapter)``.

    The program's class is swapped for a subclass whose `forward` enters the context, so that every copy
    (``deepcopy``, DSPy's optimizers, rollouts) runs under it too; the subclass carries the original class's
    name and module, so a saved program names the original class.
    """
    program._run_adapter = adapter
    program.__class__ = _adapter_scoped(_base_class(type(program)))
    return program


@functools.cache
def _adapter_scoped(cls: type) -> type:
    def forward(self: dspy.Module, **kwargs: Any) -> Any:
        with dspy.context(adapter=self._run_adapter):
            return cls.forward(self, **kwargs)

    namespace = {
        "forward": forward,
        "_adapter_base": cls,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    return type(cls.__name__, (cls,), namespace)


def _base_class(cls: type) -> type:
    return cls.__dict__.get("_adapter_base", cls)


def save_compiled(program: dspy.Module, path: str | Path, *, model_dir: str | Path) -> Path:
    """Save a compiled program to a folder: program state (JSON), retriever index and a manifest.

    The student model stays where `model_dir` points (normally ``<path>/model``); the manifest stores
    it relative to the folder when it lies inside, so the folder can be moved whole. Nothing is pickled.

    Args:
        program: A program built as ``cls(retriever, k=..., max_steps=...)`` whose retriever has ``save``.
        path: The output folder.
        model_dir: The trained student's folder.

    Returns:
        The folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    retriever = getattr(program, "retriever", None)
    if retriever is None or not hasattr(retriever, "save"):
        raise SteperError(f"{type(program).__name__} has no savable `retriever` (e.g. a BM25Retriever).")
    retriever.save(path / "retriever")
    model_dir = Path(model_dir).resolve()
    try:
        model_ref = str(model_dir.relative_to(path.resolve()))
    except ValueError:
        model_ref = str(model_dir)
    cls = _base_class(type(program))
    manifest = {
        "program": f"{cls.__module__}:{cls.__qualname__}",
        "init": {key: getattr(program, key) for key in ("k", "max_steps") if hasattr(program, key)},
        "retriever": "retriever",
        "model": model_ref,
    }
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    state = program.dump_state()
    _strip_lm_state(state)
    (path / PROGRAM_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False))
    return path


def load_compiled(path: str | Path, **lm_kwargs: Any) -> dspy.Module:
    """Load a folder written by :func:`save_compiled`: the same program, on the same student, same answers.

    Args:
        path: The folder.
        **lm_kwargs: Passed to :func:`student_lm` (e.g. ``device="cuda"``).
    """
    from steper_dspy.retrieval import BM25Retriever

    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise SteperError(f"{path} is not a compiled program folder: {MANIFEST_FILE} is missing.")
    manifest = json.loads(manifest_path.read_text())
    module_name, _, class_name = manifest["program"].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise SteperError(f"Cannot import the program class {manifest['program']}: {err}") from None
    retriever = BM25Retriever.load(path / manifest["retriever"])
    program = cls(retriever, **manifest["init"])
    program.load_state(json.loads((path / PROGRAM_FILE).read_text()))
    model = Path(manifest["model"])
    return run_on_student(program, student_lm(model if model.is_absolute() else path / model, **lm_kwargs))


def _strip_lm_state(state: dict[str, Any]) -> None:
    # The LM is rebuilt from the manifest's model folder; its absolute paths would not survive a move.
    for value in state.values():
        if isinstance(value, dict) and "lm" in value:
            value["lm"] = None
