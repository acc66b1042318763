"""Loading a PipelineConfig: YAML files (unique keys, YAML 1.2 numbers), layered, then ``values``, then
``section.key=value`` overrides; a validation error names the file line or override and suggests the key meant."""

from __future__ import annotations

import datetime
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from instructrl.config.schema import MOVED_KEYS, PipelineConfig, annotation_choices, check_divisions, is_section
from instructrl.errors import UserError


VALUES = "config values"  # how an error names load_config's ``values``


def load_config(path: Path | str | list | None = None, overrides: list[str] | str = (), values: dict | None = None) -> PipelineConfig:
    """Defaults, then the YAML file at ``path`` (or each of a list of files in turn, a later file's
    keys winning), then ``values`` (sections as a file holds them, ``{"rm": {"lr": 1e-4}}``), then
    ``overrides`` ("a.b=value", or a list of them), validated: an unknown key or a bad value is a UserError naming the
    key, and the file line, override or ``values`` that set it."""
    overrides = [overrides] if isinstance(overrides, str) else overrides  # one string is one override, not its letters
    paths = [Path(p) for p in ([] if path is None else path if isinstance(path, list) else [path])]
    data: dict = {}
    for i, file in enumerate(paths):
        data = _read_yaml(file) if i == 0 else _layer(data, _read_yaml(file), file)
    if values:
        data = _layer(data, values, VALUES)
    for override in overrides:
        _apply_override(data, override)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        source = ", ".join([*map(str, paths), *([VALUES] if values else [])]) or "defaults"
        raise UserError(_describe_validation_error(err, source, paths, overrides, values or {})) from None
    check_divisions([(config.model.hidden_size, config.model.n_head, "model.hidden_size", "model.n_head")])
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's loader, but a key written twice in one mapping is an error rather than the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *shared` merges an anchored mapping in; the keys beside it override its own
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# Numbers as YAML 1.2 reads them (PyYAML reads YAML 1.1): `seed: 010` is ten, not octal eight, and
# `1:30` is text, not the sexagesimal ninety. Kept from 1.1: `1_000_000`, and `1e-4` is a number.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text)


_UniqueKeyLoader.add_constructor(_INT, _construct_int)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: malformed YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: malformed YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections, found {type(data).__name__}")
    return data


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        hint = f"; a config file is given as -c {override}" if override.endswith((".yaml", ".yml")) else ""
        raise UserError(f"override '{override}': expected KEY=VALUE, e.g. sft.lr=1e-4{hint}")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and any(v is None and ":" in str(k) for k, v in value.items()):
        raise UserError(f"override '{override}': in a {{name: value}} mapping YAML needs a space after each colon, "
                        f"e.g. {key.strip()}={{sft: runs/default/sft/final}}")
    parts = key.strip().split(".")
    if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool) and _takes_a_name(parts):
        value = raw.strip()  # run.dir=2024 names a folder, which YAML reads as a number (and 1.10 as 1.1)
    if value in ("none", "None") and type(None) in annotation_choices(_annotation(parts)):
        value = None  # Python's word for YAML's null: sft.model=None is the default, not a model named None
    _set(data, parts, value, f"override '{override}'")


def _set(data: dict, parts: list[str], value: Any, source: str) -> None:
    """Set the dotted key ``parts`` to ``value``; a mapping given to a section sets the keys it names and
    keeps the section's others, as their dotted overrides would (``sft={lr: 0.1}`` keeps the file's sft.epochs).
    ``source`` names the override, file or values setting it, for an error."""
    if isinstance(value, dict) and _known_keys(parts):
        for name, item in value.items():
            _set(data, [*parts, str(name)], item, source)
        return
    node = data
    for depth, part in enumerate(parts[:-1], 1):
        if node.get(part) is None:  # absent, or a section written with no keys
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            dotted = ".".join(parts[:depth])
            # a section that an earlier file or override gave one value (sft: 5) has no keys left to set
            what = f"a section, but was given the value {node!r} before" if _known_keys(parts[:depth]) else "not a section"
            raise UserError(f"{source}: '{dotted}' is {what}")
    node[parts[-1]] = value


def _layer(data: dict, upper: dict, file: Path | str) -> dict:
    """``data`` with a later config file's keys set over it: a section it names keeps the keys it
    leaves out, as with ``-c`` given twice (a base file and an experiment's changes)."""
    for name, value in upper.items():
        if value is None and is_section(_annotation([name])):
            continue  # a section with its keys commented out changes nothing
        _set(data, [str(name)], value, str(file))
    return data


