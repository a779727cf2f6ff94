"""Model registry: names to factories, plus models loaded from an import path.

A factory is registered with ``@register("name")`` and is called as
``factory(input_shape=(C, H, W), num_classes=K, **options)``; its keyword parameters other
than ``input_shape`` and ``num_classes`` are the options a config may set under
``model.options``. Every model maps a float batch [B, C, H, W] to logits [B, K] (the
autoencoder returns a reconstruction [B, C, H, W] instead).

A name of the form ``package.module:factory`` is imported instead of looked up, so users can
plug in their own architecture without touching fedtier.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from fedtier.errors import ConfigError, FedtierError, UnknownNameError

Shape = tuple[int, int, int]
"""Input shape (channels, height, width) of one example."""

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_DATA_ARGS = ("input_shape", "num_classes")
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``."""

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def known_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, /, **options: object
) -> nn.Module:
    """Build model ``name`` for inputs [B, *input_shape] and ``num_classes`` outputs.

    ``name`` is a registered name (see :func:`known_models`) or ``package.module:factory``.
    The first three arguments are positional-only, so a stray ``name`` or ``num_classes`` in
    ``options`` is reported as a bad option rather than a ``TypeError``.
    Raises :class:`UnknownNameError` for an unknown name, :class:`ConfigError` for an option
    the model does not accept or a bad option value, :class:`FedtierError` for an import path
    that cannot be loaded. Weights are drawn from torch's global RNG, so building after
    ``torch.manual_seed(s)`` is deterministic.
    """
    shape = _check_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("num_classes", num_classes, "a positive integer")
    if ":" in name:
        return _build_from_path(name, shape, num_classes, options)
    factory = _REGISTRY.get(name)
    if factory is None:
        raise UnknownNameError("model", name, known_models())
    _check_options(name, factory, options, exclude=_DATA_ARGS)
    return factory(input_shape=shape, num_classes=num_classes, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _check_shape(input_shape: Sequence[int]) -> Shape:
    values = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if len(values) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ConfigError(
            "input_shape", input_shape, "three positive integers (channels, height, width)"
        )
    return values[0], values[1], values[2]


def _keywords(factory: Factory) -> set[str] | None:
    """Parameter names ``factory`` accepts by keyword; ``None`` if it accepts any keyword."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_options(
    name: str, factory: Factory, options: dict[str, object], exclude: Sequence[str]
) -> None:
    """Reject option keywords ``factory`` does not take (and the data arguments in ``exclude``)."""
    keywords = _keywords(factory)
    accepted = None if keywords is None else sorted(keywords - set(exclude))
    for key, value in options.items():
        if key in exclude or (accepted is not None and key not in accepted):
            allowed = ", ".join(accepted) if accepted else "none"
            raise ConfigError(f"model.{key}", value, f"options of model '{name}': {allowed}")


def _build_from_path(
    path: str, shape: Shape, num_classes: int, options: dict[str, object]
) -> nn.Module:
    """Call the factory at ``package.module:factory``, passing the data arguments if it takes them."""
    factory = _load_factory(path)
    keywords = _keywords(factory)
    takes_data = keywords is None or set(_DATA_ARGS) <= keywords
    _check_options(path, factory, options, exclude=_DATA_ARGS if takes_data else ())
    if takes_data:
        model = factory(input_shape=shape, num_classes=num_classes, **options)
    else:
        model = factory(**options)
    if not isinstance(model, nn.Module):
        raise FedtierError(
            f"model '{path}': the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _load_factory(path: str) -> Factory:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr.isidentifier():
        raise FedtierError(
            f"model '{path}': expected an import path of the form 'package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: any import-time failure is reported, not raised raw
        raise FedtierError(
            f"model '{path}': cannot import module '{module_name}': {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise FedtierError(f"model '{path}': module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise FedtierError(
            f"model '{path}': '{attr}' is a {type(factory).__name__}, not a callable factory"
        )
    return factory
