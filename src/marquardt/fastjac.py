"""Closed-form Jacobians and Jacobian products of layered networks: pure tensor code.

A stack of affine layers and elementwise activations (``nn.Sequential`` of ``nn.Linear``,
``nn.Tanh``, ``nn.Sigmoid``, ``nn.ReLU``, ... and :class:`marquardt.MLP`) has per-sample
Jacobian rows in closed form. With ``a_0 = x``, ``z_l = a_{l-1} W_l^T + b_l`` and
``a_l = s_l(z_l)``, backpropagation of each output ``k`` gives ``delta_l = d out_k / d z_l``,
and the rows are outer products::

    d out_k / d W_l = delta_l a_{l-1}^T,    d out_k / d b_l = delta_l,
    delta_{l-1} = (delta_l W_l) * s'_{l-1}(z_{l-1}).

Every sample and output is handled by one batched product per layer (no loop over samples),
written straight into the Jacobian's columns. The same stored activations give the products
``J v`` (forward tangents) and ``J^T u`` (backpropagation) and ``diag(J^T J)`` that the
matrix-free solver (:mod:`marquardt.matfree`) needs, without forming ``J``.

A forward pass keeps what the derivatives need and forms the slopes ``s'(z)`` only when a
derivative is asked for, so a trial point whose step is rejected costs one forward pass. On
the CPU, ``tanh`` is numpy's (SIMD, about three times ``torch.tanh``'s speed in float64),
written over the affine output it replaces.

:func:`describe` is the only function that looks at an ``nn.Module``: it turns a supported
module into a :class:`LayeredNetwork` of parameter names and activation functions, or returns
``None`` so that the caller falls back to :mod:`torch.func` (:class:`FunctionalJacobian`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, jacrev, vmap

__all__ = [
    "Activation",
    "BufferedNetwork",
    "Dense",
    "FunctionalJacobian",
    "LayeredJacobian",
    "LayeredNetwork",
    "LinearizedNetwork",
    "describe",
    "jacobian_backend",
]


# ---------------------------------------------------------------------------------------------
# activations: value and derivative, the derivative from the output where that is cheaper


@dataclass(frozen=True)
class Activation:
    """An elementwise function with its derivative ``derivative(z, a)`` (``a = function(z)``).

    ``from_output``: the derivative reads ``a`` only (it is called with ``z = None``), so ``z``
    need not be kept and ``function_`` may overwrite it. ``function_``, when given, computes
    ``function(z)`` in place in ``z`` where it can (and returns the result either way).
    """

    name: str
    function: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor | None, Tensor], Tensor]
    from_output: bool = False
    function_: Callable[[Tensor], Tensor] | None = None


def _numpy_view(t: Tensor) -> np.ndarray | None:
    """``t`` as a numpy array sharing its memory (CPU float32/float64, contiguous, no autograd), else None."""
    if (t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.requires_grad
            or not t.is_contiguous() or type(t) is not Tensor):
        return None
    return t.numpy()


def _tanh(z: Tensor) -> Tensor:
    """``tanh(z)``; numpy's where it applies: its SIMD tanh took 49 us on a (1000, 20) float64
    array against 150 us for ``torch.tanh`` on one thread (7.6 and 77 us in float32)."""
    view = _numpy_view(z)
    if view is None:
        return torch.tanh(z)
    out = torch.empty_like(z)
    np.tanh(view, out=out.numpy())
    return out


def _tanh_(z: Tensor, view: np.ndarray | None = None) -> Tensor:
    """``tanh(z)`` written over ``z`` where numpy applies (see :func:`_tanh`), else a new tensor.

    ``view``: ``z``'s numpy view, from a caller that holds it (saves the 1.6 us of the checks).
    """
    view = _numpy_view(z) if view is None else view
    if view is None:
        return torch.tanh(z)
    np.tanh(view, out=view)
    return z


def _tanh_derivative(_: Tensor | None, a: Tensor, *, out: Tensor | None = None, ones: Tensor | None = None
                     ) -> Tensor:
    """``1 - a^2`` in one kernel (numpy's ``1 - a*a`` rounds differently), into ``out`` if given;
    ``ones``: a tensor of ones shaped like ``a``, from a caller that keeps one."""
    return torch.addcmul(torch.ones_like(a) if ones is None else ones, a, a, value=-1.0, out=out)


def _generic(module: nn.Module) -> Activation:
    """Derivative of an elementwise module by one forward-mode product with a tangent of ones."""
    function = _out_of_place(module)

    def derivative(z: Tensor, _: Tensor) -> Tensor:
        return torch.func.jvp(function, (z,), (torch.ones_like(z),))[1]

    return Activation(type(module).__name__, function, derivative)


def _out_of_place(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module`` as a function that leaves its input as it was.

    An ``inplace=True`` module wrote its output over ``z``, the value its derivative is taken
    at: ``nn.ELU(inplace=True)``'s slope came out as ``exp(elu(z))`` for ``z < 0``, a Jacobian
    0.7 off, and ``fit`` stalled at 100x the MSE of the same network with ``nn.ELU()``.
    """
    if not getattr(module, "inplace", False):
        return module
    return lambda z: module(z.clone())


def _leaky(slope: float) -> Activation:
    return Activation(f"leaky_relu({slope})", lambda z: torch.nn.functional.leaky_relu(z, slope),
                      lambda z, a: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope)))


def _softplus(beta: float, threshold: float) -> Activation:
    def derivative(z: Tensor, _: Tensor) -> Tensor:
        # nn.Softplus is linear above the threshold; its derivative there is exactly 1.
        return torch.where(beta * z > threshold, torch.ones_like(z), torch.sigmoid(beta * z))

    return Activation("softplus", lambda z: torch.nn.functional.softplus(z, beta, threshold), derivative)


