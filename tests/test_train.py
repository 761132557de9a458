"""The trainer: mesh equality, resume, loss falling, TensorBoard events, stages, configs."""

import json
import struct
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
    """Loss, parameters and step metrics after one train step on a mesh over ``devices``."""
    tokenizer = load_tokenizer(config)
    data = build_dataset(config.data, tokenizer, "train")
    run = setup(config, data.tasks, tokenizer, devices=devices)
    batch = to_global(next(data.train_iterator(seed=0)), run.data_sharding, BATCH_KEYS)
    state, metrics = run.train_step(run.state, batch)
    return (float(metrics["loss"]), jax.device_get(nnx.to_pure_dict(state.params)),
            jax.device_get(metrics))


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
    loss_1, params_1, _ = one_device_step
    n = int(np.prod(list(mesh.values())))
    loss_n, params_n, _ = one_step(tiny_config(*overrides), devices[:n])
    assert loss_n == pytest.approx(loss_1, abs=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_n), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_batch_task_loss_weighs_each_task_by_its_labelled_share(devices, one_device_step):
    """``train.task_loss=batch``: each task's loss is the labelled mean scaled by its
    labelled rows / the batch's rows (the tiny config's tasks are sparse), in the losses
    the step differentiates."""
    _, _, labelled = one_device_step
    config = tiny_config("--config.mesh.data=1", "--config.train.task_loss=batch")
    _, _, batch = one_step(config, devices[:1])
    counts = labelled["counts"]
    assert len(set(counts[counts > 0])) > 1  # sparse: the two normalisations differ
    np.testing.assert_array_equal(batch["counts"], counts)
    rows = config.data.batch_size  # a training batch has no padding rows
    np.testing.assert_allclose(batch["task_losses"], labelled["task_losses"] * counts / rows,
                               rtol=1e-5)


