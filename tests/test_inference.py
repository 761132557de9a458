"""Serving: load anywhere, predict all tasks in one pass, export, embed, add/remove a task."""

import contextlib
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtop_jax
from mtop_jax.cli import main
from mtop_jax.errors import MtopError
from mtop_jax.serving.export import load_stablehlo, save_model_dir
from mtop_jax.serving.task_edit import add_task, remove_tasks

ROOT = Path(__file__).parents[1]
TEXTS = ["GNU C library: shared libraries", "Python bindings for the GTK toolkit",
         "", "a daemon that serves web pages over HTTP " * 20, "ünïcödé テキスト 文本"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, stdout) of ``mtop-jax train``: a tiny model with deep prompts on all 8
    devices (data x fsdp x tensor = 2 x 2 x 2), evaluated on the test split at the end."""
    wd = tmp_path_factory.mktemp("inference") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                     str(wd), "--config.train.steps=3", "--config.train.eval_split=",
                     "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                     "--config.model.prompt_depth=deep"]) == 0
    return wd, out.getvalue()


@pytest.fixture(scope="module")
def workdir(trained):
    return trained[0]


def test_cli_train_prints_test_metrics_and_predictions_then_eval_reads_the_workdir(
        trained, tmp_path, capsys):
    workdir, out = trained
    assert "== test split, step 3" in out and "predictions of all 4 tasks" in out
    assert main(["eval", "--workdir", str(workdir), "--split", "validation"]) == 0
    assert "== validation split, step 3" in capsys.readouterr().out
    # the final test evaluation's predictions, text by text; eval writes the same ones
    assert main(["eval", "--workdir", str(workdir), "--split", "test",
                 "--predictions", str(tmp_path / "test.npz")]) == 0
    trained_preds = np.load(workdir / "predictions-test.npz")
    again = np.load(tmp_path / "test.npz")
    for key in ("predictions", "labels", "tasks"):
        np.testing.assert_array_equal(again[key], trained_preds[key])
    assert again["predictions"].shape == (len(again["labels"]), 4)
    assert main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "not a training workdir" in capsys.readouterr().err


@pytest.fixture(scope="module")
def predictor(workdir, devices):
    return mtop_jax.load(workdir, devices=devices[:1])


def test_trained_on_8_devices_predicts_the_same_on_1(workdir, predictor, devices):
    from mtop_jax.models.spec import abstract_model, placeholder_rest, read_model_spec
    from mtop_jax.parallel.sharding import DEFAULT_RULES, make_mesh, state_shardings
    from mtop_jax.training.checkpoints import Checkpoints

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    graphdef, abstract, rest = nnx.split(abstract_model(read_model_spec(workdir),
                                                        eval_mode=True), nnx.Param, ...)
    target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          abstract, state_shardings(abstract, mesh, DEFAULT_RULES))
    checkpoints = Checkpoints(workdir, read_only=True)
    params = checkpoints.restore_params(checkpoints.latest_step(), target)
    checkpoints.close()
    batch = predictor.tokenize(TEXTS[:2])
    sharded = jax.jit(lambda p, r, *a: nnx.merge(graphdef, p, r).logits(*a))(
        params, placeholder_rest(rest), batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"])
    assert params["encoder"]["layers"][0]["ffn"]["intermediate"]["kernel"].get_value(
    ).sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(predictor.logits(TEXTS[:2]), np.asarray(sharded)[:2], atol=1e-5)
    assert predictor.step == 3


def test_predict_answers_every_task_with_distributions(predictor):
    results = predictor.predict(TEXTS, top_k=None)
    assert len(results) == len(TEXTS)
    for r in results:
        assert list(r) == list(predictor.task_names)
        for task in predictor.spec.tasks:
            pairs = r[task.name]["top_k"]
            assert sorted(lab for lab, _ in pairs) == sorted(task.labels)
            assert sum(s for _, s in pairs) == pytest.approx(1.0, abs=1e-5)
            assert [s for _, s in pairs] == sorted((s for _, s in pairs), reverse=True)
            assert [r[task.name]["label"], r[task.name]["score"]] == pairs[0]
            assert r[task.name]["label"] == max(pairs, key=lambda x: x[1])[0]
    # A subset of tasks, in the asked order; top_k cut to the k most probable.
    first, last = predictor.task_names[0], predictor.task_names[-1]
    some = predictor.predict(TEXTS, tasks=[last, first], top_k=2)
    assert [list(r) for r in some] == [[last, first]] * len(TEXTS)
    for r, full in zip(some, results):
        assert r[first]["top_k"] == full[first]["top_k"][:2]
    for bad, field in (({"tasks": ["nope"]}, "tasks: unknown tasks"),
                       ({"tasks": "section"}, "tasks: expected a list"),
                       ({"tasks": []}, "tasks: expected distinct"),
                       ({"top_k": 0}, "top_k"), ({"top_k": True}, "top_k"),
                       ({"top_k": "3"}, "top_k")):
        with pytest.raises(MtopError, match=field):
            predictor.predict(TEXTS, **bad)


class Lowerings:
    """Counts jitted programs lowered to XLA (a new trace and compile, or a persistent
    cache read) while active, from ``jax.monitoring`` events."""

    EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __init__(self):
        self.active, self.count = False, 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == self.EVENT:
            self.count += 1

    def during(self, fn) -> int:
        self.active, self.count = True, 0
        try:
            fn()
        finally:
            self.active = False
        return self.count


@pytest.fixture(scope="module")
def lowerings():
    counter = Lowerings()
    jax.monitoring.register_event_duration_secs_listener(counter)
    return counter


def test_new_batch_sizes_reuse_compiled_buckets(predictor, lowerings):
    # all in the batch bucket of 8 and one length bucket
    shapes = {predictor.tokenize(["a short text"] * n)["input_ids"].shape for n in (2, 3, 5, 6, 7)}
    assert shapes == {(8, 16)}
    for n in (3, 5, 7, 2):
        predictor.logits(["a short text"] * n)
    assert lowerings.during(lambda: predictor.logits(["another short one"] * 6)) == 0
    predictor.embed(["another short one"] * 6)
    assert lowerings.during(lambda: predictor.embed(["short"] * 4)) == 0
    # The counter sees a new program, so the zeros above can fail.
    assert lowerings.during(lambda: jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))) == 1


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
    batch = predictor.tokenize(TEXTS)
    pad = lambda a: np.pad(a, [(0, 0), (0, 32 - a.shape[1])])
    logits = exp.call(*(jnp.asarray(pad(batch[k])) for k in
                        ("input_ids", "attention_mask", "token_type_ids")))
    np.testing.assert_allclose(np.asarray(logits)[:len(TEXTS)], predictor.logits(TEXTS),
                               atol=1e-5)


def features(model, batch) -> np.ndarray:
    """[B, N, H] the model's pooled h_t (its public ``features``), jitted here."""
    return np.asarray(nnx.jit(lambda m, *a: m.features(*a))(
        model, *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask",
                                                 "token_type_ids"))))


