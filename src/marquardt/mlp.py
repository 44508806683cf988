"""Multilayer perceptrons shaped like MATLAB's ``fitnet``.

:class:`MLP` is a stack of ``nn.Linear`` layers with an elementwise activation between
them and a linear output layer, wrapped in ``mapminmax``-style input and target
normalisation. :func:`mlp` builds one. Weights start from MATLAB's ``initnw``
(Nguyen-Widrow) rule by default.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["MLP", "mlp", "nguyen_widrow_"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "linear": nn.Identity,
}
# MATLAB transfer-function names accepted as spellings of the canonical names above.
_ALIASES: dict[str, str] = {
    "tansig": "tanh",
    "logsig": "sigmoid",
    "poslin": "relu",
    "purelin": "linear",
    "identity": "linear",
}
# initnw uses Nguyen-Widrow only where the transfer function has a finite active input
# range (MATLAB's activeInputRange, where it is not saturated: tansig, logsig); other
# layers, the linear output layer included, get rands.
_ACTIVE_INPUT_RANGES: dict[str, tuple[float, float]] = {"tanh": (-2.0, 2.0), "sigmoid": (-4.0, 4.0)}
# Output range of each hidden activation: the input range of the next layer.
_OUTPUT_RANGES: dict[str, tuple[float, float]] = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}
_INITS = ("nguyen-widrow", "default")
_CONFIG_KEYS = ("n_inputs", "hidden", "n_outputs", "activation", "normalize", "init")


# --------------------------------------------------------------------------- validation


def _is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy, such as ``labels.max() + 1``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_count(name: str, value: Any) -> int:
    """Return ``value`` as a Python int if it is a positive integer, else raise naming ``name``."""
    if not _is_integer(value):
        raise TypeError(f"{name} must be a positive int, received {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, received {value!r}")
    # A Python int keeps config() JSON-able and the layer sizes plain.
    return int(value)


def _check_hidden(hidden: Any) -> tuple[int, ...]:
    """Return hidden layer sizes as a tuple of Python ints; an integer means one hidden layer."""
    if _is_integer(hidden):
        hidden = (hidden,)
    if isinstance(hidden, np.ndarray) and hidden.ndim == 1:
        hidden = hidden.tolist()
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(
            f"hidden must be an int or a sequence of positive ints, received {hidden!r} "
            f"({type(hidden).__name__})"
        )
    for size in hidden:
        if not _is_integer(size) or size <= 0:
            raise ValueError(
                f"hidden must contain only positive ints (layer sizes), received {tuple(hidden)!r}"
            )
    return tuple(int(size) for size in hidden)


def _check_activation(activation: Any) -> str:
    """Return the canonical activation name for ``activation``."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, received {activation!r} ({type(activation).__name__})")
    name = _ALIASES.get(activation.lower(), activation.lower())
    if name not in _ACTIVATIONS:
        known = sorted(set(_ACTIVATIONS) | set(_ALIASES))
        raise ValueError(f"activation must be one of {known}, received {activation!r}")
    return name


def _check_init(init: Any) -> str:
    """Return ``init`` if it names a known initialisation."""
    if init not in _INITS:
        raise ValueError(f"init must be one of {list(_INITS)}, received {init!r}")
    return init


def _check_dtype(dtype: Any) -> torch.dtype:
    """Return a real floating dtype, the default one for ``None``."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, received {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a real floating dtype such as torch.float64, received {dtype}")
    return dtype


def _check_generator(generator: Any) -> torch.Generator | None:
    """Return ``generator`` if it is a ``torch.Generator`` or ``None``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, received {generator!r}")
    return generator


# ------------------------------------------------------------------- initialisation