#: One uninterrupted run that three tests read: the loss falls over it, a run stopped
#: half-way and resumed ends where it ends, and it is the donor of ``init.tasks_from``.
STRAIGHT = ["--config.train.steps=30", "--config.train.log_every=5",
            "--config.train.eval_every=15", "--config.train.checkpoint_every=100",
            "--config.train.test_split=", "--config.predict_examples=0",
            "--config.optim.learning_rate=0.003", "--config.mesh.data=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, devices):
    """(workdir, final eval metrics) of the uninterrupted run, on 2 devices."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    return workdir, train(tiny_config(*STRAIGHT), workdir, devices=devices[:2])


def test_resume_equals_uninterrupted(tmp_path, devices, straight):
    workdir, metrics = straight
    assert train(tiny_config(*STRAIGHT), tmp_path / "resumed", devices=devices[:2],
                 stop_at=15) == {}
    resumed = train(tiny_config(*STRAIGHT), tmp_path / "resumed", devices=devices[:2])
    assert resumed == metrics  # the same eval metrics at step 30
    # A finished workdir run again trains nothing and returns the same final metrics,
    # without writing its evaluation again.
    records = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert train(tiny_config(*STRAIGHT), tmp_path / "resumed", devices=devices[:2]) == metrics
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text().count('"eval"') == (
        records.count('"eval"'))
    a, b = read_params(workdir), read_params(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


def test_loss_falls_on_tiny_config(straight):
    workdir, _ = straight
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses


def read_tfrecords(path: Path):
    """The payloads of a TFRecord file: 8-byte little-endian length, its 4-byte CRC,
    the payload, its 4-byte CRC (the CRCs are not checked)."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        assert pos + 12 <= len(data), f"{path}: truncated record header at byte {pos}"
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        start = pos + 12
        assert start + length + 4 <= len(data), f"{path}: truncated record at byte {pos}"
        yield data[start:start + length]
        pos = start + length + 4


def scalars(event_file: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of an event file's scalar summaries."""
    out: dict[str, dict[int, float]] = {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        from tensorboardX.proto import event_pb2

        for payload in read_tfrecords(event_file):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
        return out
    acc = EventAccumulator(str(event_file))
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def test_training_writes_tensorboard_event_files(straight):
    tmp_path, _ = straight

    events = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, f"no event file in {tmp_path / 'tensorboard'}"
    found: dict[str, dict[int, float]] = {}
    for event_file in events:
        for tag, by_step in scalars(event_file).items():
            found.setdefault(tag, {}).update(by_step)
    assert 30 in found.get("train/loss", {}), f"train/loss at step 30 not in {found}"

    # the same value as the JSONL record (float32 in the event file)
    records = [json.loads(line)
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 30)
    assert found["train/loss"][30] == pytest.approx(loss, rel=1e-6)


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


def test_prompts_stage_takes_no_backbone_gradient_and_steps_as_before(devices):
    """The ``prompts`` stage differentiates only the per-task parameters: its compiled
    step has below 0.8x the FLOPs of the same step taking every gradient (no weight
    gradient of the backbone), and moves the per-task parameters as that step does."""
    from mtop_jax.training.steps import jit_train_step

    def compiled_flops(compiled) -> float:
        cost = compiled.cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    def one_step(stage, frozen_too=True):  # (FLOPs of the step, parameters after it)
        config = tiny_config(f"--config.train.stage={stage}", "--config.mesh.data=1",
                             "--config.model.prompt_depth=deep")
        tokenizer = load_tokenizer(config)
        dataset = build_dataset(config.data, tokenizer, "train")
        run = setup(config, dataset.tasks, tokenizer, devices=devices[:1])
        host = {k: v for k, v in next(dataset.train_iterator(seed=0)).items()
                if k in BATCH_KEYS}
        batch = to_global(host, run.data_sharding, BATCH_KEYS)
        step = run.train_step
        if not frozen_too:  # the same step, every gradient computed (before the mask)
            step = jit_train_step(run.train_graphdef, run.tx, run.weighting,
                                  run.spec.regression, run.weighting_tx,
                                  seed=config.train.seed, state_shardings=run.state_shardings,
                                  data_sharding=run.data_sharding,
                                  task_loss=config.train.task_loss,
                                  output_scales=run.spec.output_scales)
        flops = compiled_flops(step.lower(run.state, batch).compile())
        state, _ = step(run.state, batch)
        return flops, {"/".join(map(str, p)): np.asarray(v.get_value())
                       for p, v in nnx.to_flat_state(state.params)}

    prompts_flops, masked = one_step("prompts")
    every_flops, every = one_step("prompts", frozen_too=False)
    assert prompts_flops < 0.8 * every_flops, (prompts_flops, every_flops)
    assert masked.keys() == every.keys()
    for key in masked:
        np.testing.assert_allclose(masked[key], every[key], rtol=1e-5, atol=1e-7, err_msg=key)


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
    with pytest.raises(ConfigError, match="init.prompts: expected one of"):
        check_before_data(tiny_config("--config.init.prompts=vocab"))
    with pytest.raises(ConfigError, match="train.task_loss: expected one of"):
        check_before_data(tiny_config("--config.train.task_loss=mean"))


def test_eval_step_maps_regression_outputs_to_target_units():
    """A regression head predicts standardised units: the eval step's prediction is
    output * std + mean, its loss the standardised squared error; classification
    tasks are untouched."""
    import jax.numpy as jnp

    from mtop_jax.models.config import PRESETS
    from mtop_jax.models.multitask import ModelConfig, MultiTaskModel
    from mtop_jax.training.steps import make_eval_step

    model = MultiTaskModel(PRESETS["tiny"], ModelConfig(mode="shared"), [("c", 3), ("r", 1)],
                           rngs=nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.array([[101, 7, 8, 102], [101, 9, 102, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32),
             "token_type_ids": jnp.zeros_like(ids), "labels": jnp.array([[1, 0], [2, 0]]),
             "targets": jnp.array([[0.0, 10.0], [0.0, 4.0]]), "weights": jnp.ones(2),
             "index": jnp.arange(2)}
    mean, std = np.array([0.0, 8.0], np.float32), np.array([1.0, 2.0], np.float32)
    out = make_eval_step(graphdef, np.array([False, True]), (mean, std))(params, rest, batch)
    logits = np.asarray(model.logits(ids, batch["attention_mask"]))
    np.testing.assert_allclose(out["predictions"][:, 1], logits[:, 1, 0] * 2.0 + 8.0,
                               rtol=1e-5)
    np.testing.assert_array_equal(out["predictions"][:, 0], logits[:, 0, :3].argmax(-1))
    z = np.array([1.0, -2.0])  # (target - mean) / std
    np.testing.assert_allclose(out["loss_sums"][1], np.sum((logits[:, 1, 0] - z) ** 2),
                               rtol=1e-5)


def test_bad_mesh_is_rejected_before_compiling(devices):
    config = tiny_config("--config.mesh.data=3")
    with pytest.raises(ConfigError, match="needs 3 devices"):
        check_before_data(config, devices[:2])
    config = tiny_config("--config.mesh.data=8", "--config.data.batch_size=12")
    with pytest.raises(ConfigError, match="batch_size=12 does not divide"):
        check_before_data(config, devices)


def test_tasks_from_copies_one_tasks_parameters(devices, straight):
    donor_dir, _ = straight
    donor = read_params(donor_dir)
    config = tiny_config("--config.mesh.data=1", "--config.train.seed=1")
    config.init.tasks_from = {"role": str(donor_dir)}
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


@pytest.mark.parametrize("name", ["debian_packages", "debian_packages_dev",
                                  "debian_packages_dev_classification", "glue", "toxicity",
                                  "tiny"])
def test_every_config_file_loads_and_is_valid(name):
    from mtop_jax.config.defaults import check_config
    from mtop_jax.models.multitask import ModelConfig

    for arg in ("", "shared"):
        config = load_config(str(Path(TINY).with_name(f"{name}.py")) + (f":{arg}" if arg else ""))
        check_config(config)
        ModelConfig.from_dict(dict(config.model))
        assert config.model.mode == (arg or "mtop")


#: Stateful weightings, with options that make their state move within 6 steps: stch's
#: nadir is collected over steps 2-3 (epochs of 2 steps; the stop at 3 falls in it) and
#: used from step 4; gradnorm's scales (and their Adam state) learn from step 1; famo's
#: task logits move from step 2 (from the loss change of step 1).
STATEFUL = {"famo": {}, "dbmtl": {}, "stch": {"steps_per_epoch": 2, "warmup_epochs": 1},
            "gradvac": {}, "gradnorm": {"steps_per_epoch": 1, "learning_rate": 0.1}}
SHORT = ["--config.train.steps=6", "--config.train.checkpoint_every=100",
         "--config.train.log_every=3", "--config.train.eval_split=",
         "--config.train.test_split=", "--config.predict_examples=0",
         "--config.train.best_metric=", "--config.optim.learning_rate=0.003",
         "--config.mesh.data=1"]


@pytest.mark.parametrize("method", [
    "famo",  # its task logits and the last losses (a loss-based step: make test)
    pytest.param("dbmtl", marks=pytest.mark.slow),  # gradient buffers per shared parameter
    pytest.param("stch", marks=pytest.mark.slow),  # the nadir's running loss sums and counts
    pytest.param("gradvac", marks=pytest.mark.slow),  # the EMA of the cosines
    pytest.param("gradnorm", marks=pytest.mark.slow)])  # learned scales and their Adam
def test_resume_keeps_the_weighting_state(method, tmp_path, devices):
    """A run stopped at step 3 and resumed saves, at step 6, the state (parameters,
    optimizer, the method's state) of the run that was never stopped."""
    from fault_helpers import full_state

    config = tiny_config(*SHORT, f"--config.weighting.method={method}")
    config.weighting.kwargs.update(STATEFUL[method])
    train(config, tmp_path / "straight", devices=devices[:1])
    assert train(config, tmp_path / "resumed", devices=devices[:1], stop_at=3) == {}
    mid = full_state(tmp_path / "resumed", 3)
    moved = [k for k in mid if k.startswith("['weighting']['state']") and "step" not in k
             and np.any(mid[k] != 0)]
    assert moved, f"{method}: nothing in the weighting state to restore at step 3"
    train(config, tmp_path / "resumed", devices=devices[:1])
    a, b = full_state(tmp_path / "straight", 6), full_state(tmp_path / "resumed", 6)
    assert a.keys() == b.keys()
    assert any(k.startswith("['weighting']['state']") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{method}: {key}")
