"""Content hashes for the on-disk caches (teacher targets, probe results, decoded image folders): of tensors,
and of the code that computes a cached result, so that a cache entry is read back only by the code that
wrote it."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import marshal
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def digest_tensor(h, t: torch.Tensor) -> None:
    """Fold into `h` a tensor's shape, dtype and bytes."""
    t = t.detach().cpu()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    # reshape(-1): a 0-dim tensor (e.g. batch-norm's num_batches_tracked) cannot be viewed as bytes
    h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def code_modules(*roots: nn.Module) -> set[str]:
    """The modules defining the classes of `roots` and all their submodules, except torch's own (whose
    arithmetic `digest_code` keys by torch's version)."""
    names = {type(m).__module__ for root in roots for m in root.modules()}
    return {n for n in names if n != "torch" and not n.startswith("torch.")}


def digest_code(h, modules: Iterable[str], libraries: Iterable[str] = ("torch",)) -> None:
    """Fold into `h` the source files of `modules` and the installed versions of `libraries`: a cached result
    then belongs to the code that computed it, and an edited or upgraded encoder, head, probe or decoder is
    never served an old result."""
    for lib in libraries:
        h.update(f"{lib} {_version(lib)}".encode())
    for name in sorted(set(modules)):
        h.update(name.encode())
        h.update(module_code(name))


def module_code(name: str) -> bytes:
    """The source file of module `name`; for a module without one (a notebook's or `python -c`'s __main__,
    a script read from stdin) the compiled code of the functions and classes defined in it, so that an
    edited cell is new code there too."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    own = [v for _, v in sorted(vars(module).items()) if getattr(v, "__module__", None) == name] if module else []
    return b"".join(_compiled(v) for v in own)


def _compiled(obj) -> bytes:
    """The bytecode of a function, or of every method of a class."""
    if inspect.isclass(obj):
        return b"".join(_compiled(getattr(v, "__func__", v)) for _, v in sorted(vars(obj).items()))
    code = getattr(obj, "__code__", None)
    return marshal.dumps(code) if code is not None else b""


def digest_module(h, m: nn.Module) -> None:
    """Fold into `h` what a module computes besides its code (`digest_code`): its structure (`repr`), its plain
    attributes and its weights and buffers."""
    h.update(repr(m).encode())
    digest_attributes(h, m)
    for name, t in m.state_dict().items():
        h.update(name.encode())
        digest_tensor(h, t)


def digest_attributes(h, root: nn.Module) -> None:
    """Fold into `h` the plain attributes of `root` and its submodules (a gain, a flag, a function or a table
    set in __init__): they change what `forward` computes, and neither `repr` nor the state dict shows them
    (`_stable`)."""
    for name, m in root.named_modules():
        for attr, value in sorted(vars(m).items()):
            if attr.startswith("_") or attr == "training" or isinstance(value, nn.Module):
                continue
            h.update(f"{name}.{attr}={_stable(value)}\n".encode())


def _stable(value, depth: int = 0) -> str:
    """A text that changes with what `value` holds and is the same in every process: tensors and arrays by
    their bytes, functions by `digest_callable` (code, defaults, closure), sets sorted, containers and plain
    objects by their parts, other values by `repr` less any memory address."""
    if isinstance(value, (str, int, float, complex, bool, type(None))):
        return repr(value)
    if isinstance(value, np.ndarray) and value.dtype == object:
        return _stable(value.tolist(), depth + 1)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        sub = hashlib.sha256()
        digest_tensor(sub, torch.as_tensor(value) if isinstance(value, np.ndarray) else value)
        return f"{type(value).__name__}:{sub.hexdigest()[:16]}"
    if inspect.isbuiltin(value):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if inspect.isfunction(value) or inspect.ismethod(value) or isinstance(value, functools.partial):
        sub = hashlib.sha256()
        digest_callable(sub, value.__func__ if inspect.ismethod(value) else value)
        return f"callable:{sub.hexdigest()[:16]}"
    if depth > 4:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(_stable(v, depth + 1) for v in value)}]"
    if isinstance(value, (set, frozenset)):
        return f"set[{', '.join(sorted(_stable(v, depth + 1) for v in value))}]"
    if isinstance(value, dict):
        return f"dict[{', '.join(sorted(f'{_stable(k, depth + 1)}: {_stable(v, depth + 1)}' for k, v in value.items()))}]"
    if type(value).__repr__ is object.__repr__ and hasattr(value, "__dict__"):  # a plain object: by its parts
        return f"{type(value).__qualname__}({_stable(vars(value), depth + 1)})"
    return _ADDRESS.sub("", repr(value))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def object_key(*parts) -> str:
    """A short content key of Python objects given to a run: data (anything with `.digest()`, i.e. ImageData)
    by its pixels and labels, an encoder (factory or module) by `digest_callable`; None parts are skipped."""
    h = hashlib.sha256()
    for p in parts:
        if hasattr(p, "digest"):
            h.update(p.digest().encode())
        elif p is not None:
            digest_callable(h, p)
    return h.hexdigest()[:8]


def digest_callable(h, obj) -> None:
    """Fold into `h` what makes an encoder given from Python what it is: its class or function and that
    code (`module_code`), an instance's structure, and a function's closure values, defaults and bound
    arguments (a lambda over a loop variable is another encoder for every value)."""
    if isinstance(obj, functools.partial):
        h.update(repr((obj.args, sorted(obj.keywords.items()))).encode())
        return digest_callable(h, obj.func)
    if isinstance(obj, nn.Module):
        h.update(repr(obj).encode())
        digest_attributes(h, obj)
        obj = type(obj)
    h.update(f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', repr(obj))}".encode())
    h.update(module_code(getattr(obj, "__module__", "") or ""))
    cells = getattr(obj, "__closure__", None) or ()
    h.update(repr([getattr(obj, "__defaults__", None), getattr(obj, "__kwdefaults__", None),
                   [c.cell_contents for c in cells]]).encode())


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # e.g. a source build without metadata
        return "unknown"
