"""Drop-in acceleration: :func:`accelerate` runs the layers of a normflows, FrEIA or nflows model on flowkern's
ops.

Each peer library has a module here (:mod:`.normflows`, :mod:`.freia`, :mod:`.nflows`) holding, for each layer
it covers, a subclass of that layer computing the same map through flowkern's fused ops, and a rule saying when
a module takes it. :func:`accelerate` gives each recognised module its subclass in place (``module.__class__``), so the
module keeps its very ``Parameter`` and buffer objects, its ``state_dict`` keys, its hooks, its methods and
``isinstance``: an optimiser built before keeps working and checkpoints load both ways. A module it does not
know is not touched; a library that is not installed is not looked for.
"""
import dataclasses
import importlib.util

from torch import nn

#: the peer libraries looked for: (import name, flowkern module holding its rules)
LIBRARIES = (("normflows", "normflows"), ("FrEIA", "freia"), ("nflows", "nflows"))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One recognised module: its name in the model, its class, whether it runs on flowkern's ops and how, or
    why it was left alone."""
    name: str
    kind: str
    accelerated: bool
    how: str


class Report(list):
    """The :class:`Entry` of every module of a model that a peer library defines and flowkern knows."""

    def __str__(self):
        if not self:
            return "no module of normflows, FrEIA or nflows found"
        width = max(len(e.name or "(model)") for e in self)
        lines = [f"{e.name or '(model)':<{width}}  {e.kind}: {'accelerated' if e.accelerated else 'left alone'}"
                 f" ({e.how})" for e in self]
        done = sum(e.accelerated for e in self)
        return "\n".join([*lines, f"{done} of {len(self)} recognised modules accelerated"])


def _rules():
    """{peer class: rule} over the installed libraries; a rule maps a module of exactly that class to
    ``(subclass, how it runs)`` or ``(None, why it is left alone)``."""
    rules = {}
    for library, name in LIBRARIES:
        if importlib.util.find_spec(library) is not None:
            rules.update(importlib.import_module(f"{__name__}.{name}").RULES)
    return rules


def _accelerated_classes(rules):
    """{flowkern subclass: the peer class it accelerates}."""
    return {subclass: peer for peer, rule in rules.items() for subclass in getattr(rule, "subclasses", ())}


def _describe(module, rules, accelerated):
    """The :class:`Entry` fields for ``module``, or None when flowkern does not know its class."""
    cls = type(module)
    if cls in accelerated:
        peer = accelerated[cls]
        return f"{peer.__module__}.{peer.__qualname__}", True, module.flowkern_runs()
    rule = rules.get(cls)
    if rule is not None:
        subclass, how = rule(module)
        return f"{cls.__module__}.{cls.__qualname__}", subclass is not None, how
    for peer in rules:
        if isinstance(module, peer):
            return (f"{cls.__module__}.{cls.__qualname__}", False,
                    f"a subclass of {peer.__module__}.{peer.__qualname__}: its methods may differ, so it is not replaced")
    return None


def accelerate(model: nn.Module, *, report: bool = False) -> nn.Module:
    """Run every module of ``model`` that flowkern recognises from normflows, FrEIA or nflows on flowkern's fused ops,
    in place, and return ``model``.

    A recognised module is one whose class is exactly one of those listed in ``docs/dropin.md``, in a
    configuration the ops cover; it keeps its parameters, buffers, ``state_dict`` keys, methods and direction
    conventions, and computes the same map (to float rounding: the fused ops order their sums differently).
    The ops run on the active backend (:func:`flowkern.set_backend`). Calling it again changes nothing.
    ``report=True`` prints :func:`acceleration_report` of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate expects a torch.nn.Module, got {type(model).__name__}")
    rules = _rules()
    for module in model.modules():
        rule = rules.get(type(module))
        if rule is None:
            continue
        subclass, _ = rule(module)
        if subclass is not None:
            module.__class__ = subclass
            module.flowkern_adopt()
    if report:
        print(acceleration_report(model))
    return model


def acceleration_report(model: nn.Module) -> Report:
    """What :func:`accelerate` did or would do to each module of ``model`` that a peer library defines: the
    modules it runs on flowkern's ops and how, and those it leaves alone and why."""
    rules = _rules()
    accelerated = _accelerated_classes(rules)
    entries = Report()
    for name, module in model.named_modules():
        described = _describe(module, rules, accelerated)
        if described is not None:
            entries.append(Entry(name, *described))
    return entries


def rule(*subclasses):
    """Marks a rule function with the subclasses it hands out (so that the report knows them)."""
    def mark(fn):
        fn.subclasses = subclasses
        return fn
    return mark


__all__ = ["Entry", "Report", "accelerate", "acceleration_report", "rule"]
