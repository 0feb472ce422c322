"""YAML read safely: no tags executed, and a hostile document (too large, too deeply nested, a "billion laughs"
of aliases) refused with one line before it is expanded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    from .schema import Config

# A config is a few kilobytes with hundreds of values; these bounds refuse a hostile document (a "billion laughs"
# of nested aliases, a huge file) before it is expanded, instead of hanging the parser.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, counted with every alias expanded


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads an exponent float without a dot or a signed exponent (1e-3, 3e30, -2E-5,
    1.0e5) as a float, as YAML 1.2, OmegaConf and Hydra do; YAML 1.1 reads those as text. Quoted, they stay text."""


# Only plain scalars that are whole numbers in exponent notation; the YAML 1.1 float forms resolve first.
EXPONENT_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+\Z")
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


class ConfigDumper(yaml.SafeDumper):
    """yaml.SafeDumper that quotes text `ConfigLoader` would read as a number (a task named '1e3'), so what
    pwemoe writes reads back the same."""


ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load (no tags are executed, exponent floats read as floats: `ConfigLoader`) within
    MAX_YAML_BYTES and MAX_YAML_VALUES; ConfigError naming `where` for a malformed, too large, too deeply nested
    or self-referencing document."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError([f"{where}: {len(text)} characters, more than a config may have ({MAX_YAML_BYTES})"])
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_values(node, MAX_YAML_VALUES)
        if n is None:
            raise ConfigError([f"{where}: an alias refers to the value that contains it (*name inside &name)"])
        if n > MAX_YAML_VALUES:
            raise ConfigError(
                [
                    f"{where}: more than {MAX_YAML_VALUES} values once its aliases (*name) are expanded; a "
                    "config has hundreds: write the values out, or use fewer nested aliases"
                ]
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: not valid YAML ({str(e).splitlines()[0]})"]) from None
    except RecursionError:
        raise ConfigError([f"{where}: nested too deeply to be a config"]) from None
    finally:
        loader.dispose()


def _expanded_values(root: yaml.Node, limit: int) -> int | None:
    """How many values the document holds with every alias expanded (counting stops past `limit`), or None
    when an alias refers to a value that contains it. Linear in the document's size: shared nodes are
    counted once and their size reused."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(n: yaml.Node) -> int | None:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_:
            return None
        open_.add(id(n))
        kids = n.value if isinstance(n, yaml.SequenceNode) else []
        if isinstance(n, yaml.MappingNode):
            kids = [x for kv in n.value for x in kv]
        total = 1
        for c in kids:
            k = size(c)
            if k is None:
                return None
            total += k
            if total > limit:
                break
        open_.discard(id(n))
        sizes[id(n)] = min(total, limit + 1)
        return sizes[id(n)]

    return size(root)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, with one-line errors for a missing, unreadable, malformed or hostile file."""
    path = Path(path)
    if path.is_dir():
        inside = path / "config.yaml"
        raise FileNotFoundError(
            f"config file {path} is a directory; give the YAML file"
            + (f" ({inside}, if that is a run's config)" if inside.is_file() else "")
        )
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid YAML (not UTF-8 text: {e.reason} at byte {e.start})"]) from None
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: expected a mapping at the top of {path}, got {type(data).__name__}"])
    return data


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `load_yaml` reads back equal (no tags; text that looks like a number quoted)."""
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)


def dump_config(cfg: Config) -> str:
    return dump_yaml(cfg.to_dict())
