"""LMRegressor and LMClassifier: scikit-learn's estimator checks, Pipeline, GridSearchCV, cross_val_score."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from marquardt import History, MLP  # noqa: E402
from marquardt.estimators import LMClassifier, LMRegressor  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: intra-op threads only add overhead, and the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every check passes: no expected_failed_checks. Few epochs keep the ~60 checks per estimator
# fast; LM still fits their small data sets. (Without pandas or SCIPY_ARRAY_API set, scikit-learn
# skips its pandas and array-API checks.)
@parametrize_with_checks([LMRegressor(epochs=15), LMClassifier(epochs=15),
                          LMClassifier(epochs=15, loss="binary_cross_entropy")])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def regression_data(n=80, seed=0):
    X, y = make_regression(n_samples=n, n_features=3, noise=1.0, random_state=seed)
    return X, y / y.std()


def test_regressor_fits_and_exposes_fitted_attributes():
    X, y = regression_data()
    reg = LMRegressor((5,), epochs=50, random_state=0).fit(X, y)
    assert isinstance(reg.model_, MLP) and isinstance(reg.history_, History)
    assert reg.n_features_in_ == 3 and reg.n_outputs_ == 1 and reg.n_iter_ == reg.history_.last["epoch"]
    assert reg.predict(X).shape == (80,)
    assert reg.score(X, y) > 0.95
    assert reg.history_.method == "lm"


def test_regressor_multi_output():
    X, y = regression_data()
    Y = np.column_stack([y, np.sin(y)])
    reg = LMRegressor((6,), epochs=30, random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (80, 2) and reg.model_.n_outputs == 2


def test_same_random_state_same_weights_and_global_rng_untouched():
    X, y = regression_data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = LMRegressor((4,), epochs=10, random_state=7).fit(X, y)
    assert torch.equal(torch.get_rng_state(), before)
    b = LMRegressor((4,), epochs=10, random_state=7).fit(X, y)
    assert all(torch.equal(p, q) for p, q in zip(a.model_.parameters(), b.model_.parameters()))


def test_validation_fraction():
    X, y = regression_data()
    held_out = LMRegressor((4,), epochs=5, validation_fraction=0.25, random_state=0).fit(X, y)
    assert held_out.history_.last["vperf"] is not None and not np.isnan(held_out.history_.last["vperf"])
    all_train = LMRegressor((4,), epochs=5, validation_fraction=0.0, random_state=0).fit(X, y)
    assert np.isnan(all_train.history_.last["vperf"])


@pytest.mark.parametrize("params, error, message", [
    ({"validation_fraction": 1.0}, ValueError, "Invalid validation_fraction value: 1.0; expected a number in [0, 1)."),
    ({"validation_fraction": True}, ValueError, "Invalid validation_fraction value: True; expected a number"),
    ({"dtype": "float16"}, ValueError, "Invalid dtype value: 'float16'; expected one of ['float32', 'float64']."),
    ({"dtype": torch.float32}, ValueError, "Invalid dtype value: torch.float32; expected one of"),
    ({"method": "newton"}, ValueError, "Invalid method value: 'newton'; expected one of ['lm', 'br', 'gd', "
     "'momentum', 'adam'] or a torch.optim.Optimizer class."),
    ({"method": "Adam"}, ValueError, "Invalid method value: 'Adam'; expected one of"),
    ({"epochs": -1}, ValueError, "Invalid epochs value: -1"),
    # These used to name mlp's argument (hidden), or fail inside it on None.
    ({"hidden_layer_sizes": None}, TypeError, "Invalid hidden_layer_sizes value: None; expected a positive int "
     "or a sequence of positive ints, e.g. (10,) or (10, 10)."),
    ({"hidden_layer_sizes": "10"}, TypeError, "Invalid hidden_layer_sizes value: '10'"),
    ({"hidden_layer_sizes": (5, 0)}, ValueError, "Invalid hidden_layer_sizes value: (5, 0)"),
    # These used to be dict()'s "got multiple values for keyword argument 'epochs'" and "argument after ** must be a
    # mapping".
    ({"method_options": {"epochs": 3}}, ValueError, "Invalid method_options value: {'epochs': 3}; the estimator sets "
     "'epochs' from its parameter epochs: set that parameter instead."),
    ({"method_options": {"seed": 1, "mu": 0.1}}, ValueError, "the estimator sets 'seed' from its parameter random_state"),
    ({"method_options": [("mu", 0.1)]}, TypeError, "Invalid method_options value: [('mu', 0.1)]; expected None or "
     "a dict"),
    # These used to be torch's RuntimeError on the device string, or its bare AssertionError without CUDA.
    ({"device": "gpu"}, ValueError, "Invalid device value: 'gpu'; expected a torch device such as 'cpu' or 'cuda'."),
    pytest.param({"device": "cuda"}, ValueError, "Invalid device value: 'cuda'; CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
])
def test_bad_parameters_raise_at_fit(params, error, message):
    X, y = regression_data(20)
    with pytest.raises(error, match=re.escape(message)):
        LMRegressor(**params).fit(X, y)


def test_numpy_number_validation_fraction_is_accepted():
    # np.float32 is no Python float; it used to be refused as an invalid validation_fraction.
    X, y = regression_data(40)
    numpy_number = LMRegressor((3,), epochs=3, validation_fraction=np.float32(0.25), random_state=0).fit(X, y)
    python_number = LMRegressor((3,), epochs=3, validation_fraction=0.25, random_state=0).fit(X, y)
    np.testing.assert_array_equal(numpy_number.predict(X), python_number.predict(X))


@pytest.mark.parametrize("method", ["br", "gd", "momentum", "adam"])
def test_other_methods(method):
    X, y = regression_data(40)
    reg = LMRegressor((4,), method=method, epochs=5, random_state=0).fit(X, y)
    assert reg.n_iter_ == 5 or reg.history_.stop_reason != "Maximum epoch reached."


def test_classifier_string_labels_and_probabilities():
    X, y = make_classification(n_samples=90, n_features=4, n_informative=3, n_redundant=0, n_classes=3,
                               n_clusters_per_class=1, class_sep=2.0, random_state=0)
    labels = np.array(["red", "green", "blue"])[y]
    clf = LMClassifier((5,), epochs=30, random_state=0).fit(X, labels)
    assert clf.classes_.tolist() == ["blue", "green", "red"] and clf.model_.n_outputs == 3
    proba = clf.predict_proba(X)
    assert proba.shape == (90, 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert set(clf.predict(X)) <= set(labels) and clf.score(X, labels) > 0.9
    assert "accuracy" in clf.history_.keys()


def test_binary_classifier_has_one_output():
    X, y = make_classification(n_samples=60, n_features=3, n_informative=2, n_redundant=0, random_state=1)
    clf = LMClassifier((4,), loss="binary_cross_entropy", epochs=20, random_state=0).fit(X, y + 5)
    assert clf.model_.n_outputs == 1 and clf.classes_.tolist() == [5, 6]
    assert clf.predict_proba(X).shape == (60, 2) and clf.score(X, y + 5) > 0.85


@pytest.mark.parametrize("loss", ["mse", "hinge"])
def test_classifier_refuses_a_loss_that_is_not_a_classification_loss(loss):
    # "mse" is a loss of fit, but not of a classifier: it used to fail on the network's output shape.
    X = np.arange(12.0).reshape(6, 2)
    with pytest.raises(ValueError, match=f"Invalid loss: '{loss}'; expected 'cross_entropy' or "
                       "'binary_cross_entropy'."):
        LMClassifier(loss=loss).fit(X, [0, 1, 0, 1, 0, 1])


def test_binary_loss_refuses_three_classes():
    X = np.arange(12.0).reshape(6, 2)
    with pytest.raises(ValueError, match="Only binary classification is supported with loss='binary_cross_entropy'; "
                       "received 3 classes"):
        LMClassifier(loss="binary_cross_entropy").fit(X, [0, 1, 2, 0, 1, 2])


def test_pipeline_grid_search_and_cross_val_score():
    X, y = regression_data(60)
    pipe = make_pipeline(StandardScaler(), LMRegressor(epochs=10, random_state=0))
    search = GridSearchCV(pipe, {"lmregressor__hidden_layer_sizes": [(2,), (5,)]}, cv=3).fit(X, y)
    assert search.best_params_["lmregressor__hidden_layer_sizes"] in {(2,), (5,)}
    assert search.best_estimator_.score(X, y) > 0.9

    Xc, yc = make_classification(n_samples=60, n_features=3, n_informative=2, n_redundant=0, class_sep=2.0,
                                 random_state=0)
    scores = cross_val_score(LMClassifier((4,), epochs=10, random_state=0), Xc, yc, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8


def test_pickle_round_trip_predicts_identically():
    X, y = regression_data(40)
    reg = LMRegressor((4,), epochs=5, random_state=0).fit(X, y)
    again = pickle.loads(pickle.dumps(reg))
    assert np.array_equal(again.predict(X), reg.predict(X))


def three_class_data():
    X, y = make_classification(n_samples=60, n_features=3, n_informative=3, n_redundant=0, n_classes=3,
                               n_clusters_per_class=1, class_sep=2.0, random_state=0)
    return X, np.array(["a", "b", "c"])[y]


def test_set_params_after_fit_does_not_change_predictions():
    # Parameters take effect at the next fit, as in scikit-learn: predict_proba used to read the
    # loss parameter, so set_params(loss="binary_cross_entropy") on a fitted 3-class model gave
    # 2 sigmoid columns of the first logit.
    X, labels = three_class_data()
    clf = LMClassifier((4,), epochs=10, random_state=0).fit(X, labels)
    proba, predicted = clf.predict_proba(X), clf.predict(X)
    clf.set_params(loss="binary_cross_entropy")
    np.testing.assert_array_equal(clf.predict_proba(X), proba)
    np.testing.assert_array_equal(clf.predict(X), predicted)
    assert proba.shape == (60, 3)


@pytest.mark.parametrize("params, X_rows", [
    ({"epochs": -1}, slice(None)),                      # refused by fit, after the data checks
    ({"loss": "binary_cross_entropy"}, slice(None)),    # three classes for a binary loss
    ({}, slice(None, 1)),                               # one sample: one class only
])
def test_a_refused_fit_leaves_a_fitted_classifier_as_it_was(params, X_rows):
    # The refit used to replace n_features_in_ and classes_ before failing, leaving the old network
    # with new attributes: predict then named the wrong classes or refused the old feature count.
    X, three = three_class_data()
    clf = LMClassifier((4,), epochs=10, random_state=0).fit(X[:, :2], three == "a")
    predicted = clf.predict(X[:, :2])
    with pytest.raises(ValueError):
        clf.set_params(**params).fit(X[X_rows], three[X_rows])
    assert clf.n_features_in_ == 2 and clf.classes_.tolist() == [False, True]
    np.testing.assert_array_equal(clf.predict(X[:, :2]), predicted)


@pytest.mark.parametrize("labels, shown", [(np.zeros(6), "0.0"), (np.ones(6, dtype=np.int64), "1"),
                                           (np.array(["a"] * 6), "'a'")])
def test_one_class_is_named_as_the_user_wrote_it(labels, shown):
    # numpy's repr named it np.float64(0.0) or np.str_('a').
    with pytest.raises(ValueError, match=rf"received one class, {shown}\.$"):
        LMClassifier(epochs=1).fit(np.arange(12.0).reshape(6, 2), labels)


def test_a_refused_fit_leaves_a_fitted_regressor_as_it_was():
    X, y = regression_data(40)
    reg = LMRegressor((3,), epochs=5, random_state=0).fit(X, y)
    predicted = reg.predict(X)
    with pytest.raises(ValueError, match="Invalid goal value: -1"):
        reg.set_params(goal=-1).fit(np.column_stack([X, X]), np.column_stack([y, y]))
    assert reg.n_features_in_ == 3 and reg.n_outputs_ == 1
    np.testing.assert_array_equal(reg.predict(X), predicted)


def test_regressor_predicts_the_shape_of_the_targets_it_was_fitted_on():
    # y of shape (n, 1), as marquardt.fit takes it, used to predict shape (n,): y - predict(X) then
    # broadcast to (n, n). scikit-learn's LinearRegression keeps the column too.
    X, y = regression_data(40)
    column = LMRegressor((3,), epochs=5, random_state=0).fit(X, y[:, None])
    flat = LMRegressor((3,), epochs=5, random_state=0).fit(X, y)
    assert column.n_outputs_ == 1 and column.predict(X).shape == (40, 1) and flat.predict(X).shape == (40,)
    np.testing.assert_array_equal(column.predict(X)[:, 0], flat.predict(X))
    assert column.score(X, y[:, None]) == pytest.approx(flat.score(X, y), rel=1e-12)


@pytest.mark.parametrize("hide", ["sklearn", "validate_data"])
def test_missing_or_old_scikit_learn_is_named_at_import(monkeypatch, hide):
    # Without scikit-learn, or with one older than 1.6 (no validate_data), the import used to fail
    # with "No module named 'sklearn'" or "cannot import name 'validate_data'", without the version needed.
    import sys

    import sklearn.utils.validation

    if hide == "sklearn":
        monkeypatch.setitem(sys.modules, "sklearn.base", None)  # a None entry: ModuleNotFoundError on import
    else:
        monkeypatch.delattr(sklearn.utils.validation, "validate_data")
    monkeypatch.delitem(sys.modules, "marquardt.estimators")
    with pytest.raises(ImportError, match=re.escape("marquardt's LMRegressor and LMClassifier need scikit-learn "
                                                    ">= 1.6 (")):
        import marquardt.estimators  # noqa: F401


def test_classifier_refuses_bayesian_regularization_naming_the_regressor():
    # fit's own refusal asked for loss='mse', which the classifier refuses in turn.
    X = np.arange(12.0).reshape(6, 2)
    with pytest.raises(ValueError, match=re.escape("Invalid method value for LMClassifier: 'br'; Bayesian "
                                                   "regularization (trainbr) fits a sum of squared errors: use "
                                                   "LMRegressor for it, or method='lm' here.")):
        LMClassifier(method="br").fit(X, [0, 1, 0, 1, 0, 1])


def test_float32_network_refuses_values_past_float32_range():
    # Finite float64 values past float32's range became inf in the network: fit reported
    # "X contains NaN or inf", and predict returned NaN without a word.
    X, y = regression_data(20)
    reg = LMRegressor((3,), epochs=3, dtype="float32", random_state=0).fit(X, y)
    message = "Invalid X: values up to 1e+39 in magnitude do not fit the network's dtype float32"
    with pytest.raises(ValueError, match=re.escape(message)):
        reg.predict(X * 1e39 / np.abs(X).max())
    with pytest.raises(ValueError, match=re.escape(message)):
        LMRegressor((3,), dtype="float32").fit(X * 1e39 / np.abs(X).max(), y)
    with pytest.raises(ValueError, match=re.escape("Invalid y: values up to 1e+39 in magnitude")):
        LMRegressor((3,), dtype="float32").fit(X, y * 1e39 / np.abs(y).max())


@pytest.mark.parametrize("method", ["gd", "momentum"])
def test_first_order_estimators_stop_at_matlabs_min_grad(method):
    # min_grad=None passes the method's MATLAB default to fit: traingd/traingdm stop at 1e-5
    # (a fixed 1e-7 kept them running past the point MATLAB stops).
    X = np.linspace(-1, 1, 20)[:, None]
    reg = LMRegressor((), method=method, method_options={"lr": 0.5}, epochs=5000, validation_fraction=0,
                      random_state=0).fit(X, (2 * X + 1).ravel())
    gradient = reg.history_["gradient"]
    assert reg.history_.stop_reason == "Minimum gradient reached."
    assert gradient[-1] <= 1e-5 < gradient[-2]


@pytest.mark.parametrize("estimator", [LMRegressor(hidden_layer_sizes=(3,), epochs=2, random_state=0),
                                       LMClassifier(hidden_layer_sizes=(3,), epochs=2, random_state=0)])
def test_estimators_train_in_their_own_process_under_a_process_group(monkeypatch, estimator):
    # Under an initialized process group fit reduces over the ranks by default: an estimator on
    # rank 1 took rank 0's weights and trained on both ranks' data, and batch_size failed.
    import marquardt.estimators as module

    received = {}
    real_fit = module.fit

    def spy(*args, **kwargs):
        received.update(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(module, "fit", spy)
    X, y = make_classification(n_samples=30, n_features=3, n_informative=2, n_redundant=0, random_state=0)
    estimator.fit(X, y.astype(float) if isinstance(estimator, LMRegressor) else y)
    assert received["distributed"] is False


def test_regressor_reads_text_targets_as_numbers_and_refuses_labels():
    # numpy text targets passed validate_data(y_numeric=True), which converts object arrays only,
    # and failed in np.abs with "ufunc 'absolute' did not contain a loop ... StrDType".
    X, y = regression_data(30)
    numbers = LMRegressor((3,), epochs=3, random_state=0).fit(X, y)
    text = LMRegressor((3,), epochs=3, random_state=0).fit(X, np.array([repr(v) for v in y.tolist()]))
    np.testing.assert_array_equal(text.predict(X), numbers.predict(X))
    labels = np.where(y > 0, "up", "down")
    with pytest.raises(ValueError, match=re.escape(f"Invalid y: text values of dtype <U4 that are not all numbers "
                                                   f"(such as {labels.tolist()[0]!r}); LMRegressor fits numeric targets: "
                                                   "for class labels use LMClassifier.")):
        LMRegressor((3,), epochs=3).fit(X, labels)
    with pytest.raises(ValueError, match="Input y contains NaN"):
        LMRegressor((3,), epochs=3).fit(X, np.array(["nan"] + ["1.5"] * 29))


@pytest.mark.parametrize("estimator, n, held_out", [(LMRegressor(validation_fraction=0.9), 3, 3),
                                                    (LMRegressor(validation_fraction=0.99), 40, 40),
                                                    (LMClassifier(validation_fraction=0.8), 2, 2)])
def test_a_validation_fraction_that_holds_out_every_sample_is_named(estimator, n, held_out):
    # fit's refusal named its own split argument, which the estimator's user never set:
    # "split (0.09999999999999998, 0.9, 0.0) leaves no training samples out of 3."
    X = np.arange(2.0 * n).reshape(n, 2)
    message = (f"Invalid validation_fraction value: {estimator.validation_fraction!r}; with {n} samples it holds out "
               f"{held_out} (rounded), leaving none to train on: use a smaller fraction, or 0 to train on every sample.")
    with pytest.raises(ValueError, match=re.escape(message)):
        estimator.fit(X, np.arange(n) % 2)
    assert not hasattr(estimator, "model_")
    # 0.8 of 3 samples holds out 2 and trains on 1: accepted
    LMRegressor((2,), epochs=1, validation_fraction=0.8, random_state=0).fit(np.arange(6.0).reshape(3, 2), [0, 1, 2])