def _silu_derivative(z: Tensor, _: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_CLOSED_FORM: dict[type, Callable[[nn.Module], Activation]] = {
    nn.Tanh: lambda m: Activation("tanh", _tanh, _tanh_derivative, True, _tanh_),
    nn.Sigmoid: lambda m: Activation("sigmoid", torch.sigmoid, lambda z, a: a * (1 - a), True),
    # relu(z) > 0 exactly where z > 0
    nn.ReLU: lambda m: Activation("relu", torch.relu, lambda z, a: (a > 0).to(a.dtype), True),
    nn.LeakyReLU: lambda m: _leaky(m.negative_slope),
    nn.Softplus: lambda m: _softplus(m.beta, m.threshold),
    nn.SiLU: lambda m: Activation("silu", torch.nn.functional.silu, _silu_derivative),
}
# Elementwise modules whose derivative comes from one forward-mode product (exact, a bit slower).
_ELEMENTWISE = (nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Hardtanh,
                nn.ReLU6, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink)


def _activation(module: nn.Module) -> Activation | None:
    """The activation of ``module``, or None; exact types only: a subclass may compute something
    else in its own ``forward`` (a GELU scaled by the sample's mean is not elementwise)."""
    if type(module) in _CLOSED_FORM:
        return _CLOSED_FORM[type(module)](module)
    if type(module) in _ELEMENTWISE:
        return _generic(module)
    return None


# ---------------------------------------------------------------------------------------------
# the network in pure form


@dataclass(frozen=True)
class Dense:
    """One affine layer ``z = a W^T + b`` (parameters named ``weight``, ``bias``) and its activations."""

    weight: str
    bias: str | None
    activations: tuple[Activation, ...] = ()


@dataclass(frozen=True)
class LayeredNetwork:
    """A stack of :class:`Dense` layers, with optional data maps around it.

    Attributes
    ----------
    layers : tuple of Dense
    input_map : callable, optional
        Applied to the inputs before the first layer; it holds no trainable parameter (leading
        activations, an :class:`~marquardt.MLP`'s input normalization).
    output_map : callable, optional
        Applied to the last layer's output: an affine map per output (an MLP's target
        denormalization), evaluated exactly as the module does.
    output_scale : Tensor, optional
        The slope of ``output_map`` per output, for the derivatives.
    """

    layers: tuple[Dense, ...]
    input_map: Callable[[Tensor], Tensor] | None = None
    output_map: Callable[[Tensor], Tensor] | None = None
    output_scale: Tensor | None = None

    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters, in layer order (weight, then bias)."""
        return [name for layer in self.layers for name in (layer.weight, layer.bias) if name is not None]


def _plain_sequential(module: nn.Module) -> bool:
    """Whether ``module`` chains its children as ``nn.Sequential`` does: that class, or a subclass
    that overrides none of the methods a call or the closed form's walk goes through (``class
    Net(nn.Sequential)`` with only an ``__init__``, a common way to name a stack)."""
    kind = type(module)
    if kind is nn.Sequential:
        return True
    return isinstance(module, nn.Sequential) and all(
        getattr(kind, name) is getattr(nn.Sequential, name)
        for name in ("forward", "__call__", "_call_impl", "__iter__", "__getitem__", "__len__"))


def _modules_of(module: nn.Module) -> list[nn.Module] | None:
    """The leaf modules of nested ``nn.Sequential`` containers, in order. A subclass with its own
    ``forward`` (or call) is a leaf, which the closed form then refuses: it may do more than chain
    its children (a residual block adding its input was read as its layers alone)."""
    if not _plain_sequential(module):
        return [module]
    leaves: list[nn.Module] = []
    for child in module:
        inner = _modules_of(child)
        if inner is None:
            return None
        leaves += inner
    return leaves


def _sequential(module: nn.Sequential, prefix: str) -> LayeredNetwork | None:
    names = {id(m): name for name, m in module.named_modules(prefix=prefix.rstrip("."))}
    leading: list[Activation] = []
    layers: list[Dense] = []
    for leaf in _modules_of(module):
        if type(leaf) is nn.Linear:
            base = names[id(leaf)] + "." if names[id(leaf)] else ""
            layers.append(Dense(base + "weight", base + "bias" if leaf.bias is not None else None))
            continue
        if type(leaf) is nn.Identity:
            continue
        activation = _activation(leaf)
        if activation is None:
            return None
        if layers:
            last = layers[-1]
            layers[-1] = Dense(last.weight, last.bias, last.activations + (activation,))
        else:
            leading.append(activation)
    if not layers:
        return None
    return LayeredNetwork(tuple(layers), _compose(leading))


def _compose(functions: Sequence[Activation]) -> Callable[[Tensor], Tensor] | None:
    if not functions:
        return None

    def apply(x: Tensor) -> Tensor:
        for f in functions:
            x = f.function(x)
        return x

    return apply


def _mlp(model: nn.Module) -> LayeredNetwork | None:
    inner = _sequential(model.net, "net.")
    if inner is None or inner.input_map is not None:
        return None
    with torch.no_grad():
        zeros = model.y_max.new_zeros(1, model.n_outputs)
        shift = model.denormalize_outputs(zeros)[0]
        scale = model.denormalize_outputs(zeros + 1)[0] - shift
    # The input map only touches data (no parameter): it stays outside the derivatives.
    return LayeredNetwork(inner.layers, model.normalize_inputs, model.denormalize_outputs, scale)


def _runs_other_code(model: nn.Module) -> bool:
    """Whether ``model(X)`` runs code the closed form does not reproduce: a forward hook or pre-hook
    on a submodule or a global one (``register_module_forward_hook``), or a ``forward`` set on an
    instance. ``fit`` trained the hookless network then: with a hook adding 0.5 to the outputs it
    recorded an MSE of 2.7e-7 for a model whose ``model(X)`` was 0.25 off."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
               for module in model.modules())


