"""Config files and overrides: ``file.py:key=value`` args, raw str overrides, and every
config check failing before any data is read."""

from pathlib import Path

import pytest

from mtop_jax.config import load_config, parse_arg
from mtop_jax.errors import ConfigError

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


def test_parse_arg_sets_declared_options_with_their_types():
    arg = parse_arg("mode=shared,steps=7,lr=1,quick", mode="mtop", steps=1, lr=0.5,
                    quick=False, name="x")
    assert (arg.mode, arg.steps, arg.lr, arg.quick, arg.name) == ("shared", 7, 1.0, True, "x")
    assert isinstance(arg.lr, float)
    assert parse_arg("prefix", mode="mtop").mode == "prefix"  # a bare word: the first option
    assert parse_arg("mode=123", mode="mtop").mode == "123"  # str options take the raw text
    assert parse_arg(None, mode="mtop", steps=3) == parse_arg("", mode="mtop", steps=3)
    with pytest.raises(ConfigError, match="'stpes': unknown; this config takes"):
        parse_arg("stpes=3", mode="mtop", steps=1)
    with pytest.raises(ConfigError, match="'many' is not a int"):
        parse_arg("steps=many", steps=1)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_arg("shared,prefix", mode="mtop")


def test_config_file_arg_sets_fields():
    c = load_config(f"{TINY}:mode=shared,steps=5,seed=3")
    assert (c.model.mode, c.train.steps, c.train.seed) == ("shared", 5, 3)
    assert load_config(f"{TINY}:prefix").model.mode == "prefix"
    with pytest.raises(ConfigError, match=r"tiny\.py: config arg 'bogus': unknown"):
        load_config(f"{TINY}:bogus=1")
    demo = TINY.replace("tiny.py", "debian_packages.py")  # make demo's budget, and full's
    assert [load_config(f"{demo}{a}").train.steps for a in ("", ":full", ":full,steps=9",
                                                             ":shared,full")] == [250, 750, 9, 750]


def test_a_str_override_takes_the_raw_text():
    c = load_config(TINY, ["--config.tokenizer=123", "--config.train.test_split=",
                           "--config.model.mode=None"])
    assert c.tokenizer == "123" and c.train.test_split == "" and c.model.mode == "None"
    c = load_config(TINY, ["--config.train.steps=7", "--config.data.buckets=(16, 32)",
                           "--config.data.length_groups=16"])
    assert c.train.steps == 7 and c.data.buckets == (16, 32) and c.data.length_groups == 16


@pytest.mark.parametrize("override, field", [
    ("--config.model.mode=bogus", "model.mode"),
    ("--config.model.pooler=max", "model.pooler"),
    ("--config.optim.schedule=step", "optim.schedule"),
    ("--config.optim.lr_mult.encoder=2.0", None),  # an unknown field: rejected at load
    ("--config.train.stage=adapters", "train.stage"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.train.task_loss=sum", "train.task_loss"),
    ("--config.weighting.method=nope", "weighting"),
    ("--config.encoder=random:huge", "config.encoder"),
    ("--config.mesh.data=3", "mesh"),
])
def test_every_config_check_runs_before_any_data_is_read(override, field, devices,
                                                          monkeypatch, tmp_path):
    """A mistake fails in ``train`` before any file of the data set is opened."""
    from mtop_jax.data import pipeline
    from mtop_jax.training.loop import train

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(pipeline, "load_examples", no_data)
    monkeypatch.setattr("mtop_jax.training.loop.build_dataset", no_data)
    if field is None:
        with pytest.raises(ConfigError, match="has no field 'encoder'"):
            load_config(TINY, [override])
        return
    config = load_config(TINY, [override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(config, tmp_path, devices=devices[:2])
    assert not (tmp_path / "checkpoints").exists()
