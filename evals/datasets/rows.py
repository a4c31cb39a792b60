"""Reading raw records one at a time, with typed field access that names the file, the row and the field on error."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from steper_dspy.errors import SteperError


class Row:
    """One raw record and where it came from.

    Field access checks the type and, on a problem, raises a `SteperError` naming the source, the location
    (e.g. "line 12") and the field, so a user can find and fix the row.
    """

    def __init__(self, data: dict[str, Any], source: str, location: str):
        self.data = data
        self.source = source
        self.location = location

    def fail(self, field: str, problem: str) -> NoReturn:
        raise SteperError(
            f"{self.source}, {self.location}: field '{field}' {problem}. Fix that row or remove it from the file."
        )

    def has(self, name: str) -> bool:
        return name in self.data

    def value(self, *names: str) -> tuple[str, Any]:
        """The first of `names` present in the row, as `(name, value)`; fails naming all of them if none is."""
        for name in names:
            if name in self.data:
                return name, self.data[name]
        self.fail(names[0], "is missing" + "".join(f" (and so is its variant '{name}')" for name in names[1:]))

    def value_in(self, container: dict[str, Any], parent: str, key: str) -> Any:
        """`container[key]` of a nested object, failing as the field `parent.key` when it is absent."""
        if key not in container:
            self.fail(f"{parent}.{key}", "is missing")
        return container[key]

    def text(self, *names: str) -> str:
        """A required, non-empty string field (under the first present of `names`), stripped of outer whitespace."""
        name, value = self.value(*names)
        value = self.check_str(name, value)
        if not value.strip():
            self.fail(name, "is empty")
        return value.strip()

    def check_str(self, field: str, value: Any) -> str:
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {_type_name(value)}")
        return value

    def check_list(self, field: str, value: Any) -> list:
        if not isinstance(value, list | tuple):
            self.fail(field, f"must be a list, got {_type_name(value)}")
        return list(value)

    def check_dict(self, field: str, value: Any) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, got {_type_name(value)}")
        return value

    def check_int(self, field: str, value: Any) -> int:
        # bool is an int subclass; a True where an index belongs is a broken row, not the index 1.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, f"must be an integer, got {_type_name(value)}")
        return value

    def check_bool(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {_type_name(value)}")
        return value

    def str_list(self, field: str, value: Any) -> list[str]:
        return [self.check_str(f"{field}[{i}]", item) for i, item in enumerate(self.check_list(field, value))]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def iter_file_rows(path: Path) -> Iterator[Row]:
    """Yield the records of a local `.jsonl`, `.json` (a list, or one object a line) or `.parquet` file.

    JSON Lines and Parquet are streamed, so a caller that stops early never reads the rest of the file.
    """
    if path.suffix.lower() == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix.lower() == ".json" and _first_char(path) == "[":
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path)


def iter_records(records: Any, source: str, unit: str = "row") -> Iterator[Row]:
    """Wrap already-parsed records (a hub split, a JSON list), numbering them from 1."""
    for number, record in enumerate(records, start=1):
        yield _as_row(record, source, f"{unit} {number}")


def _as_row(record: Any, source: str, location: str) -> Row:
    if not isinstance(record, dict):
        raise SteperError(
            f"{source}, {location}: expected a JSON object with the question's fields, got {_type_name(record)}. "
            "Fix that row or remove it from the file."
        )
    return Row(record, source, location)


def _first_char(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SteperError(
                    f"{path}, line {number}: not valid JSON ({e.msg}). Each line must hold one JSON object; "
                    "fix that line or remove it."
                ) from None
            yield _as_row(record, str(path), f"line {number}")


def _iter_json_list(path: Path) -> Iterator[Row]:
    try:
        with path.open(encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise SteperError(
            f"{path}, line {e.lineno}: not valid JSON ({e.msg}). Fix the file or convert it to JSON Lines."
        ) from None
    if not isinstance(records, list):
        raise SteperError(f"{path}: expected a JSON list of questions, got {_type_name(records)}.")
    yield from iter_records(records, str(path), unit="item")


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise SteperError(f"{path}: not a readable Parquet file ({e}). Check the file or pass a .jsonl file.") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            number += 1
            yield _as_row(record, str(path), f"row {number}")