def describe(model: nn.Module, trainable: Sequence[str]) -> LayeredNetwork | None:
    """The closed-form description of ``model``, or ``None`` when it is not a supported stack.

    Supported: ``nn.Sequential`` (nested ones too) of ``nn.Linear`` and elementwise activations
    (``Tanh``, ``Sigmoid``, ``ReLU``, ``LeakyReLU``, ``Softplus``, ``SiLU``, ``Identity`` in closed
    form; ``ELU``, ``GELU``, ``SELU``, ``Mish``, ... by a forward-mode product), and
    :class:`marquardt.MLP`, each of exactly these types (a subclass, whose ``forward`` may differ,
    means the general path; an ``nn.Sequential`` subclass that only names a stack, overriding
    neither ``forward`` nor the call, is a Sequential). ``trainable`` must name exactly the
    weights and biases of the layers (a frozen layer or an extra parameter means the general
    path). A model whose call runs other
    code (:func:`_runs_other_code`: forward hooks or pre-hooks, a ``forward`` set on an instance)
    takes the general path too, which calls the module.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> spec = describe(net, [name for name, _ in net.named_parameters()])
    >>> spec.parameter_names, [a.name for a in spec.layers[0].activations]
    (['0.weight', '0.bias', '2.weight', '2.bias'], ['tanh'])
    """
    from .mlp import MLP

    if _runs_other_code(model):
        return None
    if type(model) is MLP:
        spec = _mlp(model)
    elif _plain_sequential(model):
        spec = _sequential(model, "")
    else:
        return None
    if spec is None or sorted(spec.parameter_names) != sorted(trainable):
        return None
    return spec


# ---------------------------------------------------------------------------------------------
# the linearization: stored activations, Jacobian rows and products


