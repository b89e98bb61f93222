"""A small name -> factory registry for backbones.

Recipes and the CLI refer to backbones by string (``"r50"``, ``"vit_b"``), so the mapping from
name to constructor lives in one place and errors are raised before any weights are allocated.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a backbone factory under ``name``.

    The factory's own signature is the list of options the backbone accepts; keep it explicit
    (no ``**kwargs``) so that :func:`build_backbone` can reject misspelt options up front.

    Args:
        name: Registry key, e.g. ``"r50"``. Must be unique.

    Returns:
        A decorator that records the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered (two modules fighting over a name would
            otherwise make the result depend on import order).
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_backbones() -> list[str]:
    """Returns the sorted names of all registered backbones."""
    return sorted(_REGISTRY)


def _check_kwargs(name: str, factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=1)
            if close:
                hints.append(f"{key!r} -> did you mean {close[0]!r}?")
        hint = (" " + " ".join(hints)) if hints else ""
        raise TypeError(
            f"backbone {name!r} got unexpected option(s) {unknown}; "
            f"accepted options: {accepted}.{hint}"
        )


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered backbone.

    Every backbone maps ``x: [B, 3, 112, 112]`` float images, normalised to
    ``(pixel - 127.5) / 127.5``, to ``[B, num_features]`` embeddings (not L2-normalised).

    Args:
        name: A name from :func:`list_backbones`.
        **kwargs: Options of that backbone, e.g. ``num_features=512, dropout=0.0``.

    Returns:
        The randomly initialised backbone (on CPU, in training mode).

    Raises:
        ValueError: If ``name`` is not registered; the message lists the available names and
            the closest match.
        TypeError: If an option is not accepted by that backbone.
    """
    if name not in _REGISTRY:
        available = list_backbones()
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}.{hint} Available: {', '.join(available)}")
    factory = _REGISTRY[name]
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)
