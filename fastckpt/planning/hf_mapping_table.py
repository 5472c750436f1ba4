"""transformers' conversion mapping for one model, without compiling every model's regexes.

On its first use transformers builds the conversion table of all its model types at
once (``conversion_mapping._build_checkpoint_conversion_mapping``: ~1,100
``WeightTransform`` objects, one ``re.compile`` each, 0.3 s of a fresh process's
first MoE load), and a model uses a handful of them. While fastckpt has that table
built, ``re.compile`` as ``transformers.core_model_loading`` sees it returns a
pattern compiled on its first use; every method and attribute of a compiled pattern
is there, with the same results, and the table is transformers' own cache, which
``from_pretrained`` then reuses. Where transformers' internals are not the ones this
was written against (5.x), the table is built the ordinary way.
"""

from __future__ import annotations

import re
import threading
from types import ModuleType
from typing import Any

__all__ = ["model_conversion_mapping"]

_lock = threading.Lock()


class LazyPattern:
    """``re.compile(pattern, flags)``, done on the first attribute access."""

    __slots__ = ("_args", "_compiled")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._args = (pattern, flags)
        self._compiled: re.Pattern[str] | None = None

    @property
    def compiled(self) -> re.Pattern[str]:
        if self._compiled is None:
            self._compiled = re.compile(*self._args)
        return self._compiled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)

    # Patterns are immutable: copies share them (transformers deep-copies its table).
    def __copy__(self) -> LazyPattern:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyPattern:
        return self

    def __repr__(self) -> str:
        return f"LazyPattern({self._args[0]!r})"


class _LazyCompileRe(ModuleType):
    """The ``re`` module, but for ``compile``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def compile(pattern: str, flags: int = 0) -> LazyPattern:
        return LazyPattern(pattern, flags)


def model_conversion_mapping(model: Any) -> list[Any]:
    """``transformers.conversion_mapping.get_model_conversion_mapping(model)``."""
    from transformers import conversion_mapping, core_model_loading

    with _lock:
        expected = (
            getattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", 0) is None
            and hasattr(conversion_mapping, "_build_checkpoint_conversion_mapping")
            and getattr(core_model_loading, "re", None) is re
        )
        if expected:
            core_model_loading.re = _LazyCompileRe("re")  # type: ignore[attr-defined]
            try:
                table = conversion_mapping._build_checkpoint_conversion_mapping()
            finally:
                core_model_loading.re = re  # type: ignore[attr-defined]
            conversion_mapping._checkpoint_conversion_mapping_cache = table
    return conversion_mapping.get_model_conversion_mapping(model)  # type: ignore[no-any-return]