def _rands(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Uniform draws on [-1, 1] in float64, as MATLAB's ``rands``.

    Drawing in float64 on the generator's device makes the weights independent of the
    model's dtype and device (up to the final rounding) for a given seed.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device) * 2 - 1


def nguyen_widrow_(
    linear: nn.Linear,
    generator: torch.Generator | None = None,
    *,
    activation: str = "tanh",
    input_range: tuple[float, float] = (-1.0, 1.0),
) -> None:
    """Initialise ``linear`` in place with the Nguyen-Widrow rule of MATLAB's ``initnw``.

    Parameters
    ----------
    linear : nn.Linear
        Layer with ``S = out_features`` neurons and ``R = in_features`` inputs; it must
        have a bias.
    generator : torch.Generator, optional
        Source of randomness; the global torch generator when omitted.
    activation : {"tanh", "sigmoid"}, default "tanh"
        The layer's transfer function, whose active input range the net inputs are
        stretched to: [-2, 2] for tanh (``tansig``), [-4, 4] for sigmoid (``logsig``).
    input_range : (float, float), default (-1, 1)
        Range of every input of the layer: [-1, 1] after ``mapminmax`` or a tanh layer,
        [0, 1] after a sigmoid layer.

    Notes
    -----
    ``initnw`` first assumes inputs and net inputs in [-1, 1]: with
    :math:`\\beta = 0.7\\, S^{1/R}` each weight row is a uniform draw on [-1, 1]^R
    rescaled to norm :math:`\\beta`, and the biases are
    :math:`b_i = \\beta\\, \\mathrm{linspace}(-1, 1, S)_i\\, \\mathrm{sign}(w_{i1})`
    (zero for a single neuron). It then converts net inputs of [-1, 1] to the active
    range :math:`[n_{min}, n_{max}]`,

    .. math:: W \\leftarrow c W, \\quad b \\leftarrow c b + d, \\quad
              c = (n_{max} - n_{min}) / 2, \\quad d = (n_{max} + n_{min}) / 2,

    so :math:`c = 2` for tanh and :math:`c = 4` for sigmoid (:math:`d = 0`), and inputs
    of :math:`[p_{min}, p_{max}]` to [-1, 1]: with :math:`g = 2 / (p_{max} - p_{min})`
    and :math:`o = 1 - p_{max} g`, :math:`b \\leftarrow W o \\mathbf{1} + b` and
    :math:`W \\leftarrow g W` (no change for [-1, 1]).

    Examples
    --------
    >>> layer = nn.Linear(2, 5, dtype=torch.float64)
    >>> nguyen_widrow_(layer, torch.Generator().manual_seed(0))
    >>> beta = 0.7 * 5 ** (1 / 2)
    >>> bool(torch.allclose(layer.weight.norm(dim=1), torch.full((5,), 2 * beta, dtype=torch.float64)))
    True
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, received {type(linear).__name__}")
    if linear.bias is None:
        raise ValueError("linear must have a bias for Nguyen-Widrow initialisation, received bias=None")
    generator = _check_generator(generator)
    name = _check_activation(activation)
    if name not in _ACTIVE_INPUT_RANGES:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVE_INPUT_RANGES)} (a finite active input range), "
            f"received {activation!r}"
        )
    low, high = _check_input_range(input_range)
    weight, bias = _nguyen_widrow_unit(linear.out_features, linear.in_features, generator)
    n_min, n_max = _ACTIVE_INPUT_RANGES[name]
    weight, bias = weight * (n_max - n_min) / 2, bias * (n_max - n_min) / 2 + (n_max + n_min) / 2
    gain = 2.0 / (high - low)
    bias = bias + weight.sum(dim=1) * (1.0 - high * gain)
    weight = weight * gain
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


def _check_input_range(input_range: Any) -> tuple[float, float]:
    """Return ``input_range`` as finite floats ``(low, high)`` with ``high > low``."""
    pair = tuple(input_range) if isinstance(input_range, Iterable) and not isinstance(input_range, str) else ()
    if not (len(pair) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
            and math.isfinite(pair[0]) and math.isfinite(pair[1]) and pair[1] > pair[0]):
        raise ValueError(f"input_range must be finite (low, high) with high > low, received {input_range!r}")
    return float(pair[0]), float(pair[1])


def _nguyen_widrow_unit(n_neurons: int, n_in: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Nguyen-Widrow weights and biases for inputs and net inputs in [-1, 1] (float64)."""
    beta = 0.7 * n_neurons ** (1.0 / n_in)
    directions = _rands((n_neurons, n_in), generator)
    weight = beta * directions / directions.norm(dim=1, keepdim=True)
    if n_neurons == 1:
        bias = torch.zeros(1, dtype=torch.float64, device=weight.device)
    else:
        spread = torch.linspace(-beta, beta, n_neurons, dtype=torch.float64, device=weight.device)
        bias = spread * torch.sign(weight[:, 0])
    return weight, bias


def _rands_(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """Initialise ``linear`` with uniform [-1, 1] weights and biases (MATLAB ``rands``)."""
    with torch.no_grad():
        linear.weight.copy_(_rands(tuple(linear.weight.shape), generator))
        if linear.bias is not None:
            linear.bias.copy_(_rands(tuple(linear.bias.shape), generator))


def _default_(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator`` if given."""
    if generator is None:
        linear.reset_parameters()
        return
    # reset_parameters is uniform on +-1/sqrt(fan_in) for both weight and bias.
    bound = 1.0 / math.sqrt(linear.in_features)
    _rands_(linear, generator)
    with torch.no_grad():
        linear.weight.mul_(bound)
        if linear.bias is not None:
            linear.bias.mul_(bound)


# --------------------------------------------------------------------------- mapminmax


def _unmapped(span: Tensor) -> Tensor:
    """Rows ``mapminmax`` leaves as they are: a gain ``2 / span`` above ``1e14`` (a span under
    ``2e-14``, rounding noise rather than data), where MATLAB sets the gain to 1 and the offset
    to ``ymin``, so that ``y = x``. Exact constants (``span == 0``) are not among them."""
    return (span > 0) & (2 / span > 1e14)


def _to_unit_range(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``mapminmax`` to [-1, 1]; rows with ``low == high`` map to 0 (``removeconstantrows``), rows
    of a span under ``2e-14`` pass unchanged (:func:`_unmapped`).

    ``(v - low) / span * 2 - 1`` rather than a stored gain makes ``low -> -1`` and
    ``high -> 1`` exact in floating point.
    """
    span = high - low
    constant = span == 0
    # A 1 in place of a zero span keeps NaNs out of the discarded branch (and its gradient).
    safe_span = torch.where(constant, torch.ones_like(span), span)
    # Dividing before doubling: 2 * (v - low) overflows for spans past half the dtype's range
    # (float16 inputs over 32,752 wide mapped their maximum to inf). Doubling is exact, so the
    # result is bit for bit that of 2 * (v - low) / span wherever that one is finite.
    mapped = (values - low) / safe_span * 2 - 1
    mapped = torch.where(_unmapped(span), values, mapped)
    return torch.where(constant, torch.zeros_like(mapped), mapped)


def _from_unit_range(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Inverse of :func:`_to_unit_range`; constant rows come back as their constant."""
    span = high - low
    raw = (values + 1) * (span / 2) + low
    raw = torch.where(_unmapped(span), values, raw)
    return torch.where(span == 0, low.expand_as(raw), raw)


def _check_span(name: str, data: Tensor) -> None:
    """Refuse a column whose range ``max - min`` overflows the dtype: it would map to NaN."""
    span = data.amax(dim=0) - data.amin(dim=0)
    wide = torch.nonzero(~torch.isfinite(span))
    if wide.numel():
        column = int(wide[0, 0])
        low, high = float(data[:, column].min()), float(data[:, column].max())
        raise ValueError(
            f"Invalid {name} value: column {column} spans [{low:g}, {high:g}], a range that overflows "
            f"{data.dtype}; rescale that column or build the model with a wider dtype"
        )


# ------------------------------------------------------------------------------- model


class MLP(nn.Module):
    """Multilayer perceptron with ``mapminmax`` normalisation, as MATLAB's ``fitnet``.

    Parameters
    ----------
    n_inputs : int
        Number of input features.
    hidden : int or sequence of int, default (10,)
        Sizes of the hidden layers; ``()`` gives a linear model.
    n_outputs : int, default 1
        Number of outputs.
    activation : {"tanh", "sigmoid", "relu", "linear"}, default "tanh"
        Hidden-layer activation. MATLAB names ``"tansig"``, ``"logsig"``, ``"poslin"``
        and ``"purelin"`` are accepted as spellings. The output layer is linear.
    normalize : bool, default True
        Map inputs and targets to [-1, 1] with statistics from
        :meth:`set_normalization`. Until those are set the maps are identities.
    init : {"nguyen-widrow", "default"}, default "nguyen-widrow"
        ``"nguyen-widrow"`` follows MATLAB's ``initnw``: Nguyen-Widrow for tanh and
        sigmoid layers, uniform [-1, 1] (``rands``) for the others, the output layer
        included. ``"default"`` keeps PyTorch's ``nn.Linear`` initialisation.
    dtype : torch.dtype, optional
        Floating dtype of parameters and buffers; the default dtype when omitted.
    device : torch.device or str, optional
        Device of parameters and buffers.
    generator : torch.Generator, optional
        Source of randomness for the initial weights; the global generator (seeded by
        ``torch.manual_seed``) when omitted.

    Attributes
    ----------
    net : nn.Sequential
        The layers: ``nn.Linear`` and activation modules, alternating, ending with an
        ``nn.Linear``. It maps normalised inputs to normalised outputs.
    x_min, x_max, y_min, y_max : Tensor
        Buffers with the per-feature ranges of the training inputs and targets.
    stats_set : Tensor
        Boolean buffer, True once :meth:`set_normalization` has run.

    Notes
    -----
    With training ranges :math:`[x_{min}, x_{max}]` per feature, an input is mapped as

    .. math:: \\tilde x = 2 (x - x_{min}) / (x_{max} - x_{min}) - 1,

    and a feature with :math:`x_{max} = x_{min}` maps to 0, so the network ignores it
    (MATLAB's ``removeconstantrows``). Outputs are mapped back with the inverse on the
    target ranges; a constant target comes back as its constant. Unlike ``removeconstantrows``
    the network keeps an output unit for it: ``fit`` trains that unit towards 0 (its errors
    count in the recorded gradient and in ``trainbr``'s number of errors ``N``), and the
    reported performance, in original units, is that of the constant, 0.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = MLP(2, hidden=(5,), n_outputs=1, dtype=torch.float64)
    >>> X = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> _ = model.set_normalization(X, y)
    >>> model.normalize_inputs(X)
    tensor([[-1., -1.],
            [ 0.,  0.],
            [ 1.,  1.]], dtype=torch.float64)
    >>> model(X).shape
    torch.Size([3, 1])
    """

    def __init__(
        self,
        n_inputs: int,
        hidden: int | Sequence[int] = (10,),
        n_outputs: int = 1,
        *,
        activation: str = "tanh",
        normalize: bool = True,
        init: str = "nguyen-widrow",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_inputs = _check_count("n_inputs", n_inputs)
        self.hidden = _check_hidden(hidden)
        self.n_outputs = _check_count("n_outputs", n_outputs)
        self.activation = _check_activation(activation)
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be a bool, received {normalize!r}")
        self.normalize = bool(normalize)
        self.init = _check_init(init)
        dtype = _check_dtype(dtype)
        generator = _check_generator(generator)
        self.net = self._build_layers(dtype, device)
        self._initialise(generator)
        self._register_stats(dtype, device)

    # -- construction ------------------------------------------------------------------

    def _build_layers(self, dtype: torch.dtype, device: Any) -> nn.Sequential:
        sizes = (self.n_inputs, *self.hidden, self.n_outputs)
        device = torch.get_default_device() if device is None else device  # skip_init needs one
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # skip_init leaves the weights unset (and the RNG untouched) for _initialise,
            # so a seed gives the same weights whatever the dtype.
            layers.append(nn.utils.skip_init(nn.Linear, fan_in, fan_out, dtype=dtype, device=device))
            layers.append(_ACTIVATIONS[self.activation]())
        return nn.Sequential(*layers[:-1])  # the output layer is linear

    def _initialise(self, generator: torch.Generator | None) -> None:
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        if linears and linears[0].weight.is_meta:
            # Meta tensors hold no values: drawing them on the CPU first took 8.7 s and 2.6 GB
            # for MLP(5000, (20000,), 1, device="meta"), and moved the random state.
            return
        for index, linear in enumerate(linears):
            is_hidden = index < len(linears) - 1
            if self.init == "default":
                _default_(linear, generator)
            elif is_hidden and self.activation in _ACTIVE_INPUT_RANGES:
                # The first layer sees mapminmax's [-1, 1]; later ones the previous layer's outputs.
                input_range = (-1.0, 1.0) if index == 0 else _OUTPUT_RANGES[self.activation]
                nguyen_widrow_(linear, generator, activation=self.activation, input_range=input_range)
            else:
                _rands_(linear, generator)

    def _register_stats(self, dtype: torch.dtype, device: Any) -> None:
        # Identity-like ranges until set_normalization; stats_set selects the identity.
        for name, size in (("x", self.n_inputs), ("y", self.n_outputs)):
            self.register_buffer(f"{name}_min", -torch.ones(size, dtype=dtype, device=device))
            self.register_buffer(f"{name}_max", torch.ones(size, dtype=dtype, device=device))
        self.register_buffer("stats_set", torch.zeros((), dtype=torch.bool, device=device))

    # -- configuration -----------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Return the architecture as a JSON-able dict (no weights).

        Examples
        --------
        >>> MLP(3, hidden=(4, 2), n_outputs=2).config()["hidden"]
        [4, 2]
        """
        return {
            "n_inputs": self.n_inputs,
            "hidden": list(self.hidden),
            "n_outputs": self.n_outputs,
            "activation": self.activation,
            "normalize": self.normalize,
            "init": self.init,
        }

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> MLP:
        """Build a freshly initialised model from a :meth:`config` dict.

        Examples
        --------
        >>> model = MLP(3, hidden=(4,))
        >>> MLP.from_config(model.config()).config() == model.config()
        True
        """
        if not isinstance(cfg, Mapping):
            raise TypeError(f"cfg must be a mapping from MLP.config(), received {type(cfg).__name__}")
        missing = [key for key in _CONFIG_KEYS if key not in cfg]
        unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
        if missing or unknown:
            raise ValueError(
                f"cfg must have exactly the keys {list(_CONFIG_KEYS)}, "
                f"received missing={missing}, unknown={unknown}"
            )
        hidden = cfg["hidden"]
        return cls(
            cfg["n_inputs"],
            tuple(hidden) if isinstance(hidden, list) else hidden,
            cfg["n_outputs"],
            activation=cfg["activation"],
            normalize=cfg["normalize"],
            init=cfg["init"],
            dtype=dtype,
            device=device,
            generator=generator,
        )

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, init={self.init!r}"

    # -- normalisation -----------------------------------------------------------------

    @property
    def normalization_set(self) -> bool:
        """Whether :meth:`set_normalization` has stored training-data ranges."""
        return bool(self.stats_set)

    @torch.no_grad()
    def set_normalization(self, X: Tensor, y: Tensor | None) -> MLP:
        """Store per-feature ranges of training inputs ``X`` and targets ``y``.

        Parameters
        ----------
        X : Tensor, shape (N, n_inputs)
            Training inputs, raw units.
        y : Tensor, shape (N, n_outputs), or (N,) when ``n_outputs == 1``; or None
            Training targets, raw units. ``None`` leaves the outputs unmapped (ranges
            [-1, 1], an identity), as for classifiers whose outputs are logits.

        Returns
        -------
        MLP
            ``self``, for chaining.

        Raises
        ------
        ValueError
            If the model was built with ``normalize=False``, a shape is wrong, a value is NaN
            or infinite, or a column's range ``max - min`` overflows the dtype (nothing is
            stored then).
        """
        if not self.normalize:
            raise ValueError(
                "set_normalization needs a model built with normalize=True, received a model "
                "with normalize=False; build it with mlp(..., normalize=True)"
            )
        X = self._as_matrix("X", X, self.n_inputs)
        if y is None:
            # The rows -1 and 1 give ranges [-1, 1]: the target maps are identities.
            Y = torch.stack([-self.y_max.new_ones(self.n_outputs), self.y_max.new_ones(self.n_outputs)])
        else:
            Y = self._as_matrix("y", y, self.n_outputs)
        if y is not None and X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X and y must have the same number of rows, received {X.shape[0]} and {Y.shape[0]}"
            )
        _check_span("X", X)
        if y is not None:
            _check_span("y", Y)
        self.x_min.copy_(X.amin(dim=0))
        self.x_max.copy_(X.amax(dim=0))
        self.y_min.copy_(Y.amin(dim=0))
        self.y_max.copy_(Y.amax(dim=0))
        self.stats_set.fill_(True)
        return self

    def _as_matrix(self, name: str, data: Any, n_columns: int) -> Tensor:
        """Return ``data`` as a finite (N, n_columns) tensor in the model's dtype and device."""
        data = torch.as_tensor(data, dtype=self.x_min.dtype, device=self.x_min.device)
        if data.ndim == 1 and n_columns == 1:
            data = data.unsqueeze(1)
        if data.ndim != 2 or data.shape[1] != n_columns or data.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape (N, {n_columns}) with N >= 1"
                f"{' or (N,)' if n_columns == 1 else ''}, received shape {tuple(data.shape)}"
            )
        if not torch.isfinite(data).all():
            raise ValueError(f"{name} must be finite to set normalization ranges, received NaN or inf")
        return data

    def normalize_inputs(self, x: Tensor) -> Tensor:
        """Map raw inputs (..., n_inputs) to [-1, 1]; identity until ranges are set."""
        if not self.normalize:
            return x
        return torch.where(self.stats_set, _to_unit_range(x, self.x_min, self.x_max), x)

    def normalize_targets(self, y: Tensor) -> Tensor:
        """Map raw targets (..., n_outputs) or (N,) to [-1, 1]; identity until ranges are set."""
        if not self.normalize:
            return y
        return torch.where(self.stats_set, _to_unit_range(y, self.y_min, self.y_max), y)

    def denormalize_outputs(self, y_norm: Tensor) -> Tensor:
        """Map normalised outputs back to raw target units; identity until ranges are set."""
        if not self.normalize:
            return y_norm
        return torch.where(self.stats_set, _from_unit_range(y_norm, self.y_min, self.y_max), y_norm)

    # -- evaluation --------------------------------------------------------------------

    def forward_normalized(self, x_norm: Tensor) -> Tensor:
        """Evaluate the layers on normalised inputs, returning normalised outputs."""
        return self.net(x_norm)

    def _dtype_name(self) -> str:
        """The network's dtype as code, ``torch.float32``: what a converted input must have."""
        weight = next(self.parameters(), None)
        return str(weight.dtype if weight is not None else torch.get_default_dtype())

    def forward(self, x: Tensor) -> Tensor:
        """Map raw inputs (N, n_inputs) to raw outputs (N, n_outputs)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MLP inputs must be a torch.Tensor of shape (N, {self.n_inputs}); received "
                            f"{type(x).__name__}. Convert with torch.as_tensor(x, dtype={self._dtype_name()})")
        if x.shape[-1:] != (self.n_inputs,):
            raise ValueError(f"MLP with n_inputs={self.n_inputs} needs inputs of shape (N, {self.n_inputs}); "
                             f"received shape {tuple(x.shape)}")
        mapped = self.normalize_inputs(x)
        _check_input_dtype(x, mapped, self.net)
        return self.denormalize_outputs(self.forward_normalized(mapped))


def _check_input_dtype(x: Tensor, mapped: Tensor, net: nn.Sequential) -> None:
    """A TypeError naming the conversion where the layers cannot take the (normalized) inputs:
    numpy's float64 given to a float32 network (``torch.as_tensor(X)``) reached ``nn.Linear``
    and failed there with torch's 'mat1 and mat2 must have the same dtype'. Inputs the
    normalization promotes to the network's dtype (integers, float16) pass as before."""
    weight = next(net.parameters(), None)
    if weight is None or mapped.dtype == weight.dtype:
        return
    other = f", or build the network with mlp(..., dtype={x.dtype})" if x.is_floating_point() else ""
    raise TypeError(f"MLP inputs must have the network's dtype {weight.dtype}; received a tensor of dtype "
                    f"{x.dtype}. Convert with x.to({weight.dtype}){other}")


def mlp(
    n_inputs: int,
    hidden: int | Sequence[int] = (10,),
    n_outputs: int = 1,
    *,
    activation: str = "tanh",
    normalize: bool = True,
    init: str = "nguyen-widrow",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MLP:
    """Build a fitting network, the counterpart of MATLAB's ``fitnet(hidden)``.

    Parameters
    ----------
    n_inputs : int
        Number of input features.
    hidden : int or sequence of int, default (10,)
        Hidden layer sizes (``fitnet``'s default is one layer of 10 tanh neurons).
    n_outputs : int, default 1
        Number of outputs.
    activation, normalize, init, dtype, device, generator
        See :class:`MLP`.

    Returns
    -------
    MLP
        An untrained model; call :meth:`MLP.set_normalization` with training data.

    Examples
    --------
    >>> model = mlp(3, hidden=(8, 4), n_outputs=2, dtype=torch.float64)
    >>> [type(layer).__name__ for layer in model.net]
    ['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear']
    >>> model(torch.zeros(5, 3, dtype=torch.float64)).shape
    torch.Size([5, 2])
    """
    return MLP(
        n_inputs,
        hidden,
        n_outputs,
        activation=activation,
        normalize=normalize,
        init=init,
        dtype=dtype,
        device=device,
        generator=generator,
    )
