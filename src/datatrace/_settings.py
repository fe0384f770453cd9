"""Dataclass settings with one-line help per field, and their JSON files.

Shared by the demo's config, subset-run configs and the unlearning methods' settings: each
field carries its help text (the CLI shows it), and a config is saved beside its results so
that a run can be repeated from the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

Config = TypeVar("Config", bound="JsonSettings")


def setting(text: str, default: Any = None) -> Any:
    """A dataclass field with default ``default`` and one-line help ``text``."""
    return field(default=default, metadata={"help": text})


class Settings:
    """Mixin for dataclasses whose fields are declared with :func:`setting`."""

    @classmethod
    def help(cls, name: str) -> str:
        """The one-line help text of field ``name``."""
        return {f.name: f.metadata["help"] for f in fields(cls)}[name]


class JsonSettings(Settings):
    """Settings saved to and read from a JSON object of their fields."""

    # What the file is called in error messages ("demo config").
    KIND: ClassVar[str] = "config"

    @classmethod
    def missing_hint(cls, path: Path) -> str:
        """Appended to the error for a missing file (e.g. how to write one)."""
        return ""

    def to_json(self, path: str | Path) -> Path:
        """Write the settings as JSON to ``path`` (parent directories created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls: type[Config], path: str | Path) -> Config:
        """Read settings written by :meth:`to_json`; missing fields take their defaults.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a JSON object of this class's fields.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.KIND} at {path}{cls.missing_hint(path)}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            unknown = sorted(set(values) - known) if isinstance(values, dict) else values
            raise ValueError(f"{path} is not a {cls.KIND}: unknown entries {unknown}")
        return cls(**values)
