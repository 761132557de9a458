"""mtop_jax.training.metrics against scikit-learn and scipy on random and edge cases."""

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    mean_squared_error,
    r2_score,
)

from mtop_jax.data.tasks import TaskSpec
from mtop_jax.training.metrics import (
    classification_metrics,
    primary_metric,
    regression_metrics,
    task_metrics,
)

CASES = 20


def sk_classification(y_true, y_pred, num_classes):
    """What scikit-learn says, with the label set our macro-F1 averages over:
    the classes present in ``y_true``."""
    out = {"accuracy": accuracy_score(y_true, y_pred),
           "macro_f1": f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true),
                                zero_division=0)}
    if num_classes == 2:
        out["f1"] = f1_score(y_true, y_pred, labels=[0, 1], pos_label=1, average="binary",
                             zero_division=0)
        out["mcc"] = matthews_corrcoef(y_true, y_pred)
    return out


def assert_same(ours, reference, **tol):
    assert set(ours) >= set(reference), (ours, reference)
    for k, v in reference.items():
        assert ours[k] == pytest.approx(v, **tol), (k, ours, reference)


# ---------------------------------------------------------------------- classification


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # sklearn's MCC
@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_classification_equals_sklearn_on_random_cases(num_classes):
    rng = np.random.default_rng(num_classes)
    seen = {"predicted, not in y_true": 0, "in y_true, never predicted": 0}
    for _ in range(CASES):
        n = int(rng.integers(1, 60))
        # Skewed class frequencies: some classes absent from y_true or never predicted.
        p_true = rng.dirichlet(np.full(num_classes, 0.5))
        y_true = rng.choice(num_classes, size=n, p=p_true)
        noise = rng.choice(num_classes, size=n, p=rng.dirichlet(np.full(num_classes, 0.5)))
        y_pred = np.where(rng.random(n) < rng.uniform(0.2, 0.9), y_true, noise)
        ours = classification_metrics(y_true, y_pred, num_classes)
        assert set(ours) == ({"accuracy", "macro_f1", "f1", "mcc"} if num_classes == 2
                             else {"accuracy", "macro_f1"})
        assert_same(ours, sk_classification(y_true, y_pred, num_classes), abs=1e-12)
        seen["predicted, not in y_true"] += bool(set(y_pred) - set(y_true))
        seen["in y_true, never predicted"] += bool(set(y_true) - set(y_pred))
    assert all(seen.values()), seen  # the random cases cover both edge cases


def test_macro_f1_averages_over_the_classes_in_y_true_not_sklearns_default():
    # Class 2 is predicted once but never occurs in y_true; class 3 occurs nowhere.
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 2])
    ours = classification_metrics(y_true, y_pred, 4)
    f1_1 = 2 * 1 / (2 + 1)  # class 1: one of two found, nothing wrongly called 1
    assert ours["macro_f1"] == pytest.approx((1.0 + f1_1) / 2)
    assert ours["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)))
    # sklearn's default label set is the union of true and predicted labels: it also
    # averages in class 2's F1 of 0, so it is lower.
    default = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert default == pytest.approx((1.0 + f1_1 + 0.0) / 3)
    assert ours["macro_f1"] > default + 0.2
    # ... and neither counts class 3, which occurs nowhere.
    assert ours["macro_f1"] != pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=range(4), zero_division=0))


def test_class_never_predicted_counts_as_f1_zero():
    y_true = np.array([0, 1, 2, 2, 1, 0])
    y_pred = np.array([0, 1, 1, 1, 1, 0])  # class 2 occurs but is never predicted
    ours = classification_metrics(y_true, y_pred, 3)
    f1_1 = 2 * 2 / (2 + 4)
    assert ours["macro_f1"] == pytest.approx((1.0 + f1_1 + 0.0) / 3)
    assert_same(ours, sk_classification(y_true, y_pred, 3), abs=1e-12)


@pytest.mark.parametrize("y_true, y_pred, expected", [
    # binary, one class only in y_true, all predicted right: F1 of class 1 and MCC are 0
    ([0, 0, 0], [0, 0, 0], {"accuracy": 1.0, "macro_f1": 1.0, "f1": 0.0, "mcc": 0.0}),
    ([1, 1, 1, 1], [1, 1, 1, 1], {"accuracy": 1.0, "macro_f1": 1.0, "f1": 1.0, "mcc": 0.0}),
    # one class in y_true, some predicted as the absent class: macro over class 0 only
    ([0, 0, 0, 0], [0, 1, 0, 1], {"accuracy": 0.5, "macro_f1": 2 * 2 / 6, "f1": 0.0,
                                  "mcc": 0.0}),
    # everything wrong, both classes present: MCC -1
    ([0, 1, 0, 1], [1, 0, 1, 0], {"accuracy": 0.0, "macro_f1": 0.0, "f1": 0.0, "mcc": -1.0}),
])
def test_binary_edge_cases(y_true, y_pred, expected):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ours = classification_metrics(y_true, y_pred, 2)
    assert ours == pytest.approx(expected)
    with warnings.catch_warnings():  # sklearn warns on the degenerate MCC; it still says 0
        warnings.simplefilter("ignore")
        assert_same(ours, sk_classification(y_true, y_pred, 2), abs=1e-12)