def test_embed_is_every_tasks_pooled_features_in_task_order(predictor):
    feats = predictor.embed(TEXTS)
    names, hidden = predictor.task_names, predictor.spec.encoder.hidden_size
    n, n_tasks = len(TEXTS), len(names)
    assert feats.shape == (n, n_tasks * hidden) and feats.dtype == np.float32
    slices = {name: feats[:, t * hidden:(t + 1) * hidden] for t, name in enumerate(names)}
    # The model's own pooled h_t, on the same padded batch: slice t is task t's.
    batch = predictor.tokenize(TEXTS)
    model = nnx.merge(predictor.graphdef, predictor.params, predictor.rest)
    h = features(model, batch)[:n]
    for t, name in enumerate(names):
        np.testing.assert_allclose(slices[name], h[:, t], atol=1e-6, err_msg=name)
    for a, b in zip(names, names[1:]):  # distinct per task, so the order check can fail
        assert not np.allclose(slices[a], slices[b], atol=1e-3), (a, b)
    # A model serving one (not the first) task alone gives that task's slice.
    alone = features(model.select_tasks([names[2]]), batch)[:n, 0]
    np.testing.assert_allclose(slices[names[2]], alone, atol=1e-6)
    # The heads read exactly these representations.
    logits = np.asarray(model.heads(jnp.asarray(feats.reshape(n, n_tasks, hidden))))
    np.testing.assert_allclose(logits, predictor.logits(TEXTS), atol=1e-6)

    # Removing a task: the other tasks keep their parameters bit for bit and their slices,
    # in the new order. Not bitwise for the slices: with 3 tasks instead of 4 XLA:CPU
    # compiles other loops (so does a batch of 5 instead of 8) and sums in another order,
    # a few ulps (4.5e-8 measured); a task leaking into another would be orders larger.
    # With the same number of tasks it is bitwise (test_add_task_... below).
    smaller = remove_tasks(predictor, [names[1]])
    kept = [t for t in range(n_tasks) if t != 1]
    assert smaller.task_names == tuple(names[t] for t in kept)
    for (path, before), (_, after) in zip(nnx.to_flat_state(predictor.params),
                                          nnx.to_flat_state(smaller.params), strict=True):
        before, after = np.asarray(before.get_value()), np.asarray(after.get_value())
        if before.shape != after.shape:  # per-task: a slice on the leading task axis
            before = before[kept][..., :after.shape[-1]]
        np.testing.assert_array_equal(after, before, err_msg="/".join(map(str, path)))
    rest = smaller.embed(TEXTS)
    assert rest.shape == (n, (n_tasks - 1) * hidden)
    for t, name in enumerate(smaller.task_names):
        np.testing.assert_allclose(rest[:, t * hidden:(t + 1) * hidden], slices[name],
                                   rtol=0, atol=2e-7, err_msg=name)


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
    # Embeddings too, bit for bit: the added task's slice comes last, the others' are
    # unchanged, and removing it gives back the original embedding.
    original = predictor.embed(TEXTS)
    np.testing.assert_array_equal(grown.embed(TEXTS)[:, :original.shape[1]], original)
    np.testing.assert_array_equal(smaller.embed(TEXTS), original)


