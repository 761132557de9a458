"""Every loss-weighting method in the trainer's own jitted step: finite, and a different
update from the plain sum of the losses."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mtop_jax.config.loading import load_config
from mtop_jax.data.pipeline import build_dataset
from mtop_jax.parallel.sharding import to_global
from mtop_jax.training.setup import build_weighting, load_tokenizer, setup
from mtop_jax.training.steps import BATCH_KEYS

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


def tiny_config(*overrides: str):
    return load_config(TINY, list(overrides))


#: options that make a method act within 4 steps (epochs of 1 step; gradnorm's Adam faster)
KWARGS = {"stch": {"steps_per_epoch": 1, "warmup_epochs": 1},
          "gradnorm": {"steps_per_epoch": 1, "learning_rate": 0.1}}


def weighting_run(method: str, devices) -> dict:
    """4 train steps of the tiny config with a weighting method, from the seed's init and
    the seed's batches: initial and final parameters, and the steps' metrics."""
    config = tiny_config("--config.mesh.data=1", f"--config.weighting.method={method}",
                         "--config.optim.learning_rate=0.003")
    config.weighting.kwargs.update(KWARGS.get(method, {}))
    tokenizer = load_tokenizer(config)
    data = build_dataset(config.data, tokenizer, "train")
    run = setup(config, data.tasks, tokenizer, devices=devices[:1])
    init = jax.device_get(nnx.to_pure_dict(run.state.params))  # before the step donates it
    batches = data.train_iterator(seed=0)
    state, steps = run.state, []
    for _ in range(4):
        state, metrics = run.train_step(state, to_global(next(batches), run.data_sharding,
                                                         BATCH_KEYS))
        steps.append(jax.device_get(metrics))
    return {"init": init, "params": jax.device_get(nnx.to_pure_dict(state.params)),
            "state": state, "steps": steps}


@pytest.fixture(scope="module")
def static_run(devices):
    """The reference every other method must differ from: the plain sum of the losses."""
    return weighting_run("static", devices)


# make test: one method per path of the step (static; learned state and the losses
# after the step: famo; per-task gradients combined from their Gram matrix; per
# coordinate, graddrop's own combine_shared); make test-all: all (uncertainty's learned
# scales; dbmtl's gradient buffers, also resumed in test_train.py). Every method's own arithmetic,
# and that it changes the update, is tested jitted in test_weighting.py (and against
# torchjd in test_weighting_reference.py).
@pytest.mark.parametrize("method", [
    "static", "famo", "pcgrad",
    "graddrop",  # per coordinate (combine_shared)
    *(pytest.param(m, marks=pytest.mark.slow) for m in (
        "uncertainty", "dbmtl", "dwa", "mgda", "cagrad", "getmtl",
        "rlw", "gls", "stch", "gradnorm", "nashmtl", "fairgrad",
        "upgrad", "dualproj", "imtlg", "alignedmtl", "conflictfree", "gradvac"))])
def test_every_weighting_method_trains_without_nan(method, devices, static_run):
    got = weighting_run(method, devices)
    state, steps = got["state"], got["steps"]
    for metrics in steps:
        assert bool(metrics["finite"]), method
    losses = [float(m["loss"]) for m in steps]
    assert np.all(np.isfinite(losses)) and int(state.step) == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.weighting))

    # Each method changes the update. The same init and batches as the static run; a
    # rerun of static is bit-identical, so any difference below is the method's.
    params, ref = jax.tree.leaves(got["params"]), jax.tree.leaves(static_run["params"])
    if method == "static":
        for a, b in zip(params, ref, strict=True):
            np.testing.assert_array_equal(a, b)
        return
    moved = np.sqrt(sum(np.sum((b - a) ** 2) for a, b in
                        zip(jax.tree.leaves(static_run["init"]), ref, strict=True)))
    apart = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(params, ref, strict=True)))
    # 1.4% (dwa) to 63% (mgda) of the static run's own movement, measured
    assert apart > 0.005 * moved, (method, apart / moved)
    # ... and its weights (the coefficient of each present task's loss or gradient) are
    # not those of static (all 1) up to a common factor, at some step.
    weights = [np.asarray(m["weighting/weights"])[np.asarray(m["present"])] for m in steps]
    if method == "dualproj":
        # Here the mean gradient never conflicts with a task's gradient, so DualProj
        # leaves it as it is (weights 1/K; the sum's update differs through clip_norm).
        for w in weights:
            np.testing.assert_allclose(w, 1.0 / len(w), rtol=1e-5)
        return
    spread = [float(np.ptp(w) / np.mean(w)) for w in weights]
    assert max(spread) > 1e-3, (method, spread)
    # Equal to static by construction on the first steps (the warmup's first step has
    # learning rate 0, so no method moves the parameters on step 1):
    if method == "dwa":  # weights 1 until each task has two recorded losses
        np.testing.assert_array_equal(np.concatenate(weights[:2]), 1.0)
        assert max(spread[2:]) > 1e-3, spread
    if method == "uncertainty":  # log-variances start at 0: all weights 0.5 on step 1
        np.testing.assert_array_equal(weights[0], 0.5)
        assert np.any(np.asarray(state.weighting["params"]["log_vars"]) != 0)
        assert max(spread[1:]) > 1e-3, spread
    if method == "gradnorm":  # the plain sum in its epoch 0 (step 1), then learned scales
        np.testing.assert_array_equal(weights[0], 1.0)
        assert max(spread[1:]) > 1e-3, spread
    if method == "dbmtl":  # one buffer per shared parameter, K rows each
        k = len(steps[0]["present"])
        assert all(b.shape[0] == k for b in state.weighting["state"]["buffer"])


def test_rlw_draws_follow_train_seed():
    """rlw's random weights come from ``train.seed`` (unless ``weighting.kwargs.seed``
    is set): the same seed draws the same weights, another seed other weights."""

    def draws(seed: int, *overrides: str) -> np.ndarray:
        config = tiny_config("--config.mesh.data=1", "--config.weighting.method=rlw",
                             f"--config.train.seed={seed}", *overrides)
        method = build_weighting(config.weighting, 3, seed=config.train.seed)
        state, out = method.init(), []
        for _ in range(3):
            out.append(method.combine(np.ones(3, np.float32), None, state)[1]["weights"])
            state = method.update(state, np.ones(3, np.float32))
        return np.stack(out)

    np.testing.assert_array_equal(draws(0), draws(0))
    assert not np.allclose(draws(0), draws(1))
    np.testing.assert_array_equal(draws(0, "--config.weighting.kwargs.seed=5"),
                                  draws(1, "--config.weighting.kwargs.seed=5"))


@pytest.mark.slow  # builds the tiny model (20 s on a busy 2-core CPU)
def test_the_trainer_builds_rlw_with_train_seed(devices):
    """``setup`` hands ``train.seed`` to the method (the wiring the test above assumes)."""
    config = tiny_config("--config.mesh.data=1", "--config.weighting.method=rlw",
                         "--config.train.seed=7")
    tokenizer = load_tokenizer(config)
    run = setup(config, build_dataset(config.data, tokenizer, "train").tasks, tokenizer,
                devices=devices[:1])
    assert run.weighting.seed == 7
