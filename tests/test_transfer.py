"""benchmarks/transfer.py (issue 21): --quick trains its runs through the trainer, scores
every representation on the target task, and adding a source task as one more prefix
leaves the existing representations bit-identical."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import transfer  # noqa: E402


@pytest.mark.slow  # about a minute (three trainer runs): make test-all
def test_transfer_quick(tmp_path, capsys):
    result = transfer.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| representation/model" in out and "TARGET" in out

    saved = json.loads((tmp_path / "transfer.json").read_text())
    assert (saved["sources"], saved["targets"]) == (["role", "implemented_in", "interface"],
                                                    ["section"])
    assert saved["add_tasks"] == ["interface"]
    assert set(saved["runs"]) == {"prefixes-seed0", "shared-seed0", "add-interface-seed0"}
    # the prefixes (and the added one) read the text through the conditional pooler
    assert saved["prefix_overrides"] == ["--config.model.pooler=conditional"]
    for name in ("prefixes-seed0", "add-interface-seed0"):
        config = json.loads((Path(saved["runs"][name]["workdir"]) / "config.json").read_text())
        assert config["model"]["pooler"] == "conditional", name
    for name, run in saved["runs"].items():
        assert (Path(run["workdir"]) / "checkpoints" / str(run["steps"])).is_dir(), name
        assert run["wall_s"] > 0
    # the training texts: those labelled for a source (or for the added task)
    sources = (tmp_path / "data" / "train-sources.jsonl").read_text().splitlines()
    assert 0 < len(sources) < 256
    assert all(any(json.loads(line)["labels"][t] is not None
                   for t in ("role", "implemented_in", "interface")) for line in sources)
    added = saved["update"]["added"][0]
    assert added["steps"] == max(1, -(-4 * added["texts"] // len(sources)))

    # every representation x downstream model, plus TF-IDF; widths N x H and H
    got = {(r["representation"], r["model"]) for r in saved["results"]}
    assert got == {(rep, m) for rep in transfer.REPRESENTATIONS for m in transfer.MODELS} | {
        ("tfidf", "lr")}
    assert saved["widths"] == {"pretrained-cls": 64, "pretrained-mean": 64, "prefixes": 3 * 64,
                               "shared": 64}
    for r in saved["results"]:
        for split in ("test", "validation"):
            assert 0 <= r[split]["section/accuracy"] <= 1
            assert r[split]["section/count"] == saved["results"][-1][split]["section/count"] > 0
    assert result["results"][0]["test"] == saved["results"][0]["test"]

    # update cost: FLOPs and wall time against retraining shared; bit-identity
    shared = saved["update"]["shared"]
    assert shared["flops"] == shared["flops_per_step"] * shared["steps"] > 0
    assert added["flops_ratio"] == pytest.approx(added["flops"] / shared["flops"])
    (identity,) = saved["update"]["identity"]
    assert identity["old_tasks"] == ["implemented_in", "role"]
    assert identity["old_columns_identical"] and identity["max_abs_diff"] == 0
    targets = {c["target"]: c for c in saved["targets_checked"]}
    assert targets["existing representations bit-identical after adding a task (1 tasks)"][
        "pass"]
    assert sum("FLOPs / retraining shared" in t for t in targets) == 1
    assert sum(t.startswith("prefixes/") for t in targets) == 8
    assert (tmp_path / "transfer.png").stat().st_size > 10_000
    # how far apart the three source prefixes' states are, after each of the two layers
    (spread,) = saved["task_spread"]
    assert spread["recipe"] == "prefixes" and spread["seed"] == 0
    assert len(spread["task_spread"]["layers"]) == 2 and spread["task_spread"]["features"] > 0
    assert "prefixes/mtop/0: after layers" in out


def test_prefix_overrides_name_the_runs_unless_default():
    """The default overrides (the conditional pooler) keep the plain run names; any other,
    the config's own pooler included, trains runs of their own."""
    parse = lambda *a: transfer.parse_args(["--out", "/tmp/x", *a])
    assert parse().prefix_flags == ("--config.model.pooler=conditional",)
    assert parse().prefix_tag == ""
    own, deeper = parse("--prefix-overrides", ""), parse("--prefix-overrides",
                                                         "model.num_prompts=4")
    assert own.prefix_flags == () and own.prefix_tag.startswith("-")
    assert deeper.prefix_tag.startswith("-") and deeper.prefix_tag != own.prefix_tag
    with pytest.raises(SystemExit, match="expected key=value"):
        parse("--prefix-overrides", "model.pooler")


def test_with_task_appends_a_prefix_and_refuses_another_backbone():
    """Joining prefixes: the old tasks' columns of ``embed`` stay bit-identical (from two
    tasks up: from one task to two, XLA on CPU differs in the last bit, 3e-8 to 6e-8 on
    this tiny model, seen 2026-12-03), and only on the same frozen backbone."""
    import numpy as np
    from flax import nnx

    from mtop_jax.data.tasks import TaskSpec
    from mtop_jax.models.multitask import ModelConfig, MultiTaskModel
    from mtop_jax.models.pretrained import load_tokenizer
    from mtop_jax.models.spec import ModelSpec
    from mtop_jax.serving.predictor import Predictor
    from mtop_jax.training.setup import random_preset

    tokenizer = load_tokenizer()
    encoder = random_preset("random:tiny").replace(vocab_size=len(tokenizer))
    cfg = ModelConfig(mode="mtop", num_prompts=1, pooler="conditional")

    def predictor(names, seed=0):
        spec = ModelSpec(encoder, cfg, tuple(TaskSpec(n, labels=("a", "b")) for n in names))
        model = MultiTaskModel(encoder, cfg, spec.head_tasks, rngs=nnx.Rngs(seed))
        return Predictor(spec, nnx.state(model, nnx.Param), tokenizer, max_length=16)

    texts = ["a text", "another one", "a longer text about compression libraries"]
    new = predictor(["new"], seed=0)
    for old_tasks in (["a"], ["a", "b"]):
        old = predictor(old_tasks)
        joined = transfer.with_task(old, new)
        assert joined.task_names == (*old_tasks, "new")
        before, after = old.embed(texts), joined.embed(texts)
        width = before.shape[1]
        if len(old_tasks) > 1:
            assert np.array_equal(after[:, :width], before)
        np.testing.assert_allclose(after[:, :width], before, atol=1e-6)
    with pytest.raises(SystemExit, match="not the same frozen backbone"):
        transfer.with_task(old, predictor(["new"], seed=1))


@pytest.mark.parametrize("regression", [False, True])
def test_the_mlp_fits_both_kinds_of_target(regression):
    """The regression target of debian-packages-dev (``log2_installed_kb``) goes through
    the MLP regressor (its first positional argument is ``loss`` in scikit-learn 1.9),
    the classification targets through the classifier; both learn a learnable task."""
    import numpy as np

    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    f = lambda a: a[:, 0] * 3 + 5 if regression else (a[:, 0] > 0).astype(int)
    model = transfer.fit_mlp(regression, x, f(x), xv, f(xv), seed=0)
    predicted = model.predict(xv)
    if regression:
        assert np.corrcoef(predicted, f(xv))[0, 1] > 0.9
    else:
        assert np.mean(predicted == f(xv)) > 0.9
