"""Damping strategies: how the Levenberg-Marquardt damping reacts to a trial step.

A strategy is a small immutable object with explicit state (:class:`DampingState`), in the
``init`` / ``update`` style of optax: the LM loop asks it for the first damping value, whether a
trial step is accepted, and the next state. Nothing here touches tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import ClassVar

#: The least damping after an accepted step: MATLAB's ``trainlm`` and ``trainbr`` floor ``mu``
#: there (``if (mu < 1e-20), mu = 1e-20; end``), and so do :func:`marquardt.fit` and
#: :class:`marquardt.LevenbergMarquardt`. Without it a long run of accepted steps drives the
#: damping towards underflow (``x 0.1`` a step: 0.0 after about 320 from 1e-3), from which
#: ``x damping_inc`` per rejection takes hundreds of trials to climb back, and 0 never does.
DAMPING_FLOOR = 1e-20


@dataclass(frozen=True)
class DampingState:
    """The damping value and the growth factor of Nielsen's rule.

    Attributes
    ----------
    damping : float
        Current damping (``mu`` in MATLAB, ``lambda`` in Marquardt's paper).
    nu : float
        Nielsen's multiplier for the next rejection (unused by :class:`MarquardtDamping`).

    Examples
    --------
    >>> rule = MarquardtDamping()
    >>> state = rule.init(1.0)
    >>> state.damping, rule.update(state, accepted=False, gain_ratio=0.0).damping
    (0.001, 0.01)
    """

    damping: float
    nu: float = 2.0


@dataclass(frozen=True)
class MarquardtDamping:
    """Marquardt's rule, as MATLAB ``trainlm`` applies it.

    A step is accepted when it lowers the cost. Damping is multiplied by ``decrease`` after an
    accepted step and by ``increase`` after a rejected one; the run cannot go on once damping
    exceeds ``maximum``.

    Parameters
    ----------
    initial, decrease, increase, maximum : float
        MATLAB's ``mu``, ``mu_dec``, ``mu_inc`` and ``mu_max``.

    Examples
    --------
    >>> rule = MarquardtDamping()
    >>> state = rule.init(reference=1.0)
    >>> rule.update(state, accepted=False, gain_ratio=-1.0).damping
    0.01
    """

    initial: float = 1e-3
    decrease: float = 0.1
    increase: float = 10.0
    maximum: float = 1e10
    #: Decisions rest on the actual reduction alone (see ``lm_step``'s ``predict``).
    uses_gain_ratio: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_positive("damping", self.initial)
        _check_positive("damping_max", self.maximum)
        _as_floats(self, damping_dec="decrease", damping_inc="increase")
        if not 0.0 < self.decrease < 1.0:
            raise ValueError(f"Invalid damping_dec value: {self.decrease!r}; expected 0 < damping_dec < 1.")
        if not self.increase > 1.0:
            raise ValueError(f"Invalid damping_inc value: {self.increase!r}; expected damping_inc > 1.")

    def init(self, reference: float) -> DampingState:
        """First state. ``reference`` (the largest scaled curvature) is ignored: MATLAB's value is absolute."""
        return DampingState(self.initial)

    def accepts(self, actual_reduction: float, gain_ratio: float) -> bool:
        """A step is kept when it lowers the cost."""
        return actual_reduction > 0.0

    def update(self, state: DampingState, *, accepted: bool, gain_ratio: float) -> DampingState:
        """Next state after an accepted or rejected trial."""
        factor = self.decrease if accepted else self.increase
        # Not dataclasses.replace: this runs at every trial, and replace costs several microseconds.
        return DampingState(state.damping * factor, state.nu)

    def exhausted(self, state: DampingState) -> bool:
        """True once damping has grown past ``maximum``, or is not a positive number (0 from an
        underflow, NaN, negative: ``x increase`` would leave it there, and the trials never end).

        Examples
        --------
        >>> rule = MarquardtDamping()
        >>> [rule.exhausted(DampingState(d)) for d in (1e-3, 1e11, 0.0, math.nan, -1.0)]
        [False, True, True, True, True]
        """
        return not 0.0 < state.damping <= self.maximum


@dataclass(frozen=True)
class NielsenDamping:
    """Nielsen's gain-ratio rule (Madsen, Nielsen & Tingleff, 2004, Sec. 3.1).

    With gain ratio ``rho = actual / predicted`` reduction, an accepted step (``rho > 0``) sets
    ``damping *= max(1/3, 1 - (2 rho - 1)**3)`` and ``nu = 2``; a rejected one sets
    ``damping *= nu`` and ``nu *= 2``. The first damping is ``tau`` times the largest diagonal
    entry of the scaled ``J^T J``.

    Examples
    --------
    >>> rule = NielsenDamping()
    >>> state = rule.init(reference=10.0)
    >>> state.damping
    0.01
    >>> round(rule.update(state, accepted=True, gain_ratio=1.0).damping, 6)  # a perfect step
    0.003333
    """

    tau: float = 1e-3
    maximum: float = 1e16
    uses_gain_ratio: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_positive("tau", self.tau)
        _check_positive("damping_max", self.maximum)
        _as_floats(self)

    def init(self, reference: float) -> DampingState:
        """First state: ``tau * reference`` (``reference`` is the largest scaled curvature)."""
        reference = reference if math.isfinite(reference) and reference > 0 else 1.0
        return DampingState(self.tau * reference, 2.0)

    def accepts(self, actual_reduction: float, gain_ratio: float) -> bool:
        """A step is kept when the cost drops and the gain ratio is positive."""
        return actual_reduction > 0.0 and gain_ratio > 0.0

    def update(self, state: DampingState, *, accepted: bool, gain_ratio: float) -> DampingState:
        """Next state after an accepted or rejected trial."""
        if accepted:
            factor = max(1.0 / 3.0, 1.0 - (2.0 * min(gain_ratio, 1.0) - 1.0) ** 3)
            return DampingState(state.damping * factor, 2.0)
        return DampingState(state.damping * state.nu, state.nu * 2.0)

    def exhausted(self, state: DampingState) -> bool:
        """True once damping has grown past ``maximum``, or the damping or ``nu`` is not a
        positive number (``x nu`` would leave a damping of 0 or NaN there, and the trials never
        end), or ``nu`` is infinite.

        Examples
        --------
        >>> rule = NielsenDamping()
        >>> [rule.exhausted(DampingState(1e-3, nu)) for nu in (2.0, 0.0, math.nan, math.inf)]
        [False, True, True, True]
        """
        return not (0.0 < state.damping <= self.maximum and 0.0 < state.nu < math.inf)


DampingRule = MarquardtDamping | NielsenDamping

_RULES = {"marquardt": MarquardtDamping, "nielsen": NielsenDamping}


def make_damping(damping: str | DampingRule) -> DampingRule:
    """Return the damping rule named by ``damping`` (``"nielsen"`` or ``"marquardt"``).

    Examples
    --------
    >>> make_damping("marquardt")
    MarquardtDamping(initial=0.001, decrease=0.1, increase=10.0, maximum=10000000000.0)
    """
    if isinstance(damping, (MarquardtDamping, NielsenDamping)):
        return damping
    if isinstance(damping, str) and damping.lower() in _RULES:
        return _RULES[damping.lower()]()
    raise ValueError(
        f"Invalid damping: {damping!r}; expected one of {sorted(_RULES)} "
        "or a MarquardtDamping/NielsenDamping instance."
    )


def _check_positive(name: str, value: float) -> None:
    if not (is_real_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number > 0.")


def is_real_number(value: object) -> bool:
    """A real number (numpy scalars included; numpy's bool is not one), not a bool: the test every
    numeric option of the package takes.

    Examples
    --------
    >>> import numpy as np
    >>> [is_real_number(v) for v in (0.5, np.float32(2), 3, True, np.True_, "1")]
    [True, True, True, False, False, False]
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_floats(rule: object, **fields: str) -> None:
    """Check that each field is a real number (named by its option in the error) and store it
    as a Python float, so that a numpy scalar option behaves, and serializes, as a float."""
    for option, name in fields.items():
        value = getattr(rule, name)
        if not is_real_number(value):
            raise ValueError(f"Invalid {option} value: {value!r}; expected a real number.")
    for name in {f.name for f in dataclass_fields(rule)}:
        value = getattr(rule, name)
        if is_real_number(value):
            object.__setattr__(rule, name, float(value))
