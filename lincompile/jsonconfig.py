"""`JsonConfig`: the JSON round trip shared by every frozen dataclass config.

`to_dict` gives plain JSON types (nested dataclasses as dicts, tuple fields as lists); `from_dict` rejects
unknown fields, naming the known ones, and, for a config with a `version` field, a version newer than the one
this lincompile writes (its default). `from_dict(c.to_dict()) == c` for every config.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
    """Mixin for `@dataclass(frozen=True)` configs."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object of its fields, got {type(data).__name__} {data!r:.60}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
        version = data.get("version", 0)
        if "version" in fields and (not isinstance(version, int) or isinstance(version, bool)):
            raise ValueError(f"{cls.__name__} version must be an integer, got {version!r}")
        if "version" in fields and version > fields["version"].default:
            raise ValueError(f"{cls.__name__} version {data['version']} is newer than this lincompile "
                             f"({fields['version'].default}); upgrade lincompile")
        return cls(**data)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


def read_json_object(path: Path, remedy: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in the file `path`, which must hold `keys`; ValueError naming the file and `remedy` (what to
    do: write it again) when it is no such object (cut short, edited by hand, another file)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged ({error}): {remedy}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is damaged (it holds a {type(data).__name__}, not a JSON object): {remedy}")
    missing = [key for key in keys if key not in data]
    if missing:
        raise ValueError(f"{path} is damaged (it lacks {missing}): {remedy}")
    return data