def _annotation(loc: tuple | list) -> Any:
    """The type of the dotted key ``loc`` in PipelineConfig; None where there is no such key."""
    annotation = PipelineConfig
    for part in loc:
        if not (is_section(annotation) and str(part) in annotation.model_fields):
            return None
        annotation = annotation.model_fields[str(part)].annotation
    return annotation


def _known_keys(loc: tuple | list) -> list[str]:
    """The keys of the section at ``loc``; none when ``loc`` is not a section."""
    annotation = _annotation(loc)
    return list(annotation.model_fields) if is_section(annotation) else []


def _takes_a_name(loc: list[str]) -> bool:
    """Whether the key at ``loc`` is a path or a name, never a number."""
    choices = set(annotation_choices(_annotation(loc)))
    return bool({str, Path} & choices) and not {int, float} & choices


# Names other trainers (transformers' TrainingArguments, TRL) give to our keys, for the "did you mean" hint.
KEY_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
    "max_grad_norm": "grad_clip", "model_name_or_path": "model", "dataset": "data", "train_file": "data", "beta": "kl_coef",
    "init_kl_coef": "kl_coef", "kl_beta": "kl_coef", "cliprange": "clip", "cliprange_value": "value_clip", "num_ppo_epochs": "ppo_epochs",
    "max_new_tokens_per_response": "max_new_tokens", "response_length": "max_new_tokens", "num_samples": "k",
}


def _describe_validation_error(err: ValidationError, source: str, paths: list[Path], overrides, values: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        where = _where(dotted, paths, overrides, values) or source
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown config key '{dotted}'{_key_hint(loc)}")
        elif keys := _known_keys(loc):  # a value given to a section (sft.lora=true for sft.lora.enabled=true)
            lines.append(f"{where}: '{dotted}' is a section, not a value; set its keys as {dotted}.KEY=VALUE"
                         + (f" ({', '.join(keys)})" if len(keys) <= 8 else " (`instructrl config` lists them)"))
        else:
            # pydantic's "Input should be a valid dictionary" says nothing of how to write one
            problem = "expected a mapping, written {name: value}" if e["type"] == "dict_type" else e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: bad value for '{dotted}': {problem} (got {e.get('input')!r})")
    return "\n".join(lines)


def _key_hint(loc: tuple) -> str:
    """' (did you mean ...?)' for an unknown key: the key of its section it is closest to, or for a
    key given without its section (lr=1e-4), the sections that hold it; for a key that moved, where it is now."""
    if moved := MOVED_KEYS.get(".".join(map(str, loc))):
        return f" (it is now '{moved}')"
    name = str(loc[-1])
    known = _known_keys(loc[:-1])
    alias = KEY_ALIASES.get(name)
    close = [alias] if alias in known else difflib.get_close_matches(name, known, n=1)
    if close:
        return f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)"
    if len(loc) == 1:  # a key without its section
        holders = [f"{section}.{key}" for section in PipelineConfig.model_fields for key in (name, alias) if key in _known_keys([section])]
        if holders:
            listed = ", ".join(holders[:-1]) + " or " + holders[-1] if len(holders) > 1 else holders[0]
            return f" (a key goes under its section: {listed})"
    return ""


def _where(dotted: str, paths: list[Path], overrides, values: dict) -> str | None:
    """'override sft.lr=x', 'config values' or 'file.yaml:LINE' for the dotted key, if it can be
    located: the last override, ``values`` or file that sets it."""
    for override in reversed(list(overrides)):
        key = override.partition("=")[0].strip()
        if key == dotted or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"override '{override}'"
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return VALUES
    for whole in (True, False):  # the file that sets the key itself, else one that writes its section
        for path in reversed(paths):
            if (where := _line_of(dotted, path, whole)) is not None:
                return where
    return str(paths[-1]) if len(paths) == 1 else None


def _line_of(dotted: str, path: Path, whole: bool) -> str | None:
    """'file.yaml:LINE' of the dotted key, or unless ``whole`` of its deepest section written there;
    None where the file does not write it."""
    try:
        node = yaml.compose(Path(path).read_text())
    except yaml.YAMLError:
        return str(path)
    line, parts = None, dotted.split(".")
    for depth, part in enumerate(parts, 1):
        match = next(((k, v) for k, v in node.value if k.value == part), None) if isinstance(node, yaml.MappingNode) else None
        if match is None:
            return f"{path}:{line}" if line and not whole else None
        line, node = match[0].start_mark.line + 1, match[1]
    return f"{path}:{line}" if line else None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
