"""pixclass: from a folder of images to a trained, evaluated, explained and deployed classifier.

Public API (loaded on first use, so `import pixclass` stays fast):
    ImageFolder, ImageClassifier, load, RunConfig, UserError
"""

__version__ = "0.1.0"
__all__ = ["ImageFolder", "ImageClassifier", "load", "RunConfig", "UserError", "__version__"]

_EXPORTS = {"ImageFolder": "api", "ImageClassifier": "api", "load": "api", "RunConfig": "config",
            "UserError": "errors"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pixclass' has no attribute {name!r}")
