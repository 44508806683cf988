"""scikit-learn estimators around :func:`marquardt.mlp.mlp` and :func:`marquardt.train.fit`.

:class:`LMRegressor` and :class:`LMClassifier` follow the scikit-learn contract (parameters
stored untouched in ``__init__``, fitted attributes ending in ``_``, inputs checked with
:func:`sklearn.utils.validation.validate_data`), so they work in ``Pipeline``,
``GridSearchCV`` and ``cross_val_score``. Training is one call of ``fit`` with MATLAB's
stopping rules; ``validation_fraction`` of the samples, drawn at random, is held out for early
stopping (MATLAB's ``max_fail`` validation checks).

scikit-learn is an optional dependency (``pip install marquardt[sklearn]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_array, check_is_fitted, validate_data
except ImportError as error:
    # validate_data and __sklearn_tags__ came with scikit-learn 1.6; older releases fail on the
    # import above with a message that does not say so.
    raise ImportError(f"marquardt's LMRegressor and LMClassifier need scikit-learn >= 1.6 ({error}); "
                      "install or upgrade it: pip install 'scikit-learn>=1.6'.") from error

from .damping import is_real_number
from .division import divide
from .history import History
from .mlp import MLP, _check_hidden, mlp
from .train import fit

__all__ = ["LMClassifier", "LMRegressor"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_METHODS = ("lm", "br", "gd", "momentum", "adam")
#: fit's options that the estimator sets from its own parameters (the parameter to use instead).
_SET_BY_PARAMETERS = {
    "method": "method", "loss": "loss", "epochs": "epochs", "goal": "goal", "min_grad": "min_grad",
    "max_fail": "max_fail", "time_limit": "time_limit", "batch_size": "batch_size",
    "division": "validation_fraction", "split": "validation_fraction", "seed": "random_state", "progress": "verbose",
}


class _LMEstimator(BaseEstimator):
    """Parameters, training and inference shared by :class:`LMRegressor` and :class:`LMClassifier`."""

    def __init__(
        self,
        hidden_layer_sizes: tuple[int, ...] = (10,),
        *,
        activation: str = "tanh",
        method: str | type = "lm",
        epochs: int = 1000,
        goal: float = 0.0,
        min_grad: float | None = None,
        max_fail: int = 6,
        validation_fraction: float = 0.15,
        batch_size: int | None = None,
        time_limit: float | None = None,
        method_options: dict[str, Any] | None = None,
        dtype: str = "float64",
        device: str = "cpu",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.method = method
        self.epochs = epochs
        self.goal = goal
        self.min_grad = min_grad
        self.max_fail = max_fail
        self.validation_fraction = validation_fraction
        self.batch_size = batch_size
        self.time_limit = time_limit
        self.method_options = method_options
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _check_parameters(self) -> None:
        """Check, before any data is looked at, the parameters whose errors would otherwise come from
        deep inside ``mlp`` or ``fit`` under another name (``hidden``, ``device``, a duplicated keyword)."""
        _check_hidden_layer_sizes(self.hidden_layer_sizes)
        _check_method(self.method)
        fraction = self.validation_fraction
        if not (is_real_number(fraction) and 0 <= fraction < 1):
            raise ValueError(f"Invalid validation_fraction value: {fraction!r}; expected a number in [0, 1).")
        _check_method_options(self.method_options)
        self._torch_dtype()
        _check_device(self.device)

    def _train(self, X: np.ndarray, y: np.ndarray, n_outputs: int, loss: str) -> None:
        """Build the network from ``random_state`` and train it on ``(X, y)``; set fitted attributes."""
        self._check_training_rows(len(X))
        dtype = self._torch_dtype()
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        # fit(seed=...) seeds torch's global generator; fork_rng leaves the caller's stream as it was.
        with torch.random.fork_rng(devices=[]):
            model = mlp(X.shape[1], _check_hidden(self.hidden_layer_sizes), n_outputs, activation=self.activation,
                        dtype=dtype, device=self.device, generator=torch.Generator().manual_seed(seed))
            history = fit(model, self._tensor("X", X, model), self._tensor("y", y, model),
                          **self._fit_options(seed, loss))
        self.model_: MLP = model.eval()
        self.history_: History = history
        self.n_iter_: int = int(history.last["epoch"])

    def _check_training_rows(self, n_samples: int) -> None:
        """Refuse a ``validation_fraction`` that holds out every sample, naming it: fit's own
        refusal named its ``split`` argument, which the estimator's user never set."""
        if float(self.validation_fraction) == 0:
            return
        # The counts fit's division takes; a generator of its own leaves torch's global stream alone.
        train, held_out, _ = divide(n_samples, "random", self._split(), torch.Generator())
        if len(train) == 0:
            raise ValueError(f"Invalid validation_fraction value: {self.validation_fraction!r}; with {n_samples} "
                             f"samples it holds out {len(held_out)} (rounded), leaving none to train on: use a "
                             "smaller fraction, or 0 to train on every sample.")

    def _split(self) -> tuple[float, float, float]:
        """fit's ``split``: training, validation (``validation_fraction``) and no test samples."""
        held_out = float(self.validation_fraction)
        return (1.0 - held_out, held_out, 0.0)

    def _fit_options(self, seed: int, loss: str) -> dict[str, Any]:
        held_out = float(self.validation_fraction)
        method = torch.optim.Adam if self.method == "adam" else self.method
        return dict(method=method, loss=loss, epochs=self.epochs, goal=self.goal, min_grad=self.min_grad,
                    max_fail=self.max_fail, division="random" if held_out > 0 else None,
                    split=self._split(), batch_size=self.batch_size, time_limit=self.time_limit,
                    seed=seed, progress=bool(self.verbose),
                    # An estimator trains on the data it is given, in this process: under a process
                    # group (a torchrun job) fit would sum over the ranks and take rank 0's weights.
                    distributed=False, **(self.method_options or {}))

    def _torch_dtype(self) -> torch.dtype:
        if not isinstance(self.dtype, str) or self.dtype not in _DTYPES:
            raise ValueError(f"Invalid dtype value: {self.dtype!r}; expected one of {sorted(_DTYPES)}.")
        return _DTYPES[self.dtype]

    @staticmethod
    def _tensor(name: str, array: np.ndarray, model: MLP) -> torch.Tensor:
        """``array`` in the network's dtype and device; ``name`` names it if it does not fit the dtype."""
        dtype = model.x_min.dtype
        largest = torch.finfo(dtype).max
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        if peak > largest:  # validate_data checked finiteness in float64; in float32 this would be inf
            raise ValueError(f"Invalid {name}: values up to {peak:.3g} in magnitude do not fit the network's dtype "
                             f"{str(dtype).removeprefix('torch.')} (largest {largest:.3g}); use dtype='float64'.")
        # A copy: scikit-learn may pass read-only (memory-mapped) arrays, which torch cannot wrap.
        return torch.tensor(array, dtype=dtype, device=model.x_min.device)

    def _outputs(self, X: Any) -> np.ndarray:
        """Raw network outputs for ``X``, shape (n_samples, n_outputs)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        with torch.no_grad():
            return self.model_(self._tensor("X", X, self.model_)).cpu().numpy().astype(np.float64, copy=False)


@contextmanager
def _unchanged_on_error(estimator: BaseEstimator) -> Iterator[None]:
    """Give ``estimator`` back its attributes if the block raises.

    ``validate_data`` replaces ``n_features_in_`` before the classes and the options are checked;
    without this, a refused refit would leave the old network behind new attributes.
    """
    saved = dict(vars(estimator))
    try:
        yield
    except BaseException:
        vars(estimator).clear()
        vars(estimator).update(saved)
        raise


def _numeric_targets(y: np.ndarray) -> np.ndarray:
    """Regression targets as numbers: text (numpy's ``str_``/``bytes_``) read as floats, as
    ``validate_data`` reads an object array.

    ``y_numeric=True`` converts object arrays only; text went on to a ufunc error ("ufunc
    'absolute' did not contain a loop ... StrDType") and its ``'nan'`` was never checked.
    """
    if y.dtype.kind not in "SU":
        return y
    try:
        numbers = y.astype(np.float64)
    except ValueError:
        raise ValueError(f"Invalid y: text values of dtype {y.dtype} that are not all numbers (such as "
                         f"{_first_non_number(y)!r}); LMRegressor fits numeric targets: for class labels use "
                         "LMClassifier.") from None
    return check_array(numbers, ensure_2d=False, dtype=np.float64, input_name="y")


def _first_non_number(y: np.ndarray) -> Any:
    for value in y.ravel().tolist():
        try:
            float(value)
        except ValueError:
            return value
    return None


def _check_hidden_layer_sizes(sizes: Any) -> None:
    try:
        _check_hidden(sizes)
    except (TypeError, ValueError) as error:
        # mlp's message names its own argument, hidden; the estimator's user set hidden_layer_sizes.
        raise type(error)(f"Invalid hidden_layer_sizes value: {sizes!r}; expected a positive int or a sequence "
                          "of positive ints, e.g. (10,) or (10, 10).") from None


def _check_method(method: Any) -> None:
    if isinstance(method, str) and method in _METHODS:
        return
    if isinstance(method, type) and issubclass(method, torch.optim.Optimizer):
        return
    raise ValueError(f"Invalid method value: {method!r}; expected one of {list(_METHODS)} or a "
                     "torch.optim.Optimizer class.")


def _check_method_options(options: Any) -> None:
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"Invalid method_options value: {options!r}; expected None or a dict of the method's "
                        "options, e.g. {'mu': 1e-2}.")
    repeated = {key: _SET_BY_PARAMETERS[key] for key in options if key in _SET_BY_PARAMETERS}
    if repeated:
        instead = ", ".join(f"{key!r} from its parameter {parameter}" for key, parameter in repeated.items())
        raise ValueError(f"Invalid method_options value: {dict(options)!r}; the estimator sets {instead}: "
                         "set that parameter instead.")


def _check_device(device: Any) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"Invalid device value: {device!r}; expected a torch device such as 'cpu' or "
                         "'cuda'.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        # Checked here: building the network there fails with torch's bare AssertionError.
        raise ValueError(f"Invalid device value: {device!r}; CUDA is not available to this PyTorch build on "
                         "this machine: use device='cpu'.")


class LMRegressor(RegressorMixin, _LMEstimator):
    """A fitting network trained by Levenberg-Marquardt (MATLAB ``fitnet`` + ``trainlm``).

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (10,)
        Sizes of the tanh hidden layers.
    activation : {"tanh", "sigmoid", "relu", "linear"}, default "tanh"
        Hidden-layer activation (MATLAB names such as ``"tansig"`` are accepted too).
    method : {"lm", "br", "gd", "momentum", "adam"} or torch.optim.Optimizer class, default "lm"
        Training method: Levenberg-Marquardt, Bayesian regularization, gradient descent,
        momentum, :class:`torch.optim.Adam`, or any optimizer class.
    epochs : int, default 1000
        Maximum epochs (LM iterations).
    goal, min_grad, max_fail, time_limit
        MATLAB's ``goal``, ``min_grad``, ``max_fail`` and ``time`` stopping rules;
        ``min_grad=None`` is the method's MATLAB default (1e-7 for ``"lm"``/``"br"``, 1e-5 for
        ``"gd"``/``"momentum"``).
    validation_fraction : float, default 0.15
        Share of the samples held out at random for early stopping; 0 trains on all of them.
    batch_size : int, optional
        Mini-batches (one step per batch); full batch by default, as MATLAB.
    method_options : dict, optional
        Options of the method, e.g. ``{"mu": 1e-2}`` for LM or ``{"lr": 1e-3}`` for Adam.
    dtype : {"float64", "float32"}, default "float64"
        Precision of the network.
    device : str, default "cpu"
        Torch device of the network (``"cuda"`` for a GPU).
    random_state : int, RandomState instance or None, default None
        Seeds the initial weights and the validation split.
    verbose : bool, default False
        Show live progress.

    Attributes
    ----------
    model_ : marquardt.MLP
        The trained network (inputs and targets normalised inside it, as ``mapminmax``).
    history_ : marquardt.History
        The training record: performance, damping and gradient per epoch, stop reason.
    n_iter_ : int
        Epochs run.
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names of ``X`` in ``fit``; only when ``X`` was a DataFrame with string column names.
    n_outputs_ : int
        Number of targets.

    Examples
    --------
    >>> X = np.linspace(-1, 1, 60)[:, None]
    >>> reg = LMRegressor((8,), random_state=0).fit(X, np.sin(3 * X).ravel())
    >>> reg.score(X, np.sin(3 * X).ravel()) > 0.99
    True
    >>> reg.history_.stop_reason in {"Validation stop.", "Minimum gradient reached.", "Maximum MU reached."}
    True
    """

    def fit(self, X: Any, y: Any) -> LMRegressor:
        """Train on ``X`` (n_samples, n_features) and ``y`` (n_samples,) or (n_samples, n_targets)."""
        self._check_parameters()
        with _unchanged_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
            y = _numeric_targets(y)
            self.n_outputs_ = 1 if y.ndim == 1 else y.shape[1]
            # predict gives y's shape back: a (n, 1) target predicts (n, 1), as LinearRegression.
            self._target_ndim = y.ndim
            self._train(X, y.reshape(len(y), self.n_outputs_), self.n_outputs_, "mse")
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Network outputs, shaped as the ``y`` of ``fit``: (n_samples,) or (n_samples, n_targets)."""
        outputs = self._outputs(X)
        return outputs.ravel() if self._target_ndim == 1 else outputs

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class LMClassifier(ClassifierMixin, _LMEstimator):
    """A pattern-recognition network trained by Levenberg-Marquardt on the cross-entropy.

    Parameters
    ----------
    loss : {"cross_entropy", "binary_cross_entropy"}, default "cross_entropy"
        ``"cross_entropy"``: one logit per class, softmax probabilities (the generalized
        Gauss-Newton LM step). ``"binary_cross_entropy"``: two classes, one logit.
    hidden_layer_sizes, activation, method, epochs, goal, min_grad, max_fail, validation_fraction,
    batch_size, time_limit, method_options, dtype, device, random_state, verbose
        As :class:`LMRegressor`, except ``method="br"`` (trainbr fits a squared error: regressor only).

    Labels may be any values :func:`numpy.unique` can sort (ints, strings).

    Attributes
    ----------
    classes_ : ndarray
        The class labels, sorted; output ``k`` of the network belongs to ``classes_[k]``.
    model_, history_, n_iter_, n_features_in_, feature_names_in_
        As :class:`LMRegressor`. The history also has ``accuracy`` (and ``vaccuracy``).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(80, 2))
    >>> labels = np.where(X[:, 0] + X[:, 1] > 0, "up", "down")
    >>> clf = LMClassifier((5,), random_state=0).fit(X, labels)
    >>> clf.classes_.tolist(), clf.score(X, labels) > 0.9
    (['down', 'up'], True)
    >>> clf.predict_proba(X[:2]).sum(axis=1).round(12).tolist()
    [1.0, 1.0]
    """

    # scikit-learn reads the parameters from the signature, so it is spelled out again here.
    def __init__(
        self,
        hidden_layer_sizes: tuple[int, ...] = (10,),
        *,
        activation: str = "tanh",
        method: str | type = "lm",
        loss: str = "cross_entropy",
        epochs: int = 1000,
        goal: float = 0.0,
        min_grad: float | None = None,
        max_fail: int = 6,
        validation_fraction: float = 0.15,
        batch_size: int | None = None,
        time_limit: float | None = None,
        method_options: dict[str, Any] | None = None,
        dtype: str = "float64",
        device: str = "cpu",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            hidden_layer_sizes, activation=activation, method=method, epochs=epochs, goal=goal, min_grad=min_grad,
            max_fail=max_fail, validation_fraction=validation_fraction, batch_size=batch_size, time_limit=time_limit,
            method_options=method_options, dtype=dtype, device=device, random_state=random_state, verbose=verbose,
        )
        self.loss = loss

    def fit(self, X: Any, y: Any) -> LMClassifier:
        """Train on ``X`` (n_samples, n_features) and class labels ``y`` (n_samples,)."""
        if self.loss not in ("cross_entropy", "binary_cross_entropy"):  # fit's "mse" is no classifier loss
            raise ValueError(f"Invalid loss: {self.loss!r}; expected 'cross_entropy' or 'binary_cross_entropy'.")
        if isinstance(self.method, str) and self.method == "br":  # fit would ask for loss='mse', refused above
            raise ValueError("Invalid method value for LMClassifier: 'br'; Bayesian regularization (trainbr) fits a "
                             "sum of squared errors: use LMRegressor for it, or method='lm' here.")
        self._check_parameters()
        with _unchanged_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float64)
            check_classification_targets(y)
            self.classes_, codes = np.unique(y, return_inverse=True)
            self._check_class_count()
            if self.loss == "binary_cross_entropy":
                self._train(X, codes.astype(np.float64)[:, None], 1, self.loss)
            else:
                self._train(X, codes.astype(np.float64), len(self.classes_), self.loss)
        return self

    def _check_class_count(self) -> None:
        if len(self.classes_) < 2:
            # tolist: the label as the user wrote it (0.0, 'a'), not numpy's repr np.float64(0.0)
            raise ValueError(f"LMClassifier needs samples of at least two classes; received one class, "
                             f"{self.classes_.tolist()[0]!r}.")
        if self.loss == "binary_cross_entropy" and len(self.classes_) != 2:
            raise ValueError(f"Only binary classification is supported with loss='binary_cross_entropy'; "
                             f"received {len(self.classes_)} classes. Use loss='cross_entropy'.")

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), columns in the order of ``classes_``."""
        logits = torch.from_numpy(self._outputs(X))
        # The fitted network decides, not the loss parameter, which set_params may have changed
        # since fit: a binary_cross_entropy network has one logit, a cross_entropy one has one per class.
        if self.model_.n_outputs == 1:
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1.0 - p, p], dim=1).numpy()
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each sample."""
        probabilities = self.predict_proba(X)  # checks fitting first
        return self.classes_[probabilities.argmax(axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = self.loss != "binary_cross_entropy"
        return tags
