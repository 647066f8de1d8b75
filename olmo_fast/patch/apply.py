"""`patch` / `unpatch`: olmo_fast's fused ops inside transformers' OLMo, OLMo2, Llama, Mistral and Qwen2
models.

`TABLE` says, per model family, which transformers class gets which replacement forward (`forwards.py`) under
which switch. A patch never swaps modules or parameters: it sets `forward` on the matching module instances
(a loaded model: only those inside it) or on the classes themselves (a class or transformers module: every
model built afterwards), keeping what was there so that `unpatch` puts exactly that back.
"""
from __future__ import annotations

import importlib
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import forwards


def _family(name: str, prefix: str, norm: str, norm_forward: Callable) -> tuple[str, tuple]:
    """A family's row of `TABLE`: transformers names its classes `<prefix>{norm, MLP, Attention, ForCausalLM}`
    in `transformers.models.<name>.modeling_<name>`."""
    return (f"transformers.models.{name}.modeling_{name}", (
        (prefix + norm, ("norm",), norm_forward),
        (prefix + "MLP", ("swiglu",), forwards.swiglu_mlp_forward),
        (prefix + "Attention", ("rope", "attention"), forwards.attention_forward),
        (prefix + "ForCausalLM", ("cross_entropy",), forwards.causal_lm_forward),
    ))


# family -> (transformers modeling module, ((class name, switches that enable it, forward factory), ...))
TABLE: dict[str, tuple[str, tuple[tuple[str, tuple[str, ...], Callable], ...]]] = {
    "olmo": _family("olmo", "Olmo", "LayerNorm", forwards.layer_norm_forward),
    "olmo2": _family("olmo2", "Olmo2", "RMSNorm", forwards.rms_norm_forward),
    "llama": _family("llama", "Llama", "RMSNorm", forwards.rms_norm_forward),
    "mistral": _family("mistral", "Mistral", "RMSNorm", forwards.rms_norm_forward),
    "qwen2": _family("qwen2", "Qwen2", "RMSNorm", forwards.rms_norm_forward),
}
SUPPORTED = "transformers' OLMo (olmo), OLMo2 (olmo2), Llama (llama), Mistral (mistral) and Qwen2 (qwen2) models"
_MISSING = object()


@dataclass(eq=False)
class PatchRecord:
    """What one `patch` call replaced: `replaced[class name]` lists the patched module paths (a model) or the
    class itself (classes). `unpatch(record)` (or `unpatch(target)`) restores it."""

    target: Any
    options: forwards.Options
    replaced: dict[str, list[str]] = field(default_factory=dict)
    undo: list[tuple[Any, str, Any]] = field(default_factory=list, repr=False)  # (owner, attribute, old value)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name} x{len(paths)}" for name, paths in self.replaced.items())
        return f"PatchRecord({_name(self.target)}: {counts or 'nothing'})"


# Live records. A patched model holds its own (`_olmo_fast_patches`), so a model dropped without `unpatch` is
# freed with its record; class patches are held here (classes live as long as the process).
_ACTIVE: weakref.WeakSet[PatchRecord] = weakref.WeakSet()
_CLASS_PATCHES: list[PatchRecord] = []


def _holder(target: Any) -> list[PatchRecord]:
    """The list that keeps `target`'s records alive, in patch order."""
    if isinstance(target, nn.Module):
        return target.__dict__.setdefault("_olmo_fast_patches", [])
    return _CLASS_PATCHES


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) or type(target).__name__


def _family_classes(family: str):
    module_name, rows = TABLE[family]
    module = importlib.import_module(module_name)
    return [(getattr(module, cls_name), switches, factory) for cls_name, switches, factory in rows]


def _families_of(target: Any) -> list[str]:
    """The families a model instance, a model class or a (transformers) module belongs to."""
    if isinstance(target, nn.Module):
        modules = {type(m).__module__ for m in target.modules()}
    elif isinstance(target, type):
        modules = {c.__module__ for c in target.__mro__}
    elif isinstance(target, types.ModuleType):
        if target.__name__ == "transformers":
            return list(TABLE)
        modules = {target.__name__}
    else:
        raise TypeError(f"patch wants a model, a model class or a transformers module, got {type(target).__name__}")
    found = [family for family, (module_name, _) in TABLE.items() if module_name in modules]
    if not found:
        raise ValueError(f"olmo_fast.patch supports {SUPPORTED}; {_name(target)} contains none of them")
    return found


def patch(target: Any, *, rope: bool = True, swiglu: bool = True, norm: bool = True, attention: bool = True,
          cross_entropy: bool = True, backend: str | None = None) -> PatchRecord:
    """Run olmo_fast's fused ops in a transformers model, in place; returns what was replaced.

    `target`: a loaded model (its modules are patched, nothing else), or a model class / transformers
    modeling module / the `transformers` package itself (the family's classes are patched: every model
    built afterwards, `from_pretrained` included, uses the fused ops until `unpatch`). The switches pick
    the parts; `backend` pins one backend for all ops (default: the best per op and device).
    """
    opts = forwards.Options(rope=rope, swiglu=swiglu, norm=norm, attention=attention,
                            cross_entropy=cross_entropy, backend=backend)
    record = PatchRecord(target, opts)
    rows = [row for family in _families_of(target) for row in _family_classes(family)
            if any(getattr(opts, switch) for switch in row[1])]
    if isinstance(target, nn.Module):
        owners = [(path or _name(target), module, cls, factory)
                  for path, module in target.named_modules() for cls, _, factory in rows if type(module) is cls]
    else:
        owners = [(cls.__qualname__, cls, cls, factory) for cls, _, factory in rows]
    for path, owner, cls, _ in owners:
        # accelerate's hooks keep the real forward in `_old_forward`: patch that, keep the hook
        attr = "_old_forward" if "_old_forward" in vars(owner) else "forward"
        if any(o is owner and a == attr for r in {*_ACTIVE, *_holder(target)} for o, a, _ in r.undo):
            raise RuntimeError(f"{path} is already patched by olmo_fast: unpatch it first")
        record.undo.append((owner, attr, vars(owner).get(attr, _MISSING)))
        record.replaced.setdefault(cls.__name__, []).append(path)
    for (owner, attr, _), (_, _, cls, factory) in zip(record.undo, owners):
        forward = factory(cls.forward, opts)
        setattr(owner, attr, forward if isinstance(owner, type) else types.MethodType(forward, owner))
    _ACTIVE.add(record)
    _holder(target).append(record)
    return record


def unpatch(record_or_target: Any) -> None:
    """Undo a `patch`: give its record, or the object that was patched (its latest patch is undone)."""
    if isinstance(record_or_target, PatchRecord):
        record = record_or_target
    else:
        matches = [r for r in _holder(record_or_target) if r.target is record_or_target]
        if not matches:
            raise ValueError(f"{_name(record_or_target)} is not patched by olmo_fast")
        record = matches[-1]
    held = _holder(record.target)
    if record not in held:
        raise ValueError(f"{record!r} was already undone")
    for owner, attr, old in reversed(record.undo):
        if old is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, old)
    held.remove(record)
    _ACTIVE.discard(record)