def test_cli_predict_export_embed_and_bad_input(workdir, tmp_path, capsys):
    model = str(tmp_path / "model")
    assert main(["export", "--workdir", str(workdir), "--out", model]) == 0
    assert main(["predict", "--model", model, "--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == TEXTS[:2] and "section" in lines[0]["predictions"]
    assert lines == [{"text": t, "predictions": p} for t, p in
                     zip(TEXTS[:2], mtop_jax.load(model).predict(TEXTS[:2]))]

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


def test_predictions_of_a_regression_task_are_in_its_target_units():
    """The head predicts standardised units; ``predict`` answers output * sd + mean."""
    from types import SimpleNamespace

    from mtop_jax.data.tasks import TaskSpec
    from mtop_jax.serving.predictor import Predictor

    spec = SimpleNamespace(tasks=(TaskSpec("size", "regression", target_mean=8.0,
                                           target_std=3.0),
                                  TaskSpec("kind", labels=("a", "b"))))
    logits = np.array([[[0.5, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [2.0, 0.0]]], np.float32)
    out = Predictor.format(SimpleNamespace(spec=spec), logits)
    assert [o["size"]["value"] for o in out] == [9.5, 5.0]
    assert [o["kind"]["label"] for o in out] == ["b", "a"]


def assert_same_answers(got, want, atol: float = 1e-5):
    """Equal JSON answers, scores to ``atol`` (another device split sums in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for k in want:
            assert_same_answers(got[k], want[k], atol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_answers(g, w, atol)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=atol)
    else:
        assert got == want


def test_cli_predict_reads_stdin_writes_stdout_passes_ids_and_prints_no_warnings(
        workdir, predictor, tmp_path, capsys, caplog, monkeypatch):
    """``... | mtop-jax predict --model M | jq``: a text a line in, a JSON line out, the
    server's shape; ids passed through; a workdir's read-only checkpoints warn nothing."""
    import logging

    caplog.set_level(logging.WARNING)
    texts = [TEXTS[0], "", TEXTS[4]]  # a blank line is an empty text
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        "\n".join(texts).encode()), encoding="utf-8"))
    tasks = list(predictor.task_names[::-2])
    args = [a for t in tasks for a in ("--task", t)]
    assert main(["predict", "--model", str(workdir), "--top-k", "2", *args]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines == [{"text": t, "predictions": p} for t, p in
                     zip(texts, predictor.predict(texts, tasks=tasks, top_k=2), strict=True)]
    assert [r.getMessage() for r in caplog.records] == [] and "WARNING" not in err
    # --cpu-devices 2: each batch's rows split over two CPU devices, the same answers.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        "\n".join(texts).encode()), encoding="utf-8"))
    assert main(["predict", "--model", str(workdir), "--top-k", "2", "--cpu-devices", "2",
                 *args]) == 0
    split = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert_same_answers(split, lines)

    records = tmp_path / "in.jsonl"
    uids = [7, "u1", 2.5, True, "u4"]  # passed through as they are
    records.write_text("\n".join(json.dumps({"uid": u, "text": t, "section": "x"})
                                 for u, t in zip(uids, TEXTS)))
    assert main(["predict", "--model", str(workdir), "--input", str(records),
                 "--id-field", "uid", "--top-k", "all", "--output", "-"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["uid"] for x in lines] == uids
    assert [x["text"] for x in lines] == TEXTS  # a task may be named "text": not echoed over
    assert [x["predictions"] for x in lines] == predictor.predict(TEXTS, top_k=None)
    for bad, message in ((["--id-field", "nope"], "id field 'nope' is missing"),
                         (["--task", "nope"], "tasks: unknown tasks ['nope']"),
                         (["--id-field", "text"], "--id-field 'text'")):
        assert main(["predict", "--model", str(workdir), "--input", str(records), *bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(workdir), "--text", "x", "--top-k", "0"])
