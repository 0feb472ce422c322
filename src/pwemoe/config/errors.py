"""The config's error type, and the errors its validators raise for one key (formatted by `validation`)."""

from __future__ import annotations

from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """All problems of a config, one per line, each with its key path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} config error(s):\n" + "\n".join(f"  - {e}" for e in errors))


KEY_ERROR = "pwemoe_key"  # one key's problem, found by a validator of the whole model
KEYS_ERROR = "pwemoe_keys"  # several problems found by one validator, each line starting with its key


def key_error(key: str, why: str) -> PydanticCustomError:
    """An error of one field found by a validator of the whole model: reported at `<model path>.<key>`."""
    return PydanticCustomError(KEY_ERROR, "{why}", {"key": key, "why": why})


def keys_error(lines: list[str]) -> PydanticCustomError:
    """Several errors found by one validator, each line naming its key."""
    return PydanticCustomError(KEYS_ERROR, "{why}", {"why": "\n".join(lines)})
