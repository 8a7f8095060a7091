"""Keyword arguments under their earlier names, accepted for one release with a FutureWarning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(renames: Mapping[str, str]) -> Callable[[F], F]:
    """Let a function take each ``old`` keyword of ``renames`` (old -> new) as its ``new`` one.

    A call with an old name warns (FutureWarning, naming the new one); giving both names is a
    TypeError, as a repeated keyword is.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__name__}() got both {old}= and {new}=")
                    warnings.warn(
                        f"{function.__name__}({old}=...) is now {new}=...",
                        FutureWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
