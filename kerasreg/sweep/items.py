"""The grid of `kerasreg.sweep`: what one grid point changes, and grids built for you.

A grid item is a penalty (for the sweep's `role`), `None` (no penalty on that
role), a dict `{role: penalty}`, a kerasreg post-step transform
(`WeightDecay(rate)`, `WeightDecay(rate, toward="start")`,
`SoftThreshold(threshold)`), or a list combining them. `parse_grid` checks
every item before anything is built and turns it into a `GridPoint`: its
penalties per role, its transforms, its *family* (what kind of knob:
`"L2Penalty"`, `"WeightDecay"`, `"L2Penalty+WeightDecay"`), its *values*
(`{"L2Penalty.l2": 1e-3, "WeightDecay.rate": 1e-2}`) and a readable name
(`"L2Penalty_0.001+WeightDecay_0.01"`).

`kerasreg.sweep.grids` builds such lists.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from kerasreg._checks import as_real_scalar
from kerasreg.attach import ROLES
from kerasreg.penalties import get
from kerasreg.poststep import PostStepTransform

ACCEPTED = (
    "a penalty (anything kerasreg.get resolves, for `role`), None (no penalty), "
    "a dict {role: penalty}, a kerasreg post-step transform (WeightDecay(rate), "
    "SoftThreshold(threshold)), or a list combining them"
)


@dataclass(frozen=True)
class GridPoint:
    """One grid item, checked: what its variant changes, and how it is named.

    Attributes:
        penalties: `{role: penalty or None}` given to `regularize` (`None`
            removes the role's penalty); roles not named keep the template's.
            An item of transforms only has `{role: None}`: no penalty on
            `role`, exactly as `[None, transform]`.
        transforms: the post-step transforms, as given (never trained with:
            each fit gets `fresh_transforms()`).
        family: the kinds of knob, joined by `"+"` (`"none"` for no knob).
        values: `{"<knob>.<argument>": number}` for every numeric argument.
        name: the family with its values, e.g. `"L2Penalty_0.001"`.
    """

    penalties: dict[str, Any]
    transforms: tuple[PostStepTransform, ...]
    family: str
    values: dict[str, float] = field(default_factory=dict)
    name: str = "none"

    @property
    def strength(self) -> float:
        """The sum of the values (a one-knob item: its value; none: 0.0)."""
        return float(math.fsum(self.values.values()))

    def fresh_transforms(self) -> list[PostStepTransform]:
        """New instances of the transforms, for one fit: never shared by two."""
        return [fresh_transform(t) for t in self.transforms]


# --- checking the items ---------------------------------------------------------


def parse_grid(penalties: Any, role: str) -> list[GridPoint]:
    """Check `sweep`'s `penalties` (and `role`) and return one `GridPoint` per item."""
    if role not in ROLES:
        raise ValueError(
            f"kerasreg.sweep: invalid `role`: expected one of {sorted(ROLES)}. "
            f"Received: role={role!r}."
        )
    if isinstance(penalties, (str, bytes, dict)) or not isinstance(penalties, Sequence):
        raise TypeError(
            "kerasreg.sweep: invalid `penalties`: expected a list of grid items, "
            f"each {ACCEPTED}. Received: penalties={penalties!r} "
            f"(type {type(penalties).__name__})."
        )
    if not penalties:
        raise ValueError(
            "kerasreg.sweep: invalid `penalties`: the list is empty; give at "
            "least one item (None for no penalty)."
        )
    return [parse_item(item, role, index) for index, item in enumerate(penalties)]


def parse_item(item: Any, role: str, index: int) -> GridPoint:
    where = f"`penalties[{index}]`"
    parts = list(item) if isinstance(item, (list, tuple)) else [item]
    if not parts:
        raise ValueError(
            f"kerasreg.sweep: invalid {where}: an empty list. Expected {ACCEPTED}; "
            "write None for no penalty."
        )
    penalties: dict[str, Any] = {}
    transforms: list[PostStepTransform] = []
    cleared: set[str] = set()  # roles given as None in a list

    def add(key: str, value: Any) -> None:
        if key not in ROLES:
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: unknown role {key!r}; expected "
                f"one of {sorted(ROLES)}. Received: {item!r}."
            )
        try:
            penalty = get(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"kerasreg.sweep: invalid {where}: {error}") from None
        if penalty is None:
            cleared.add(key)
            return
        if key in penalties:
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: two penalties for role {key!r} "
                f"({penalties[key]!r} and {penalty!r}); a weight takes one "
                "penalty per role. For L1 and L2 together use ElasticNetPenalty, "
                "e.g. kerasreg.grid(kerasreg.ElasticNetPenalty, l1=[...], l2=[...])."
            )
        penalties[key] = penalty

    for part in parts:
        if isinstance(part, (list, tuple)):
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: a list inside a list "
                f"({part!r}). Expected {ACCEPTED}."
            )
        if isinstance(part, PostStepTransform):
            if any(part is t for t in transforms):
                raise ValueError(
                    f"kerasreg.sweep: invalid {where}: the same transform "
                    f"{type(part).__name__} instance is listed twice."
                )
            fresh_transform(part, where)  # can it be copied for each fit?
            transforms.append(part)
        elif inspect.isclass(part) and issubclass(part, PostStepTransform):
            raise TypeError(
                f"kerasreg.sweep: invalid {where}: the class {part.__name__}, not "
                f"an instance; give e.g. {part.__name__}({0.001}) (or "
                f"kerasreg.grid({part.__name__}, [...]) for several)."
            )
        elif isinstance(part, keras.callbacks.Callback):
            raise TypeError(
                f"kerasreg.sweep: invalid {where}: {type(part).__name__} is a "
                "callback, not a regularization knob: pass it in `callbacks=` "
                "(each variant gets its own copy)."
            )
        elif isinstance(part, dict):
            for key, value in part.items():
                add(key, value)
        else:
            add(role, part)
    # None in a list means "no penalty on that role" unless a part gives one.
    for key in cleared:
        penalties.setdefault(key, None)
    penalties = {r: penalties[r] for r in ROLES if r in penalties}
    point = _describe(penalties, tuple(transforms), role)
    if transforms and not penalties:
        # A grid point's penalties are those it lists: transforms alone mean
        # no penalty on `role`, as `[None, transform]` (named by the transform).
        point = dataclasses.replace(point, penalties={role: None})
    return point


