"""The composed config checked against the constructors it instantiates, before anything runs.

Every node with a ``_target_`` is a constructor call: its keys must be arguments of that callable
and its plain values must have the annotated types. So ``+data.windw=32``, a key an experiment file
adds by mistake, or ``data.fold=two`` fails right after composition with one line naming the key,
instead of deep inside a Lightning hook. A mapping given for an argument annotated with a
dataclass (``inference:`` of the stitched evaluation) is checked against the dataclass's fields.
See docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ichseg.errors import ConfigError

#: Hydra's own keys of an instantiated node.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})
_PLAIN = (bool, int, float, str)


def check_config(cfg: Any) -> None:
    """Raise :class:`~ichseg.errors.ConfigError` for the first key of ``cfg`` (a composed
    DictConfig or a plain mapping) that its ``_target_`` does not take or that has a wrong type."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    for path, node in target_nodes(plain):
        check_node(path, node)
    if isinstance(plain, Mapping):
        check_run_keys(plain)


#: The run's own top-level keys (conf/train.yaml) and the plain types they take.
RUN_KEYS: dict[str, Any] = {
    "seed": int,
    "train": bool,
    "test": bool,
    "ckpt_path": str | None,
    "optimized_metric": str | None,
    "task_name": str,
}


def check_run_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse a top-level run key of ``conf/train.yaml`` (``seed``, ``train``, ``test``,
    ``ckpt_path``, ...) with a value of the wrong type."""
    for key, annotation in RUN_KEYS.items():
        if key in cfg:
            check_value(key, cfg[key], annotation, "conf/train.yaml")


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every mapping with a ``_target_`` in ``node``, with its dotted path, outermost first."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from target_nodes(value, f"{path}[{index}]")


def check_node(path: str, node: Mapping[str, Any]) -> None:
    """Check one ``_target_`` node's keys and plain values against its callable's signature."""
    target = node["_target_"]
    where = path or "the config"
    function = locate(target, where)
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    parameters = signature.parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    hints = _type_hints(function)
    named = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key not in parameters:
            if open_ended:
                continue
            raise ConfigError(f"{_key(path, key)}: not an argument of {target}{_hint(key, named)}")
        check_value(_key(path, key), value, hints.get(key), target)


def check_value(key: str, value: Any, annotation: Any, target: str) -> None:
    """Refuse a plain value (not an interpolation, not a nested call) of the wrong type, and a
    mapping with unknown keys for an argument annotated with a dataclass."""
    if annotation is None or _is_interpolation(value):
        return
    if isinstance(value, Mapping):
        if "_target_" not in value:
            for spec in _dataclasses_in(annotation):
                _check_fields(key, value, spec)
        return
    if isinstance(value, list):
        return
    allowed = _plain_types(annotation)
    if allowed is None or _accepts(allowed, value):
        return
    names = " or ".join(dict.fromkeys("null" if t is type(None) else t.__name__ for t in allowed))
    raise ConfigError(f"{key}: {target} expects {names}, got {value!r}")


def locate(target: str, where: str) -> Callable[..., Any]:
    """The callable named by a ``_target_``; one line when it cannot be imported."""
    from hydra.utils import get_object

    try:
        function = get_object(target)
    except Exception:  # Hydra raises ImportError or its own errors, with a long message
        raise ConfigError(f"{where}._target_: cannot import {target!r}") from None
    if not callable(function):
        raise ConfigError(f"{where}._target_: {target!r} is not a class or function")
    return function


def _check_fields(key: str, value: Mapping[str, Any], spec: type) -> None:
    names = [f.name for f in dataclasses.fields(spec)]
    hints = _type_hints(spec)
    for name, item in value.items():
        if name not in names:
            raise ConfigError(f"{key}.{name}: not a field of {spec.__name__}{_hint(name, names)}")
        check_value(f"{key}.{name}", item, hints.get(name), spec.__name__)


def _type_hints(function: Any) -> dict[str, Any]:
    target = function.__init__ if inspect.isclass(function) else function
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: skip the type checks
        return {}


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows, or None when it allows anything else too."""
    allowed = []
    for arg in _union_args(annotation):
        if arg is type(None) or arg in _PLAIN:
            allowed.append(arg)
        elif typing.get_origin(arg) is typing.Literal:
            allowed.extend({type(v) for v in typing.get_args(arg)})
        elif _is_tensor(arg):
            allowed.append(float)  # a number in a config (torch.optim's ``lr: float | Tensor``)
        else:
            return None
    return tuple(allowed)


def _is_tensor(annotation: Any) -> bool:
    return getattr(annotation, "__module__", "") == "torch" and (
        getattr(annotation, "__name__", "") == "Tensor"
    )


def _accepts(allowed: tuple[type, ...], value: Any) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return isinstance(value, tuple(t for t in allowed if t is not type(None)))


def _dataclasses_in(annotation: Any) -> list[type]:
    return [a for a in _union_args(annotation) if dataclasses.is_dataclass(a)]


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _hint(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