def test_single_class_task():
    y = np.zeros(5, int)
    assert classification_metrics(y, y, 1) == {"accuracy": 1.0, "macro_f1": 1.0}
    # multi-class task whose y_true holds a single class
    y_true, y_pred = np.full(6, 2), np.array([2, 2, 0, 2, 1, 2])
    ours = classification_metrics(y_true, y_pred, 3)
    assert ours["macro_f1"] == pytest.approx(2 * 4 / (6 + 4))
    assert_same(ours, sk_classification(y_true, y_pred, 3), abs=1e-12)


# ---------------------------------------------------------------------- regression


def sk_regression(y_true, y_pred):
    return {"pearson": stats.pearsonr(y_true, y_pred).statistic,
            "spearman": stats.spearmanr(y_true, y_pred).statistic,
            "mse": mean_squared_error(y_true, y_pred), "r2": r2_score(y_true, y_pred)}


def test_regression_equals_scipy_on_random_cases_with_ties():
    rng = np.random.default_rng(0)
    for case in range(CASES):
        n = int(rng.integers(3, 80))
        y_true = rng.normal(size=n) * rng.uniform(0.1, 10)
        y_pred = 0.7 * y_true + rng.normal(size=n)
        if case % 2:  # many ties, in both (STS-B-like scores on a grid of 0.5)
            y_true = np.round(y_true * 2) / 2
            y_pred = np.round(y_pred * 2) / 2
        if case % 5 == 0:  # a monotone but non-linear relation: Spearman 1, Pearson < 1
            y_pred = np.exp(y_true)
        dtype = np.float32 if case % 3 == 0 else np.float64  # the evaluator gives float32
        y_true, y_pred = y_true.astype(dtype), y_pred.astype(dtype)
        if np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
            continue
        ref = sk_regression(y_true.astype(np.float64), y_pred.astype(np.float64))
        assert_same(regression_metrics(y_true, y_pred), ref, rel=1e-5, abs=1e-6)
        if case % 5 == 0 and len(np.unique(y_true)) == n:
            assert regression_metrics(y_true, y_pred)["spearman"] == pytest.approx(1.0)


def test_spearman_ties_take_the_mean_rank():
    y_true = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    y_pred = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 5.0])
    ranks_true = np.array([1, 2.5, 2.5, 5, 5, 5])
    ranks_pred = np.array([4, 1, 2.5, 2.5, 5.5, 5.5])
    expected = np.corrcoef(ranks_true, ranks_pred)[0, 1]
    got = regression_metrics(y_true, y_pred)["spearman"]
    assert got == pytest.approx(expected)
    assert got == pytest.approx(stats.spearmanr(y_true, y_pred).statistic)


def test_constant_input_gives_zero_correlation():
    # scipy answers NaN (with a warning); ours reports 0, so ``score`` stays a number.
    y = np.array([1.0, 2.0, 3.0])
    m = regression_metrics(y, np.full(3, 2.0))
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0
    assert m["mse"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- task_metrics


TASKS = (TaskSpec("cola", labels=("bad", "good")),
         TaskSpec("mrpc", labels=("different", "same")),
         TaskSpec("stsb", "regression"),
         TaskSpec("topic", labels=("a", "b", "c", "d")),
         TaskSpec("rating", "regression"))


def test_primary_metric_follows_glue_names():
    assert [primary_metric(t.name, t.is_regression) for t in TASKS] == [
        "mcc", "f1", "pearson", "accuracy", "pearson"]
    assert primary_metric("qqp", False) == "f1"


def test_task_metrics_skip_missing_labels_and_score_is_the_mean_of_primaries():
    rng = np.random.default_rng(1)
    for _ in range(CASES):
        n = int(rng.integers(10, 60))
        labels, preds, expected = {}, {}, {}
        for spec in TASKS:
            missing = rng.random(n) < rng.uniform(0, 0.5)
            if spec.is_regression:
                y = rng.normal(size=n).astype(np.float32)
                p = (y + rng.normal(size=n)).astype(np.float32)
                # Garbage under the missing labels: must never be read.
                p[missing] = 1e6 * rng.normal(size=missing.sum())
                y[missing] = np.nan
                keep = ~missing
                expected[spec.name] = sk_regression(y[keep].astype(np.float64),
                                                    p[keep].astype(np.float64))
            else:
                c = spec.num_classes
                y = rng.integers(0, c, n).astype(np.float32)  # as the evaluator passes them
                p = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, n)).astype(np.float32)
                p[missing] = rng.integers(0, c, missing.sum())
                # -1 marks a missing label; NaN does too (never >= 0)
                y[missing] = np.where(rng.random(missing.sum()) < 0.5, -1, np.nan)
                keep = ~missing
                expected[spec.name] = sk_classification(y[keep].astype(int),
                                                        p[keep].astype(int), c)
            labels[spec.name], preds[spec.name] = y, p
            expected[spec.name]["count"] = float(keep.sum())
        got = task_metrics(TASKS, preds, labels)
        for spec in TASKS:
            mine = {k.split("/", 1)[1]: v for k, v in got.items()
                    if k.startswith(spec.name + "/")}
            assert_same(mine, expected[spec.name], rel=1e-5, abs=1e-6)
        primaries = [expected["cola"]["mcc"], expected["mrpc"]["f1"],
                     expected["stsb"]["pearson"], expected["topic"]["accuracy"],
                     expected["rating"]["pearson"]]
        assert got["score"] == pytest.approx(np.mean(primaries), rel=1e-5, abs=1e-6)