@dataclass
class LinearizedNetwork:
    """A :class:`LayeredNetwork` evaluated at fixed parameters on a batch, ready for derivatives.

    Parameters
    ----------
    network : LayeredNetwork
    params : dict of str to Tensor
        The layer parameters by name.
    X : Tensor
        Inputs ``(N, d)`` (before the network's input map).
    layout : sequence of (name, numel)
        Order of the parameters in the flat vector (the columns of ``J``).

    Attributes
    ----------
    outputs : Tensor
        ``(N, K)``.
    """

    network: LayeredNetwork
    params: dict[str, Tensor]
    X: Tensor
    layout: Sequence[tuple[str, int]]
    inputs: list[Tensor] = field(init=False, repr=False)
    outputs: Tensor = field(init=False)

    def __post_init__(self) -> None:
        a = self.X if self.network.input_map is None else self.network.input_map(self.X)
        self.inputs, self._pending = [], []
        for layer in self.network.layers:
            self.inputs.append(a)
            a, pending = _dense_forward(layer, self.params, a)
            self._pending.append(pending)
        self.outputs = _scale_outputs(self.network, a)
        self._offsets: dict[str, tuple[int, int]] | None = None
        self._slopes: list[Tensor | None] | None = None
        self._deltas: list[Tensor] | None = None

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, numel)`` in the flat vector (formed on first use: a rejected trial never needs it)."""
        if self._offsets is None:
            self._offsets = _offsets(self.layout)
        return self._offsets

    @property
    def slopes(self) -> list[Tensor | None]:
        """``d a_l / d z_l`` per layer (``None`` for a purely affine layer), formed on first use.

        A trial point's forward pass is kept in case its step is accepted; the derivatives are
        paid for only when it is (about half the trials in ``fit``'s LM runs are rejected).
        """
        if self._slopes is None:
            self._slopes = [_slope(layer, pending) for layer, pending in zip(self.network.layers, self._pending)]
            self._pending = []
        return self._slopes

    @property
    def n_params(self) -> int:
        return sum(numel for _, numel in self.layout)

    def delta(self, layer: int) -> Tensor:
        """``d out_k / d z_l`` of layer ``layer`` (one of :meth:`deltas`)."""
        return self.deltas()[layer]

    def deltas(self) -> list[Tensor]:
        """``d out_k / d z_l`` for every layer, shape ``(N, K, width_l)`` (backpropagation; formed
        once, then shared by :meth:`jacobian` and the other readers of one linearization)."""
        if self._deltas is None:
            self._deltas = self._form_deltas()
        return self._deltas

    def _form_deltas(self) -> list[Tensor]:
        n, k = self.outputs.shape
        head = torch.eye(k, dtype=self.outputs.dtype, device=self.outputs.device)
        if self.network.output_scale is not None:
            head = head * self.network.output_scale
        weights = [self.params[layer.weight] for layer in self.network.layers]
        return _backpropagate(head, weights, self.slopes, n)

    def jacobian(self, out: Tensor | None = None) -> Tensor:
        """The ``(N*K, P)`` Jacobian of the flattened outputs, columns in ``layout`` order."""
        n, k = self.outputs.shape
        if out is None:
            out = self.outputs.new_empty(n * k, self.n_params)
        for layer, a, delta in zip(self.network.layers, self.inputs, self.deltas()):
            fan_in = a.shape[1]
            weight_block, bias_block = _jacobian_blocks(out, self.offsets, layer, n, k, delta.shape[2], fan_in)
            _write_jacobian_blocks(delta, a.reshape(n, 1, 1, fan_in), weight_block, bias_block)
        return out

    def jvp(self, vector: Tensor) -> Tensor:
        """``J v`` for a flat parameter vector ``v``: shape ``(N*K,)`` (forward tangents)."""
        tangent = None
        for layer, a, slope in zip(self.network.layers, self.inputs, self.slopes):
            weight = self.params[layer.weight]
            d_weight = self._piece(vector, layer.weight, weight.shape)
            if layer.bias is not None:
                dz = torch.addmm(self._piece(vector, layer.bias, (weight.shape[0],)), a, d_weight.T)
            else:
                dz = a @ d_weight.T
            if tangent is not None:
                dz.addmm_(tangent, weight.T)
            tangent = dz if slope is None else dz.mul_(slope)
        if self.network.output_scale is not None:
            tangent = tangent * self.network.output_scale
        return tangent.reshape(-1)

    def vjp(self, cotangent: Tensor) -> Tensor:
        """``J^T u`` for ``u`` of shape ``(N*K,)``: a flat parameter vector (backpropagation)."""
        g = cotangent.reshape(self.outputs.shape)
        if self.network.output_scale is not None:
            g = g * self.network.output_scale
        out = cotangent.new_empty(self.n_params)
        ones = None
        for index in range(len(self.network.layers) - 1, -1, -1):
            layer, slope = self.network.layers[index], self.slopes[index]
            if slope is not None:
                g = g * slope
            weight = self.params[layer.weight]
            torch.mm(g.T, self.inputs[index], out=self._piece(out, layer.weight, weight.shape))
            if layer.bias is not None:
                ones = g.new_ones(g.shape[0]) if ones is None else ones
                torch.mv(g.T, ones, out=self._piece(out, layer.bias, (weight.shape[0],)))
            if index > 0:
                g = g @ weight
        return out

    def gram_diagonal(self) -> Tensor:
        """``diag(J^T J)`` without forming ``J``: ``sum_n delta^2 a^2`` per weight."""
        out = self.outputs.new_empty(self.n_params)
        for layer, a, delta in zip(self.network.layers, self.inputs, self.deltas()):
            squares = (delta * delta).sum(1)  # (N, width): summed over outputs
            self._put(out, layer.weight, squares.T @ (a * a))
            if layer.bias is not None:
                self._put(out, layer.bias, squares.sum(0))
        return out

    def row_gram(self, dtype: torch.dtype | None = None) -> Tensor:
        """``J J^T`` (``N*K x N*K``) without forming ``J``, from the layers' factors.

        Row ``(n, k)`` of ``J`` is, per layer, ``delta[n, k] (x) [a[n], 1]`` (weights, then bias),
        so ``(J J^T)[(n,k), (n',k')] = sum_l (delta_l[n,k] . delta_l[n',k']) (a_l[n] . a_l[n'] + 1)``:
        a Hadamard product of two small Gram matrices per layer, ``O(N^2 K^2 width)`` work
        instead of the ``O(N^2 K^2 P)`` of ``J J^T`` (the neural tangent kernel's closed form).
        ``dtype`` (default: the network's) is the dtype the products are formed in.
        """
        n, k = self.outputs.shape
        dtype = dtype or self.outputs.dtype
        total = self.outputs.new_zeros(n * k, n * k, dtype=dtype)
        for layer, a, delta in zip(self.network.layers, self.inputs, self.deltas()):
            rows, a = delta.reshape(n * k, -1).to(dtype), a.to(dtype)
            inputs = a @ a.T
            if layer.bias is not None:
                inputs += 1.0
            if k > 1:
                inputs = inputs[:, None, :, None].expand(n, k, n, k).reshape(n * k, n * k)
            total.addcmul_(rows @ rows.T, inputs)
        return total

    def _piece(self, vector: Tensor, name: str, shape: Sequence[int]) -> Tensor:
        start, numel = self.offsets[name]
        return vector[start : start + numel].view(*shape)

    def _put(self, out: Tensor, name: str, value: Tensor) -> None:
        start, numel = self.offsets[name]
        out[start : start + numel] = value.reshape(-1)


def _offsets(layout: Sequence[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    offsets, start = {}, 0
    for name, numel in layout:
        offsets[name] = (start, numel)
        start += numel
    return offsets


def _dense_forward(layer: Dense, params: dict[str, Tensor], a: Tensor
                   ) -> tuple[Tensor, list[tuple[Tensor | None, Tensor]]]:
    """The layer's output and, per activation, ``(z, a)``: what its derivative reads (see :func:`_slope`).

    The first activation may overwrite the affine output (which nothing else holds) when its
    derivative needs only its own output; ``z`` is then ``None``.
    """
    z = _affine(layer, params, a)
    pending = []
    for index, activation in enumerate(layer.activations):
        if index == 0 and activation.from_output and activation.function_ is not None:
            out = activation.function_(z)
        else:
            out = activation.function(z)
        pending.append((None if activation.from_output else z, out))
        z = out
    return z, pending


def _slope(layer: Dense, pending: Sequence[tuple[Tensor | None, Tensor]]) -> Tensor | None:
    """``d a / d z`` of a layer's activations from their kept values (``None`` when there are none)."""
    slope = None
    for activation, (z, out) in zip(layer.activations, pending):
        step = activation.derivative(z, out)
        slope = step if slope is None else slope * step
    return slope


def _affine(layer: Dense, params: dict[str, Tensor], a: Tensor) -> Tensor:
    bias = params[layer.bias] if layer.bias is not None else None
    return torch.nn.functional.linear(a, params[layer.weight], bias)


def _times_slope_(values: Tensor, slope: Tensor | None) -> Tensor:
    """``values *= slope`` (a fresh product: no second buffer), ``slope`` of shape (N, width)
    broadcast over a middle axis if any."""
    if slope is None:
        return values
    return values.mul_(slope.unsqueeze(1) if values.ndim == 3 else slope)


def _scale_outputs(network: LayeredNetwork, z: Tensor) -> Tensor:
    return z if network.output_map is None else network.output_map(z)


def _backpropagate(head: Tensor, weights: Sequence[Tensor], slopes: Sequence[Tensor | None], n: int,
                   out: Sequence[Tensor | None] | None = None, *, unit_head: bool = False) -> list[Tensor]:
    """``d out_k / d z_l`` for every layer, shape ``(N, K, width_l)``, backpropagated from ``head``.

    Parameters
    ----------
    head : Tensor
        ``d out / d a_L``, ``(K, K)``: the identity, times the output map's slopes if any.
    weights, slopes : sequences with one entry per layer
        ``W_l`` ``(width_l, width_{l-1})`` and ``s'_l(z_l)`` ``(N, width_l)`` (``None``: affine).
    n : int
        Number of samples.
    out : sequence of Tensor or None, optional
        Per layer, a contiguous ``(N, K, width_l)`` buffer the delta is written into where one is
        formed (a delta shared by all samples is a broadcast view instead); default: new tensors.
    unit_head : bool
        ``head`` is the 1 x 1 identity, whose product with ``W_L`` is taken as ``W_L`` itself: one
        product less, the same values (the product would turn a weight of -0.0 into +0.0).
    """
    k = head.shape[0]
    out = [None] * len(slopes) if out is None else out
    slope = slopes[-1]
    # ``shared``: the (K, width) delta of every sample, while no slope has made them differ.
    if slope is None:
        shared, delta = head, head.expand(n, k, k)
    else:  # d out_k / d z_j = scale_k [k == j] s'(z_j)
        shared, delta = None, torch.mul(head, slope.unsqueeze(1), out=out[-1])
    deltas = [delta]
    for index in range(len(slopes) - 1, 0, -1):
        weight, slope, buffer = weights[index], slopes[index - 1], out[index - 1]
        if shared is not None:
            # One (K, width) product for all samples, then one broadcast product with the slope.
            shared = weight if unit_head and shared is head else shared @ weight
            if slope is None:
                delta = shared.expand(n, k, -1)
            else:
                delta, shared = torch.mul(shared, slope.unsqueeze(1), out=buffer), None
        else:
            # One 2-D product over all (sample, output) rows, not N small batched ones.
            rows = torch.mm(delta.reshape(n * k, -1), weight, out=None if buffer is None else buffer.view(n * k, -1))
            delta = _times_slope_(rows.view(n, k, -1), slope)
        deltas.append(delta)
    return deltas[::-1]


def _jacobian_blocks(jac: Tensor, offsets: dict[str, tuple[int, int]], layer: Dense, n: int, k: int, width: int,
                     fan_in: int) -> tuple[Tensor, Tensor | None]:
    """The layer's columns of ``J`` ``(N*K, P)`` as views: ``(N, K, width, fan_in)`` for the weight,
    ``(N, K, width)`` for the bias (``None`` without one).

    narrow and view rather than indexing with slices and None: a microsecond or two less each
    (the Jacobian of a small network is mostly such overhead), and a view raises rather than
    copies if the layout ever stopped allowing one.
    """
    start, numel = offsets[layer.weight]
    weight_block = jac.narrow(1, start, numel).view(n, k, width, fan_in)
    if layer.bias is None:
        return weight_block, None
    return weight_block, jac.narrow(1, offsets[layer.bias][0], width).view(n, k, width)


def _write_jacobian_blocks(delta: Tensor, inputs: Tensor, weight_block: Tensor, bias_block: Tensor | None) -> None:
    """``d out_k / d W_l = delta_l a_{l-1}^T`` and ``d out_k / d b_l = delta_l`` for every sample and
    output, from ``delta`` ``(N, K, width)`` and the inputs as ``(N, 1, 1, fan_in)``."""
    # torch's broadcast product: 8 us where numpy's took 13-19 us on the benchmark blocks.
    torch.mul(delta.unsqueeze(3), inputs, out=weight_block)
    if bias_block is not None:
        bias_block.copy_(delta)


def forward(network: LayeredNetwork, params: dict[str, Tensor], X: Tensor) -> Tensor:
    """The network's outputs at ``params``: no derivative bookkeeping.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> spec = describe(net, [n for n, _ in net.named_parameters()])
    >>> X = torch.randn(4, 2)
    >>> torch.allclose(forward(spec, dict(net.named_parameters()), X), net(X))
    True
    """
    a = X if network.input_map is None else network.input_map(X)
    for layer in network.layers:
        a = _affine(layer, params, a)
        for index, activation in enumerate(layer.activations):
            # The affine output is ours: an in-place activation may overwrite it.
            in_place = index == 0 and activation.function_ is not None
            a = activation.function_(a) if in_place else activation.function(a)
    return _scale_outputs(network, a)


# ---------------------------------------------------------------------------------------------
# a tiny network on a fixed batch, evaluated into reused buffers


class BufferedNetwork:
    """A :class:`LayeredNetwork` of affine layers, each with ``tanh`` or no activation, evaluated on
    one fixed CPU float64 batch into buffers allocated once: the forward pass and ``J`` of the
    LM loop's normal form on a tiny network, without the per-call allocations and tensor
    bookkeeping of :class:`LinearizedNetwork`.

    The arithmetic is :class:`LinearizedNetwork`'s own: the same functions (``F.linear``, numpy's
    ``tanh`` written over its output, ``1 - a^2``, the backpropagated deltas, the blocks of ``J``)
    called with this object's buffers as their outputs, so outputs and ``J`` agree with it to the
    last bit (for one output, ``J`` skips the product of ``W_L`` with the 1 x 1 identity, which
    differs only for a weight of -0.0; see :func:`_backpropagate`). On the 1-20-1 benchmark
    network (1,000 samples, one thread, interleaved medians) a forward pass took 55 us against
    63 us, and ``J`` from it 44 us against ~100 us. Only the last point's activations are held:
    ``jacobian`` is at the point of the last ``forward``.

    Parameters
    ----------
    network : LayeredNetwork
        Must pass :meth:`supports`.
    layout : sequence of (name, numel)
        Order of the parameters in the flat vector (the columns of ``J``).
    X : Tensor
        The batch ``(N, d)``, float64 on the CPU.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> layout = [(n, p.numel()) for n, p in net.named_parameters()]
    >>> spec, X = describe(net, [n for n, _ in layout]), torch.randn(5, 1, dtype=torch.float64)
    >>> buffered = BufferedNetwork(spec, layout, X)
    >>> params = {name: p.detach() for name, p in net.named_parameters()}
    >>> lin = LinearizedNetwork(spec, params, X, layout)
    >>> x = torch.cat([p.reshape(-1) for p in params.values()])
    >>> torch.equal(buffered.forward(x), lin.outputs), torch.equal(buffered.jacobian(), lin.jacobian())
    (True, True)
    """

    def __init__(self, network: LayeredNetwork, layout: Sequence[tuple[str, int]], X: Tensor) -> None:
        if not self.supports(network, X):
            raise ValueError("BufferedNetwork takes affine layers with tanh or no activation, no data maps, "
                             f"and a 2-D CPU float64 batch; received {network} on {X.dtype} {tuple(X.shape)}.")
        self.network, self.X = network, X.contiguous()
        offsets = _offsets(layout)
        self.n_params = sum(numel for _, numel in layout)
        self.point = torch.full((self.n_params,), float("nan"), dtype=torch.float64)  # the last forward's x
        self._point_np = self.point.numpy()
        self._jacobian_point: Tensor | None = None  # where jac was last formed
        self._source: tuple[Tensor, int] | None = None  # the last forward's x and its version
        fan_ins = [X.shape[1]]
        for layer in network.layers:
            fan_ins.append(offsets[layer.weight][1] // fan_ins[-1])
        self.k = fan_ins[-1]
        self.jac = torch.empty(X.shape[0] * self.k, self.n_params, dtype=torch.float64)
        a = self.X
        self._layers = []
        for layer, width in zip(network.layers, fan_ins[1:]):
            self._layers.append(_BufferedLayer.allocate(layer, self.point, offsets, self.jac, a, self.k, width,
                                                        first=not self._layers))
            a = self._layers[-1].z
        self.outputs = a
        self._head = torch.eye(self.k, dtype=torch.float64)
        self._weights = [layer.weight for layer in self._layers]
        self._slopes = [layer.slope for layer in self._layers]
        self._deltas = [layer.delta for layer in self._layers]

    @staticmethod
    def supports(network: LayeredNetwork, X: Tensor) -> bool:
        """Affine layers with no activation or one ``tanh``, no input or output map, a CPU float64 2-D batch."""
        return (network.input_map is None and network.output_map is None and network.output_scale is None
                and X.ndim == 2 and X.dtype == torch.float64 and X.device.type == "cpu" and not X.requires_grad
                and all(len(layer.activations) == 0
                        or (len(layer.activations) == 1 and layer.activations[0].name == "tanh")
                        for layer in network.layers))

    def forward(self, x: Tensor) -> Tensor:
        """The outputs ``(N, K)`` at the flat parameters ``x`` (a view of a buffer the next call overwrites)."""
        view = _numpy_view(x) if x.ndim == 1 else None
        if view is not None:
            np.copyto(self._point_np, view)  # a float32 x is rounded up exactly, as by x.to(float64)
        else:
            self.point.copy_(x)
        # x itself, unchanged since (same object, same version counter), is known to be held.
        self._source = (x, x._version)
        for layer in self._layers:
            # F.linear's out variant: the kernel of its functional form (addmm on a 2-D input with a
            # bias, mm without), and as fast as addmm on a kept transposed view.
            torch.nn.functional.linear(layer.inputs, layer.weight, layer.bias, out=layer.z)
            if layer.z_np is not None:
                _tanh_(layer.z, layer.z_np)
        return self.outputs

    def holds(self, x: Tensor) -> bool:
        """Whether the buffers hold the forward pass at ``x``."""
        source = self._source
        if source is not None and source[0] is x and source[1] == x._version:
            return True
        if x.dtype == torch.float64 and x.ndim == 1 and _numpy_view(x) is not None:
            return bool(np.array_equal(self.point.numpy(), x.numpy()))
        return x.shape == self.point.shape and torch.equal(self.point, x.to(torch.float64))

    def jacobian(self) -> Tensor:
        """``J`` ``(N*K, P)`` at the last :meth:`forward` point (a buffer the next call overwrites)."""
        for layer in self._layers:
            if layer.slope is not None:
                _tanh_derivative(None, layer.z, out=layer.slope, ones=layer.ones)
        n = self.X.shape[0]
        deltas = _backpropagate(self._head, self._weights, self._slopes, n, self._deltas, unit_head=self.k == 1)
        for layer, delta in zip(self._layers, deltas):
            _write_jacobian_blocks(delta, layer.inputs_row, layer.weight_block, layer.bias_block)
        self._jacobian_point = self.point.clone()
        return self.jac

    def held_vjp(self, x: Tensor, cotangent: Tensor) -> Tensor | None:
        """``J^T u`` from the held ``J`` when the last :meth:`jacobian` was formed at ``x`` (a later
        :meth:`forward` elsewhere leaves it be), else None."""
        if self._jacobian_point is None or not torch.equal(self._jacobian_point, x.to(torch.float64)):
            return None
        return self.jac.T @ cotangent.to(torch.float64)


@dataclass
class _BufferedLayer:
    """One layer's parameter views (into the point), batch buffers and blocks of ``J``."""

    weight: Tensor  # (width, fan_in)
    bias: Tensor | None
    inputs: Tensor  # (N, fan_in): the batch, or the layer below's z
    z: Tensor  # (N, width): the affine output, with the tanh written over it
    z_np: np.ndarray | None  # z's numpy view where the layer has a tanh
    slope: Tensor | None  # (N, width): 1 - a^2 where the layer has a tanh
    ones: Tensor | None  # (1, 1)
    delta: Tensor  # (N, K, width): d out / d z where it is formed rather than broadcast
    inputs_row: Tensor  # inputs as (N, 1, 1, fan_in)
    weight_block: Tensor
    bias_block: Tensor | None

    @classmethod
    def allocate(cls, layer: Dense, point: Tensor, offsets: dict[str, tuple[int, int]], jac: Tensor,
                 inputs: Tensor, k: int, width: int, *, first: bool) -> _BufferedLayer:
        """The views and buffers of ``layer`` on ``inputs`` (the batch, or the layer below's ``z``;
        ``first``: the batch)."""
        n, fan_in = inputs.shape
        start, numel = offsets[layer.weight]
        weight = point.narrow(0, start, numel).view(width, fan_in)
        bias = None if layer.bias is None else point.narrow(0, offsets[layer.bias][0], width)
        z = inputs.new_empty(n, width)
        tanh = bool(layer.activations)
        weight_block, bias_block = _jacobian_blocks(jac, offsets, layer, n, k, width, fan_in)
        # The first layer's delta feeds no layer below: formed in its bias columns of J, it needs
        # no buffer of its own nor a copy there. The ones of 1 - a^2 broadcast from one element
        # (bitwise the same as a full tensor of ones). 320 KB less to stream through the cache
        # at each linearization of the 1-20-1 benchmark network.
        delta = bias_block if first and bias_block is not None else z.new_empty(n, k, width)
        return cls(weight, bias, inputs, z, z.numpy() if tanh else None, torch.empty_like(z) if tanh else None,
                   z.new_ones(1, 1) if tanh else None, delta, inputs.view(n, 1, 1, fan_in), weight_block, bias_block)


# ---------------------------------------------------------------------------------------------
# backends: the same three operations for the closed form and for torch.func


@dataclass
class LayeredJacobian:
    """Jacobian backend for a :class:`LayeredNetwork` (closed form)."""

    network: LayeredNetwork
    layout: Sequence[tuple[str, int]]
    name = "closed-form"

    def outputs(self, params: dict[str, Tensor], X: Tensor) -> Tensor:
        """``model(X)`` at ``params``."""
        return forward(self.network, params, X)

    def chunks(self, params: dict[str, Tensor], X: Tensor, samples: int,
               out: Tensor | None = None, linearizations: bool = False) -> Iterator[tuple]:
        """``(J_rows, outputs)`` for consecutive chunks of ``samples`` samples (with
        ``linearizations``, the chunk's :class:`LinearizedNetwork` third).

        With ``out`` (at least ``samples * K`` rows of ``P`` columns, the outputs' dtype) every
        chunk's rows are written into its leading rows: each chunk is overwritten by the next,
        for a consumer that folds them one at a time.
        """
        for start in range(0, X.shape[0], samples):
            lin = LinearizedNetwork(self.network, params, X[start : start + samples], self.layout)
            rows = lin.outputs.numel()
            jac = lin.jacobian(None if out is None else out[:rows])
            yield (jac, lin.outputs, lin) if linearizations else (jac, lin.outputs)

    def linearize(self, params: dict[str, Tensor], X: Tensor) -> LinearizedNetwork:
        """Products ``J v``, ``J^T u`` and ``diag(J^T J)`` on the whole batch, without ``J``."""
        return LinearizedNetwork(self.network, params, X, self.layout)


#: The start of torch.func's error for a random operation inside ``vmap`` (its default randomness="error").
VMAP_RANDOM = "vmap: called random operation"


@dataclass
class FunctionalJacobian:
    """Jacobian backend for any module: :mod:`torch.func` (``vmap`` of ``jacrev`` over samples).

    Where reverse mode cannot be batched over samples (torch 2.x's ``vmap`` of ``prelu``'s
    backward fails with a shape error), the rows come from ``vmap`` of ``jacfwd``: the same
    Jacobian, one tangent per parameter instead of one cotangent per output. Where neither
    can (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: torch 2.13's ``vmap`` of their forward pass fails on
    an in-place update of the unbatched initial state), ``jacrev`` runs one sample at a time.
    """

    model: nn.Module
    layout: Sequence[tuple[str, int]]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    name = "torch.func"
    forward_mode: bool = field(default=False, init=False)
    sample_loop: bool = field(default=False, init=False)
    #: ``J v`` by reverse mode twice (:meth:`FunctionalLinearization.jvp`), from the first that
    #: forward mode raised NotImplementedError on.
    transposed_jvp: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._paths = _tensor_paths(self.model)

    def outputs(self, params: dict[str, Tensor], X: Tensor) -> Tensor:
        return self._call(params, X)

    def _call(self, params: dict[str, Tensor], X: Tensor) -> Tensor:
        """``model(X)`` with the parameters ``params`` and :attr:`buffers` (by their first names, as
        ``named_parameters()`` gives them) in place of the module's own, each under every name
        it has in a distinct submodule (:func:`_tensor_paths`).

        ``functional_call``'s own tying (``tie_weights=True``) swaps a submodule that appears
        twice (one layer applied twice) in and out once per name: torch 2.13 computed the
        outputs with the wrong weights and left the layer holding plain tensors, without
        ``requires_grad``, after the call; ``fit`` then failed with a shape error.
        """
        values = {}
        for path, name in self._paths:
            value = params.get(name)
            if value is None:
                value = self.buffers.get(name)
            if value is not None:
                values[path] = value
        return functional_call(self.model, values, (X,), tie_weights=False)

    def chunks(self, params: dict[str, Tensor], X: Tensor, samples: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, X.shape[0], samples):
            batch = X[start : start + samples]
            jacs, outputs = self._per_sample(params, batch)
            rows = outputs.reshape(-1).numel()
            jac = torch.cat([jacs[name].reshape(rows, -1) for name, _ in self.layout], dim=1)
            if outputs.dtype in _PATH_ROUNDED:
                outputs = self._call(params, batch)
            yield jac.detach(), outputs.detach()

    def linearize(self, params: dict[str, Tensor], X: Tensor) -> FunctionalLinearization:
        return FunctionalLinearization(self, params, X)

    def _per_sample(self, params: dict[str, Tensor], batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample Jacobians and outputs; forward mode from the first batch reverse mode fails
        on, one sample at a time from the first batch forward mode fails on too.

        A genuine error in the module fails one sample at a time too and is raised from there; a
        random operation (which ``vmap`` refuses, and the loop would not) is raised at once."""
        if not self.forward_mode:
            try:
                return vmap(jacrev(self._single, has_aux=True), in_dims=(None, 0))(params, batch)
            except RuntimeError:
                self.forward_mode = True
        if not self.sample_loop:
            try:
                return vmap(jacfwd(self._single, has_aux=True), in_dims=(None, 0))(params, batch)
            except RuntimeError as error:
                if VMAP_RANDOM in str(error):
                    raise
                self.sample_loop = True
        return self._sample_by_sample(params, batch)

    def _sample_by_sample(self, params: dict[str, Tensor], batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`_per_sample` without ``vmap`` over the samples: ``jacrev`` of each in turn."""
        rows = [jacrev(self._single, has_aux=True)(params, sample) for sample in batch]
        jacs = {name: torch.stack([jac[name] for jac, _ in rows]) for name in rows[0][0]}
        return jacs, torch.stack([outputs for _, outputs in rows])

    def sample_outputs(self, params: dict[str, Tensor], X: Tensor) -> Tensor:
        """The outputs of each sample of ``X`` computed alone (a batch of one), stacked: those the
        per-sample rows are the derivatives of."""
        return torch.stack([self._single(params, sample)[0] for sample in X])

    def _single(self, params: dict[str, Tensor], sample: Tensor) -> tuple[Tensor, Tensor]:
        out = self._call(params, sample.unsqueeze(0)).squeeze(0)
        return out, out


#: Dtypes whose per-sample outputs (``vmap`` of one sample at a time) differ from the batched
#: forward pass that evaluates a trial: a float16 1-8-1 network's sum of squares read 814.1756
#: from the former and 814.1453 from the latter at the same weights (float32 and float64 agreed
#: bit for bit). There the residuals of :meth:`FunctionalJacobian.chunks` come from one more
#: forward pass, so that the cost of a linearization and of a trial at its point are the same.
_PATH_ROUNDED = (torch.float16, torch.bfloat16)


def _tensor_paths(model: nn.Module) -> list[tuple[str, str]]:
    """``(path, name)`` for each parameter and buffer of each distinct submodule of ``model``:
    ``path`` the name under the submodule's first name, ``name`` the tensor's first name in
    ``named_parameters()`` / ``named_buffers()`` (a tensor shared by two distinct submodules has
    one ``name`` and two paths; a submodule that appears twice, one path per tensor)."""
    first = {id(t): name for name, t in (*model.named_parameters(), *model.named_buffers())}
    paths = []
    for prefix, module in model.named_modules():
        for local, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            if id(tensor) in first:
                paths.append((f"{prefix}.{local}" if prefix else local, first[id(tensor)]))
    return paths


class FunctionalLinearization:
    """``J v`` and ``J^T u`` of a module at fixed parameters by :func:`torch.func.jvp` and ``vjp``.

    The reverse-mode graph is traced once and reused for every ``J^T u``; each ``J v`` is one
    forward-mode pass, or, for a module with an operation forward mode does not support (CPU
    float32 ``nn.LSTM``'s ``mkldnn_rnn_layer``), the reverse-mode product of the linear map
    ``u -> J^T u`` (its transpose, ``J``). ``diag(J^T J)`` sums the squared Jacobian rows chunk
    by chunk.
    """

    def __init__(self, backend: FunctionalJacobian, params: dict[str, Tensor], X: Tensor) -> None:
        self.backend, self.params, self.X = backend, params, X
        names = [name for name, _ in backend.layout]

        def flat_outputs(*values: Tensor) -> Tensor:
            return backend.outputs(dict(zip(names, values)), X).reshape(-1)

        self._function = flat_outputs
        self._primals = tuple(params[name] for name in names)
        outputs, self._vjp = torch.func.vjp(flat_outputs, *self._primals)
        self.outputs = outputs.detach().reshape(X.shape[0], -1)
        self._transposed_vjp: Callable[[tuple[Tensor, ...]], tuple[Tensor]] | None = None

    @property
    def n_params(self) -> int:
        return sum(numel for _, numel in self.backend.layout)

    def jvp(self, vector: Tensor) -> Tensor:
        """``J v`` for a flat parameter vector ``v``."""
        pieces = torch.split(vector, [numel for _, numel in self.backend.layout])
        tangents = tuple(p.view_as(q) for p, q in zip(pieces, self._primals))
        if not self.backend.transposed_jvp:
            try:
                return torch.func.jvp(self._function, self._primals, tangents)[1].detach()
            except NotImplementedError:
                self.backend.transposed_jvp = True
        return self._transposed(tangents)

    def _transposed(self, tangents: tuple[Tensor, ...]) -> Tensor:
        """``J v`` as the product of ``v`` with the transpose of ``u -> J^T u``: a second backward
        pass through the traced graph, for what forward mode cannot differentiate."""
        if self._transposed_vjp is None:
            zeros = self.outputs.new_zeros(self.outputs.numel())
            _, self._transposed_vjp = torch.func.vjp(self._vjp, zeros)
        return self._transposed_vjp(tangents)[0].detach()

    def vjp(self, cotangent: Tensor) -> Tensor:
        """``J^T u`` as a flat parameter vector."""
        return torch.cat([g.reshape(-1) for g in self._vjp(cotangent)]).detach()

    def gram_diagonal(self, samples: int = 256) -> Tensor:
        """``diag(J^T J)``: squared Jacobian rows, ``samples`` samples at a time."""
        total = self.outputs.new_zeros(self.n_params)
        for jac, _ in self.backend.chunks(self.params, self.X, samples):
            total += (jac * jac).sum(0)
        return total


def jacobian_backend(model: nn.Module, layout: Sequence[tuple[str, int]],
                     buffers: dict[str, Tensor] | None = None, *, X: Tensor | None = None
                     ) -> LayeredJacobian | FunctionalJacobian:
    """The closed-form backend when :func:`describe` supports ``model`` (and ``X`` is 2-D), else torch.func.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> layout = [(n, p.numel()) for n, p in net.named_parameters()]
    >>> jacobian_backend(net, layout).name, jacobian_backend(nn.Bilinear(1, 1, 1), [("weight", 1), ("bias", 1)]).name
    ('closed-form', 'torch.func')
    """
    spec = describe(model, [name for name, _ in layout])
    if spec is not None and (X is None or X.ndim == 2):
        return LayeredJacobian(spec, list(layout))
    return FunctionalJacobian(model, list(layout), dict(buffers or {}))
