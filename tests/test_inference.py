"""Serving: load anywhere, predict all tasks in one pass, export, embed, add/remove a task."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtop_jax
from mtop_jax.cli import main
from mtop_jax.config_flags import load_config
from mtop_jax.errors import MtopError
from mtop_jax.export import load_stablehlo, save_model_dir
from mtop_jax.task_edit import add_task, remove_tasks
from mtop_jax.train import train

ROOT = Path(__file__).parents[1]
TEXTS = ["GNU C library: shared libraries", "Python bindings for the GTK toolkit",
         "", "a daemon that serves web pages over HTTP " * 20, "ünïcödé テキスト 文本"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, devices):
    """A tiny model trained on an 8-device mesh (data x fsdp x tensor = 2 x 2 x 2)."""
    wd = tmp_path_factory.mktemp("inference") / "run"
    config = load_config(str(ROOT / "configs" / "tiny.py"), [
        "--config.train.steps=3", "--config.train.eval_split=''", "--config.train.test_split=''",
        "--config.predict_examples=0", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.model.prompt_depth=deep"])
    train(config, wd, devices=devices)
    return wd


@pytest.fixture(scope="module")
def predictor(workdir, devices):
    return mtop_jax.load(workdir, devices=devices[:1])


def test_trained_on_8_devices_predicts_the_same_on_1(workdir, predictor, devices):
    from mtop_jax.checkpointing import Checkpoints
    from mtop_jax.data.pipeline import build_dataset
    from mtop_jax.state import load_tokenizer, read_model_spec
    from mtop_jax.train import setup

    config = mtop_jax.config_flags.load_config(str(ROOT / "configs" / "tiny.py"), [
        "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.model.prompt_depth=deep"])
    del build_dataset, load_tokenizer
    run = setup(config, read_model_spec(workdir).tasks, devices=devices, init=False)
    checkpoints = Checkpoints(workdir, read_only=True)
    state = checkpoints.restore_state(checkpoints.latest_step(), run.state)
    checkpoints.close()
    batch = predictor.encode(TEXTS[:2])
    sharded = jax.jit(lambda p, r, *a: nnx.merge(run.eval_graphdef, p, r).logits(*a))(
        state.params, state.rest, batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"])
    assert state.params["encoder"]["layers"][0]["ffn"]["intermediate"]["kernel"].get_value(
    ).sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(predictor.logits(TEXTS[:2]), np.asarray(sharded)[:2], atol=1e-5)
    assert predictor.step == 3


def test_predict_answers_every_task_with_distributions(predictor):
    results = predictor.predict(TEXTS)
    assert len(results) == len(TEXTS)
    for r in results:
        assert set(r) == set(predictor.task_names)
        for task in predictor.spec.tasks:
            probs = r[task.name]["probabilities"]
            assert list(probs) == list(task.labels)
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert r[task.name]["label"] == max(probs, key=probs.get)


def test_new_batch_sizes_reuse_compiled_buckets(predictor):
    for n in (3, 5, 7, 2):  # all in the batch bucket of 8, the length bucket of 32
        predictor.logits(["a short text"] * n)
    sizes = predictor._logits._cache_size()
    predictor.logits(["another short one"] * 6)
    assert predictor._logits._cache_size() == sizes


def test_export_is_small_self_contained_and_equal(workdir, predictor, tmp_path, devices):
    out = save_model_dir(predictor, tmp_path / "model", stablehlo=True)
    assert {p.name for p in out.iterdir()} == {"model.json", "tokenizer", "params",
                                               "predict.stablehlo"}
    assert json.loads((out / "model.json").read_text())["serving"]["max_length"] == 32
    exported = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    n_params = sum(x.size for x in jax.tree.leaves(predictor.params))
    assert exported < 1.2 * 4 * n_params  # the fp32 parameters, no optimizer moments
    again = mtop_jax.load(out, devices=devices[:1])
    np.testing.assert_array_equal(again.logits(TEXTS), predictor.logits(TEXTS))
    # The StableHLO artifact: same logits without the model code.
    exp = load_stablehlo(out)
    batch = predictor.encode(TEXTS)
    pad = lambda a: np.pad(a, [(0, 0), (0, 32 - a.shape[1])])
    logits = exp.call(*(jnp.asarray(pad(batch[k])) for k in
                        ("input_ids", "attention_mask", "token_type_ids")))
    np.testing.assert_allclose(np.asarray(logits)[:len(TEXTS)], predictor.logits(TEXTS),
                               atol=1e-5)


def test_embed_concatenates_task_representations(predictor):
    feats = predictor.embed(TEXTS)
    n_tasks, hidden = len(predictor.task_names), predictor.spec.encoder.hidden_size
    assert feats.shape == (len(TEXTS), n_tasks * hidden)
    assert np.all(np.abs(feats) <= 1.0)  # tanh pooler


def test_add_task_leaves_existing_tasks_bit_identical(predictor, tmp_path):
    data = tmp_path / "new.jsonl"
    rows = [{"text": f"package number {i} " + ("game" if i % 2 else "library"),
             "kind": "fun" if i % 2 else "work"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    grown = add_task(predictor, data, "kind", steps=30, batch_size=8, learning_rate=0.05)
    assert grown.task_names == (*predictor.task_names, "kind")
    before, after = predictor.logits(TEXTS), grown.logits(TEXTS)
    for t, (_, c) in enumerate(predictor.spec.head_tasks):
        np.testing.assert_array_equal(after[:, t, :c], before[:, t, :c])
    texts = [r["text"] for r in rows]
    accuracy = np.mean([p["kind"]["label"] == r["kind"]
                        for p, r in zip(grown.predict(texts), rows)])
    assert accuracy > 0.9
    shared = [k for k in ("encoder",)]
    for key in shared:
        a = jax.tree.leaves(predictor.params[key])
        b = jax.tree.leaves(grown.params[key])
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    smaller = remove_tasks(grown, ["kind"])
    np.testing.assert_array_equal(smaller.logits(TEXTS), before)


def test_cli_predict_export_embed_and_bad_input(workdir, tmp_path, capsys):
    model = str(tmp_path / "model")
    assert main(["export", "--workdir", str(workdir), "--out", model]) == 0
    assert main(["predict", "--model", model, "--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == TEXTS[:2] and "section" in lines[0]

    good = tmp_path / "in.jsonl"
    good.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    assert main(["predict", "--model", model, "--input", str(good),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(TEXTS)
    assert main(["embed", "--model", model, "--input", str(good),
                 "--output", str(tmp_path / "x.npy")]) == 0
    assert np.load(tmp_path / "x.npy").shape[0] == len(TEXTS)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["predict", "--model", model, "--input", str(empty),
                 "--output", str(tmp_path / "none.jsonl")]) == 0
    assert (tmp_path / "none.jsonl").read_text() == ""

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    capsys.readouterr()
    assert main(["predict", "--model", model, "--input", str(bad),
                 "--output", str(tmp_path / "bad_out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: malformed JSON" in err  # file and line
    assert not (tmp_path / "bad_out.jsonl").exists()
    assert not list(tmp_path.glob(".bad_out*"))


def test_clear_errors_for_wrong_paths_versions_and_tasks(workdir, predictor, tmp_path, capsys):
    with pytest.raises(MtopError, match="no such directory"):
        mtop_jax.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtopError, match="not a mtop-jax workdir or model"):
        mtop_jax.load(tmp_path / "empty")
    old = save_model_dir(predictor, tmp_path / "old")
    spec = json.loads((old / "model.json").read_text())
    spec["format_version"] = 99
    (old / "model.json").write_text(json.dumps(spec))
    with pytest.raises(MtopError, match="format_version 99"):
        mtop_jax.load(old)
    with pytest.raises(MtopError, match="unknown tasks"):
        remove_tasks(predictor, ["no_such_task"])
    assert main(["remove-task", "--model", str(workdir), "--task", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown tasks ['nope']" in capsys.readouterr().err
