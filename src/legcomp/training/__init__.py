"""legcomp.training: training the cascade's networks (MONAI, single GPU/CPU or torchrun DDP).

Attributes are imported lazily, so that ``legcomp --help`` does not pay for torch and MONAI.
"""

from importlib import import_module

_EXPORTS = {
    "add_train_arguments": "cli", "main": "cli", "train_from_args": "cli",
    "build_transforms": "data", "discover": "data", "fit_patch": "data", "kfold_split": "data",
    "load_cases": "data", "study_cases": "data", "Source": "data", "parse_sources": "data",
    "load_studies": "data", "source_sampler": "data", "CaseCache": "cache", "default_cache_dir": "cache",
    "DEFAULT_PATCH": "loop", "dist_env": "loop", "resolve_device": "loop", "train": "loop", "validate": "loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"legcomp.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'legcomp.training' has no attribute {name!r}")
