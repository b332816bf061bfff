"""User model factories: a model named by a function that builds it rather than by a built-in name.

Besides the built-in names, a model can be a user factory, in one of three forms:

* ``package.module:function``: a module importable in the worker image (installed, or on PYTHONPATH);
* ``path/to/file.py:function``: a single Python file, loaded with importlib from its path. Workers receive
  the same string, so the path must be one they can read: `microfed run` makes it absolute;
* ``gs://bucket/path/file.py:function``: a single Python file fetched from GCS by every worker (the form for a
  cluster, where the file ships through the bucket rather than the image).

The function is called as ``function(num_classes=, in_channels=, image_size=)`` and returns an ``nn.Module``.
A factory file runs with the worker's privileges, like the command line that names it. A model folder names its
factory too (model_config.json), but a folder is data: `model_files.load_model` decides whether to run what it
names; `build_model` runs what it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import TYPE_CHECKING

from torch import nn

from .errors import MicrofedError

if TYPE_CHECKING:
    from .models import ModelConfig

__all__ = [
    "FACTORY_FORMS",
    "FACTORY_HINT",
    "FACTORY_MODULE_PREFIX",
    "FactoryDigestError",
    "build_from_factory",
    "factory_file",
    "factory_parts",
    "factory_sha256",
]

# A user factory: `package.module:function`, `path/file.py:function` or `gs://bucket/file.py:function`; dotted
# attribute paths such as `module:Class.create` work too.
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
FACTORY_FORMS = "package.module:function, path/to/file.py:function or gs://BUCKET/path/file.py:function"
FACTORY_HINT = f"or a user factory ({FACTORY_FORMS}) called with num_classes, in_channels, image_size"
# Prefix of the names factory files are registered under in sys.modules (plus a hash of their content).
FACTORY_MODULE_PREFIX = "microfed_user_factory_"


def factory_file(name: str) -> str | None:
    """The Python file a `file.py:function` or `gs://.../file.py:function` factory loads, else None."""
    parts = factory_parts(name)
    return parts[0] if parts is not None and parts[0].endswith(".py") else None


def factory_sha256(name: str) -> str | None:
    """sha256 of the content of the file a `file.py:function` or `gs://.../file.py:function` factory loads (read
    now, nothing run); None for built-in models and `package.module:function` factories.

    Training records it in model_config.json, so that a later load can tell whether the file is still the one
    the weights were trained with.
    """
    file = factory_file(name)
    if file is None:
        return None
    with _staged_factory_file(name, file) as path:
        return hashlib.sha256(path.read_bytes()).hexdigest()


class FactoryDigestError(MicrofedError):
    """A factory file's content does not have the sha256 the caller expected; nothing of it ran."""

    def __init__(self, name: str, file: str, *, expected: str, found: str) -> None:
        super().__init__(
            f"model factory {name!r}: {file} has sha256 {found}, expected {expected}",
            hint="load the file the model was trained with",
        )
        self.file = file
        self.expected = expected
        self.found = found


def factory_parts(name: str) -> tuple[str, str] | None:
    """(module or .py file, attribute path) of a well-formed factory name, else None."""
    where, colon, attribute = name.rpartition(":")
    if not colon or not _DOTTED.fullmatch(attribute):
        return None
    if not where.endswith(".py"):  # `model.py:make` is a file, not a submodule `py` of a package `model`
        return (where, attribute) if _DOTTED.fullmatch(where) else None
    if where.strip() != where or any(ord(ch) < 32 for ch in where) or Path(where).name == ".py":
        return None
    if where.startswith("gs://"):
        from .storage import split_gcs

        try:
            _, key = split_gcs(where)
        except MicrofedError:
            return None
        if PurePosixPath(key).name == ".py":
            return None
    return where, attribute


def build_from_factory(config: ModelConfig, sha256: str | None) -> nn.Module:
    parts = factory_parts(config.name)
    assert parts is not None  # ModelConfig checked the name (internal invariant)
    module_name, attribute_path = parts
    if module_name.endswith(".py"):
        module = _load_factory_file(config.name, module_name, sha256)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise MicrofedError(
                f"model factory {config.name!r}: cannot import module {module_name!r} ({err})",
                hint="install the package in the worker image or put its folder on PYTHONPATH",
            ) from err
    factory: object = module
    for attribute in attribute_path.split("."):
        if not hasattr(factory, attribute):
            raise MicrofedError(
                f"model factory {config.name!r}: {module_name!r} has no attribute {attribute_path!r}",
                hint="check the spelling after the ':'",
            )
        factory = getattr(factory, attribute)
    if not callable(factory):
        raise MicrofedError(
            f"model factory {config.name!r} is a {type(factory).__name__}, not a callable",
            hint="point at a function that returns a torch.nn.Module",
        )
    model = factory(num_classes=config.num_classes, in_channels=config.in_channels, image_size=config.image_size)
    if not isinstance(model, nn.Module):
        raise MicrofedError(
            f"model factory {config.name!r} returned {type(model).__name__}, not a torch.nn.Module",
            hint="return the model instance itself",
        )
    return model


def _load_factory_file(name: str, file: str, sha256: str | None) -> ModuleType:
    """The module of a factory file (local or gs://), executed once per process and content.

    It is registered in sys.modules under a name derived from its content's hash, so loading the same file again
    (every build_model call of a worker) reuses it, and a changed file is a new module. With `sha256`, content
    with another digest raises FactoryDigestError before it runs: the bytes compared are the bytes executed.
    """
    with _staged_factory_file(name, file) as path:
        source = path.read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        if sha256 is not None and digest != sha256:
            raise FactoryDigestError(name, file, expected=sha256, found=digest)
        module_name = FACTORY_MODULE_PREFIX + digest[:24]
        loaded = sys.modules.get(module_name)
        if loaded is not None:
            return loaded
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None:  # a .py path always gets a spec; be explicit anyway
            raise MicrofedError(f"model factory {name!r}: {file} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it, as `import` does (dataclasses look it up)
        try:
            # What the loader's exec_module would do, but on the bytes hashed above rather than a second read.
            exec(compile(source, str(path), "exec"), module.__dict__)
        except Exception as err:  # the user's code: any error in it means the factory is unusable
            del sys.modules[module_name]
            raise MicrofedError(
                f"model factory {name!r}: running {file} failed: {type(err).__name__}: {err}",
                hint="fix the file; it runs as a module of its own and can import installed packages only",
            ) from err
        return module


@contextlib.contextmanager
def _staged_factory_file(name: str, file: str) -> Iterator[Path]:
    """A local path to a factory file: the file itself, or a download of a gs:// one (removed afterwards)."""
    from .storage import staged_file  # google-cloud-storage is imported only when a factory file is used

    if not file.startswith("gs://") and not Path(file).expanduser().is_file():
        raise MicrofedError(
            f"model factory {name!r}: file {file} not found",
            hint="a local factory file must exist on the machine that builds the model; "
            "on a cluster copy it to a bucket and pass gs://BUCKET/path/file.py:function",
        )
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(staged_file(file if file.startswith("gs://") else Path(file).expanduser()))
        except MicrofedError as err:  # storage's errors name the URI (not found, access denied); add the flag's
            raise MicrofedError(f"model factory {name!r}: {err.message}", hint=err.hint) from None
        yield path