def test_task_without_labels_is_counted_zero_and_left_out_of_score():
    n = 8
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1], np.float32)
    p = np.array([0, 1, 0, 0, 1, 1, 0, 1], np.float32)
    labels = {"cola": y, "mrpc": np.full(n, -1.0, np.float32),
              "stsb": np.full(n, np.nan, np.float32),
              "topic": np.full(n, np.nan, np.float32),
              # a single labelled value: no correlation, left out too
              "rating": np.r_[1.0, np.full(n - 1, np.nan)].astype(np.float32)}
    preds = {name: p for name in labels}
    got = task_metrics(TASKS, preds, labels)
    assert got["mrpc/count"] == got["stsb/count"] == got["topic/count"] == 0.0
    assert got["rating/count"] == 1.0
    assert {k for k in got if not k.endswith("/count")} == {
        "cola/accuracy", "cola/macro_f1", "cola/f1", "cola/mcc", "score"}
    assert got["score"] == pytest.approx(matthews_corrcoef(y, p))
    assert task_metrics(TASKS[1:3], preds, labels)["score"] == 0.0  # no primary at all


@pytest.mark.parametrize("normalize", ["labelled", "batch", "sqrt"])
def test_task_losses_normalise_over_labelled_rows_or_the_batch(normalize):
    """Cross-entropy and squared error (of standardised targets) summed over a task's
    labelled rows (padding rows and missing labels skipped), over the labelled count,
    the batch's rows, or the geometric mean of the two."""
    import jax.numpy as jnp

    from mtop_jax.training.losses import task_losses

    rng = np.random.default_rng(0)
    b, n, c = 6, 3, 4
    logits = rng.normal(size=(b, n, c)).astype(np.float32)
    labels = rng.integers(0, c, size=(b, n))
    labels[[0, 2, 3], 0] = -1  # task 0: three labels; task 2: regression
    labels[:, 1] = -1  # task 1: none
    labels[:, 2] = 0
    targets = rng.normal(8.0, 3.0, size=(b, n)).astype(np.float32)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    regression = np.array([False, False, True])
    mean, std = np.array([0, 0, 8.5], np.float32), np.array([1, 1, 2.5], np.float32)
    losses, present, counts = task_losses(jnp.asarray(logits), jnp.asarray(labels),
                                          jnp.asarray(targets), jnp.asarray(weights),
                                          jnp.asarray(regression), normalize,
                                          jnp.asarray(mean), jnp.asarray(std))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows0 = [1, 4]  # labelled and not padding
    ce = -sum(log_p[i, 0, labels[i, 0]] for i in rows0)
    sq = sum((logits[i, 2, 0] - (targets[i, 2] - 8.5) / 2.5) ** 2 for i in range(5))
    denominators = {"labelled": (len(rows0), 1, 5), "batch": (5, 5, 5),
                    "sqrt": (np.sqrt(2 * 5), 1, 5)}[normalize]
    np.testing.assert_allclose(losses, [ce / denominators[0], 0.0, sq / denominators[2]],
                               rtol=1e-5)
    np.testing.assert_array_equal(present, [True, False, True])
    np.testing.assert_array_equal(counts, [2, 0, 5])
    with pytest.raises(ValueError, match="normalize 'sum'"):
        task_losses(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(targets),
                    jnp.asarray(weights), jnp.asarray(regression), "sum")
