"""The trainer: mesh equality, resume, loss falling, stages, configs."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mtop_jax.config.loading import load_config
from mtop_jax.data.pipeline import build_dataset
from mtop_jax.errors import ConfigError
from mtop_jax.parallel.sharding import to_global
from mtop_jax.training.loop import train
from mtop_jax.training.setup import check_before_data, load_tokenizer, setup
from mtop_jax.training.steps import BATCH_KEYS
from mtop_jax.training.transfer import read_params

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


def tiny_config(*overrides: str, arg: str = ""):
    return load_config(TINY + (f":{arg}" if arg else ""), list(overrides))


def one_step(config, devices):
    """Loss and parameters after one train step on a mesh over ``devices``."""
    tokenizer = load_tokenizer(config)
    data = build_dataset(config.data, tokenizer, "train")
    run = setup(config, data.tasks, tokenizer, devices=devices)
    batch = to_global(next(data.train_iterator(seed=0)), run.data_sharding, BATCH_KEYS)
    state, metrics = run.train_step(run.state, batch)
    return float(metrics["loss"]), jax.device_get(nnx.to_pure_dict(state.params))


@pytest.fixture(scope="module")
def one_device_step(devices):
    """The reference the mesh tests compare with: one step on one device."""
    return one_step(tiny_config("--config.mesh.data=1"), devices[:1])


@pytest.mark.parametrize("mesh", [
    pytest.param({"data": 2}, marks=pytest.mark.slow),  # make test: 2 x 2 x 2 has every axis
    {"data": 2, "fsdp": 2, "tensor": 2},
    pytest.param({"data": 1, "fsdp": 4, "tensor": 2}, marks=pytest.mark.slow)])
def test_one_step_equal_on_1_2_and_8_devices(mesh, devices, one_device_step):
    overrides = [f"--config.mesh.{k}={v}" for k, v in {"data": 1, "fsdp": 1, "tensor": 1,
                                                         **mesh}.items()]
    loss_1, params_1 = one_device_step
    n = int(np.prod(list(mesh.values())))
    loss_n, params_n = one_step(tiny_config(*overrides), devices[:n])
    assert loss_n == pytest.approx(loss_1, abs=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_resume_equals_uninterrupted(tmp_path, devices):
    overrides = ["--config.train.steps=8", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=100", "--config.train.test_split=",
                 "--config.predict_examples=0", "--config.mesh.data=2"]
    straight = train(tiny_config(*overrides), tmp_path / "straight", devices=devices[:2])
    assert train(tiny_config(*overrides), tmp_path / "resumed", devices=devices[:2],
                 stop_at=4) == {}
    resumed = train(tiny_config(*overrides), tmp_path / "resumed", devices=devices[:2])
    assert resumed == straight  # the same eval metrics at step 8
    a, b = read_params(tmp_path / "straight"), read_params(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


def test_loss_falls_on_tiny_config(tmp_path, devices):
    train(tiny_config("--config.train.steps=30", "--config.train.eval_every=100",
                      "--config.train.log_every=5", "--config.train.test_split=",
                      "--config.predict_examples=0", "--config.optim.learning_rate=0.003",
                      "--config.mesh.data=1"),
          tmp_path, devices=devices[:1])
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses


def test_prompts_stage_changes_no_backbone_parameter(tmp_path, devices):
    config = tiny_config("--config.train.steps=3", "--config.train.stage=prompts",
                         "--config.train.test_split=", "--config.train.eval_split=",
                         "--config.predict_examples=0", "--config.mesh.data=1",
                         "--config.model.prompt_depth=deep")
    train(config, tmp_path, devices=devices[:1])
    trained = read_params(tmp_path)
    tokenizer = load_tokenizer(config)
    run = setup(config, build_dataset(config.data, tokenizer, "train").tasks, tokenizer,
                devices=devices[:1])
    initial = {tuple(str(k) for k in path): np.asarray(v.get_value())
               for path, v in nnx.to_flat_state(run.state.params)}
    changed = {k[0] for k in initial if not np.array_equal(initial[k], trained[k])}
    assert changed == {"prompts", "queries", "heads"}  # the per-task parameters only
    for key in initial:
        if key[0] == "encoder":
            np.testing.assert_array_equal(initial[key], trained[key], err_msg="/".join(key))


# ---------------------------------------------------------------------------- config


def test_config_overrides_and_their_errors():
    c = tiny_config("--config.train.steps=7", "--config.model.mode=shared",
                    "--config.data.buckets=(16, 32)", "--config.optim.learning_rate=1")
    assert (c.train.steps, c.model.mode, c.data.buckets) == (7, "shared", (16, 32))
    assert c.optim.learning_rate == 1.0
    with pytest.raises(ConfigError, match="train has no field 'stpes'"):
        tiny_config("--config.train.stpes=3")
    with pytest.raises(ConfigError, match="'many' is not a int"):
        tiny_config("--config.train.steps=many")
    with pytest.raises(ConfigError, match="unrecognised argument"):
        load_config(TINY, ["--steps=3"])
    assert tiny_config(arg="prefix").model.mode == "prefix"


def test_bad_mesh_is_rejected_before_compiling(devices):
    config = tiny_config("--config.mesh.data=3")
    with pytest.raises(ConfigError, match="needs 3 devices"):
        check_before_data(config, devices[:2])
    config = tiny_config("--config.mesh.data=8", "--config.data.batch_size=12")
    with pytest.raises(ConfigError, match="batch_size=12 does not divide"):
        check_before_data(config, devices)


def test_tasks_from_copies_one_tasks_parameters(tmp_path, devices):
    overrides = ["--config.train.steps=2", "--config.train.test_split=",
                 "--config.train.eval_split=", "--config.predict_examples=0",
                 "--config.mesh.data=1"]
    train(tiny_config(*overrides), tmp_path / "donor", devices=devices[:1])
    donor = read_params(tmp_path / "donor")
    config = tiny_config(*overrides, "--config.train.seed=1")
    config.init.tasks_from = {"role": str(tmp_path / "donor")}
    tokenizer = load_tokenizer(config)
    tasks = build_dataset(config.data, tokenizer, "train").tasks
    run = setup(config, tasks, tokenizer, devices=devices[:1])
    got = {tuple(str(k) for k in p): np.asarray(v.get_value())
           for p, v in nnx.to_flat_state(run.state.params)}
    t = [x.name for x in tasks].index("role")
    np.testing.assert_array_equal(got[("prompts", "embedding")][t],
                                  donor[("prompts", "embedding")][t])
    other = (t + 1) % len(tasks)
    assert not np.array_equal(got[("prompts", "embedding")][other],
                              donor[("prompts", "embedding")][other])
    assert not np.array_equal(got[("encoder", "pooler", "dense", "kernel")],
                              donor[("encoder", "pooler", "dense", "kernel")])


def test_cli_train_then_eval(tmp_path, capsys):
    from mtop_jax.cli import main

    workdir = str(tmp_path / "run")
    assert main(["train", "--config", TINY, "--workdir", workdir, "--config.train.steps=2",
                 "--config.train.eval_split="]) == 0
    out = capsys.readouterr().out
    assert "== test split, step 2" in out and "predictions of all 4 tasks" in out
    assert main(["eval", "--workdir", workdir, "--split", "validation"]) == 0
    assert "== validation split, step 2" in capsys.readouterr().out
    assert main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "not a training workdir" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["debian_packages", "glue", "toxicity", "tiny"])
def test_every_config_file_loads_and_is_valid(name):
    from mtop_jax.config.defaults import check_config
    from mtop_jax.models.multitask import ModelConfig

    for arg in ("", "shared"):
        config = load_config(str(Path(TINY).with_name(f"{name}.py")) + (f":{arg}" if arg else ""))
        check_config(config)
        ModelConfig.from_dict(dict(config.model))
        assert config.model.mode == (arg or "mtop")