# --- family, values, name -------------------------------------------------------


def _describe(
    penalties: dict[str, Any], transforms: tuple[PostStepTransform, ...], role: str
) -> GridPoint:
    labels, names, values = [], [], {}
    for key, penalty in penalties.items():
        label = "none" if penalty is None else penalty_label(penalty)
        if key != role:
            label = f"{key}-{label}"
        numbers = {} if penalty is None else penalty_numbers(penalty)
        labels.append(label)
        names.append(_name(label, numbers))
        values.update({f"{label}.{k}": v for k, v in numbers.items()})
    for transform in transforms:
        label = transform_label(transform)
        numbers = transform_numbers(transform)
        labels.append(label)
        names.append(_name(label, numbers))
        values.update({f"{label}.{k}": v for k, v in numbers.items()})
    if not labels:
        labels, names = ["none"], ["none"]
    return GridPoint(
        penalties=penalties,
        transforms=transforms,
        family="+".join(labels),
        values=values,
        name="+".join(names),
    )


def _name(label: str, numbers: dict[str, float]) -> str:
    if not numbers:
        return label
    if len(numbers) == 1:
        return f"{label}_{next(iter(numbers.values())):g}"
    return "_".join([label] + [f"{k}={v:g}" for k, v in numbers.items()])


def penalty_label(penalty: Any) -> str:
    if inspect.isfunction(penalty):
        return penalty.__name__
    return type(penalty).__name__


def penalty_numbers(penalty: Any) -> dict[str, float]:
    """The numeric arguments of a penalty's config (`{}` when it has none)."""
    try:
        config = penalty.get_config() if hasattr(penalty, "get_config") else {}
    except Exception:  # a plain callable or a regularizer without a config
        config = {}
    numbers = {}
    for key, value in (config or {}).items():
        number = as_real_scalar(value)
        if number is not None and not isinstance(value, bool):
            numbers[key] = number
    return numbers


def transform_label(transform: PostStepTransform) -> str:
    """The knob's kind: its class, or its own `name` when one was given."""
    if transform.name != transform.DEFAULT_NAME:
        return transform.name
    label = type(transform).__name__
    toward = getattr(transform, "toward", None)
    if isinstance(toward, str):
        label += f"_toward_{toward}"
    elif toward is not None:
        label += "_toward_reference"
    if transform.frequency == "epoch":
        label += "_per_epoch"
    if transform.lr_scaled:
        label += "_lr_scaled"
    if transform.schedule is not None:
        label += "_scheduled"
    return label


def transform_numbers(transform: PostStepTransform) -> dict[str, float]:
    if transform.schedule is not None:
        return {}
    return {transform.STRENGTH: float(getattr(transform, transform.STRENGTH))}


def fresh_transform(
    transform: PostStepTransform, where: str = "`callbacks`"
) -> PostStepTransform:
    """A new instance with the same constructor arguments (no state of any fit).

    Each argument is read back from the attribute of the same name; a
    subclass whose constructor takes an argument it does not keep cannot be
    copied, and is refused.
    """
    cls = type(transform)
    kwargs = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if not hasattr(transform, name):
            raise ValueError(
                f"kerasreg.sweep: invalid {where}: {cls.__name__} cannot be "
                f"copied for each fit: its argument `{name}` is not kept as an "
                f"attribute `{name}` (a transform is never shared by two fits)."
            )
        kwargs[name] = getattr(transform, name)
    return cls(**kwargs)
