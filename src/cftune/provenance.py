"""What produced a file: the versions every stage's manifest records, so a result can be
reproduced with the same software (a transformers upgrade can change a model's numerics)."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("cftune", "torch", "transformers", "accelerate", "datasets", "peft")


def package_versions() -> dict[str, str]:
    """Python's version and each installed package of `PACKAGES` (absent ones left out)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
