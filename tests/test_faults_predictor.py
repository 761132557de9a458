"""Fault injection: the predictor under fuzzed input, and 10k texts in one call.

Property: whatever ``texts`` holds (empty, whitespace-only, huge, binary-ish,
control characters, mixed scripts, lone surrogates, non-strings, zero texts),
``Predictor.predict`` either answers one result per text (labels from the task,
finite probabilities summing to 1, finite logits, the same logits for a text
alone as inside any batch) or raises an ``MtopError`` whose message names the
offending text's index. Any other exception is a bug. With 10k texts in one call
the texts are tokenised and run one batch at a time: every array the tokenizer
and the jitted forward see has at most ``batch_size`` rows, and the traced peak
memory (tracemalloc, which sees numpy's buffers) stays within a bound set by one
batch and the output, far below what tokenising all texts at once takes.
A load either gives back the saved model (model.json's tasks and labels, the
serving length, the parameters bit for bit, its predictions) or, for a bad
``batch_size``, raises an ``MtopError`` naming it.

The model is a random-weight tiny model, exported and loaded back (no
training), so the module's setup takes a few seconds.

``MTOP_FUZZ_EXAMPLES`` (default 30) sets hypothesis' ``max_examples`` for the
main properties (the huge-text, whole-argument and load properties run a fraction),
so a long run is one variable away:

    MTOP_FUZZ_EXAMPLES=300 .venv/bin/pytest -q tests/test_faults_predictor.py

The ``slow`` test (50k texts; million-character texts) is left out by
``pytest -m "not slow"``.
"""

import json
import math
import os
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtop_jax
from mtop_jax.cli import main
from mtop_jax.data.tasks import TaskSpec
from mtop_jax.errors import DataError, MtopError
from mtop_jax.models.config import PRESETS
from mtop_jax.models.multitask import ModelConfig, MultiTaskModel
from mtop_jax.models.pretrained import load_tokenizer
from mtop_jax.models.spec import ModelSpec
from mtop_jax.serving.export import save_model_dir
from mtop_jax.serving.predictor import Predictor, read_texts

EXAMPLES = max(1, int(os.environ.get("MTOP_FUZZ_EXAMPLES", "30")))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
LOADS = settings(FUZZ, max_examples=max(1, EXAMPLES // 6))  # a load restores the params
BATCH = 8  # the fuzzed predictor's batch size: a list of up to 40 texts is several batches
TASKS = (TaskSpec("topic", "classification", ("admin", "devel", "games")),
         TaskSpec("lang", "classification", ("c", "python")),
         TaskSpec("score", "regression"))


@pytest.fixture(scope="module")
def saved(devices):
    """The random-weight tiny 3-task model (serving length 32) that ``model_dir`` holds."""
    tokenizer = load_tokenizer()
    spec = ModelSpec(PRESETS["tiny"].replace(vocab_size=len(tokenizer)),
                     ModelConfig(num_prompts=2), TASKS)
    _, params, _ = nnx.split(MultiTaskModel(spec.encoder, spec.model, spec.head_tasks,
                                            rngs=nnx.Rngs(0)), nnx.Param, ...)
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    return Predictor(spec, jax.device_put(params, sharding), tokenizer, max_length=32,
                     sharding=sharding)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, saved):
    """``saved``, exported: no training."""
    return save_model_dir(saved, tmp_path_factory.mktemp("fuzz") / "model")


@pytest.fixture(scope="module")
def reference(saved):
    """The saved model's logits for fixed texts, computed before the export."""
    return saved.logits(REFERENCE_TEXTS)


REFERENCE_TEXTS = ["GNU C library: shared libraries", "", "文本 " * 40]


def check_is_the_saved_model(loaded: Predictor, model_dir, saved: Predictor, reference,
                             batch_size: int):
    """``loaded`` holds what was saved: tasks and labels of model.json, serving length,
    parameters, and it predicts as the saved model did."""
    written = json.loads((model_dir / "model.json").read_text())
    assert [t.to_dict() for t in loaded.spec.tasks] == written["tasks"] == [
        t.to_dict() for t in TASKS]
    assert loaded.task_names == tuple(t["name"] for t in written["tasks"])
    assert loaded.spec == saved.spec
    assert loaded.max_length == written["serving"]["max_length"] == 32
    assert loaded.step is None  # an export has no training step
    assert loaded.batch_size == batch_size
    flat, expected = nnx.to_flat_state(loaded.params), nnx.to_flat_state(saved.params)
    assert [tuple(p) for p, _ in flat] == [tuple(p) for p, _ in expected]
    for (path, got), (_, want) in zip(flat, expected, strict=True):
        got, want = got.get_value(), want.get_value()
        assert got.dtype == want.dtype, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    logits = loaded.logits(REFERENCE_TEXTS)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-6)
    assert loaded.predict(REFERENCE_TEXTS) == loaded.format(logits)
    assert [r["topic"]["label"] for r in loaded.format(logits)] == [
        r["topic"]["label"] for r in saved.format(reference)]


@pytest.fixture(scope="module")
def predictor(model_dir, devices):
    return mtop_jax.load(model_dir, devices=devices[:1], batch_size=BATCH)


# ---------------------------------------------------------------------- strategies

WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2003\u200a\u2028\u2029" \
             "\u202f\u205f\u3000"
ODD = "\x00\x01\x07\x08\x1b\x7f\x9f\u00ad\u034f\u061c\u200b\u200c\u200d\u200e\u200f\u202a" \
      "\u202e\u2066\u2069\ufe0f\ufeff\ufff9\ufffc\ufffd\ufffe\uffff\U000e0001\U000f0000" \
      "\U0010ffff"
RANGES = [(0x20, 0x7E), (0xC0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
          (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF),
          (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xE0FF),
          (0xFB00, 0xFDFF), (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF),
          (0x20000, 0x2A6DF)]
MIXED = st.one_of(*[st.characters(min_codepoint=a, max_codepoint=b) for a, b in RANGES],
                  st.sampled_from(ODD + WHITESPACE),
                  st.characters(exclude_categories=("Cs",)))  # no surrogates

mixed_text = st.text(MIXED, max_size=80)
valid_text = st.one_of(
    st.just(""),
    st.text(st.sampled_from(WHITESPACE), min_size=1, max_size=40),
    st.text(st.sampled_from(ODD), max_size=40),
    mixed_text,
    st.text(max_size=40),  # hypothesis' own unicode text
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),  # NUL and C1 controls
    st.builds(lambda w, n: " ".join([w] * n), st.text(MIXED, min_size=1, max_size=12),
              st.integers(1, 200)),  # longer than the serving length
)
huge_text = st.builds(lambda s, n: (s * (n // len(s) + 1))[:n],
                      st.text(MIXED, min_size=1, max_size=12), st.integers(50_000, 200_000))
# Invalid items: the predictor must refuse these with a DataError naming the index.
lone_surrogate = st.builds(lambda a, s, b: a + s + b, st.text(max_size=10),
                           st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                           st.text(max_size=10))
surrogate_escaped = st.binary(min_size=1, max_size=50).map(
    lambda b: (b + b"\xff").decode("utf-8", "surrogateescape"))  # always a \udcff at least
not_a_string = st.sampled_from([None, b"bytes", bytearray(b"x"), 0, 7, 1.5, float("nan"),
                                ["a list"], ("a", "tuple"), {"text": "x"}, np.int64(3)])
invalid_item = st.one_of(lone_surrogate, surrogate_escaped, not_a_string)


def is_valid(item) -> bool:
    if not isinstance(item, str):
        return False
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_answers(predictor: Predictor, texts, results, logits):
    assert len(results) == len(texts) == len(logits)
    assert np.all(np.isfinite(logits))
    for r in results:
        assert list(r) == list(predictor.task_names)
        for task in predictor.spec.tasks:
            if task.is_regression:
                assert math.isfinite(r[task.name]["value"])
                continue
            answer = r[task.name]
            assert answer["label"] in task.labels
            assert answer["top_k"] == [[answer["label"], answer["score"]]]  # top_k=1
            assert math.isfinite(answer["score"]) and 1 / task.num_classes <= answer[
                "score"] <= 1 + 1e-9
    full = predictor.format(logits, top_k=None)
    for r in full:
        for task in predictor.spec.tasks:
            if task.is_regression:
                continue
            pairs = r[task.name]["top_k"]
            assert sorted(lab for lab, _ in pairs) == sorted(task.labels)
            scores = [s for _, s in pairs]
            assert all(math.isfinite(s) and 0 <= s <= 1 for s in scores)
            assert scores == sorted(scores, reverse=True)
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)
            assert r[task.name]["label"] == pairs[0][0]


# ---------------------------------------------------------------------- properties


@FUZZ
@given(texts=st.lists(valid_text, max_size=40))
def test_valid_texts_are_answered_alike_alone_and_in_any_batch(predictor, texts):
    logits = predictor.logits(texts)
    check_answers(predictor, texts, predictor.predict(texts), logits)
    np.testing.assert_array_equal(predictor.logits(texts), logits)  # deterministic
    reordered = predictor.logits(texts[::-1])[::-1]
    np.testing.assert_allclose(reordered, logits, atol=1e-5)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(predictor.logits([text])[0], logits[i], atol=1e-5,
                                   err_msg=f"text {i} {text[:40]!r}")


@FEW
@given(texts=st.lists(st.one_of(huge_text, valid_text), min_size=1, max_size=4),
       where=st.integers(0, 3))
def test_huge_texts_are_truncated_and_answered(predictor, texts, where):
    texts.insert(where % (len(texts) + 1), "a short one")
    logits = predictor.logits(texts)
    check_answers(predictor, texts, predictor.format(logits), logits)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(predictor.logits([text])[0], logits[i], atol=1e-5)


@FUZZ
@given(texts=st.lists(st.one_of(valid_text, valid_text, valid_text, invalid_item),
                      max_size=30))
def test_any_item_is_answered_or_refused_with_its_index(predictor, texts):
    bad = [i for i, t in enumerate(texts) if not is_valid(t)]
    try:
        results = predictor.predict(texts)
    except MtopError as e:
        assert isinstance(e, DataError)
        assert bad, f"refused valid texts: {e}"
        assert f"text {bad[0]}:" in str(e)
        for method in (predictor.logits, predictor.embed, predictor.tokenize):
            with pytest.raises(DataError, match=f"text {bad[0]}:"):
                method(texts)
        return
    assert not bad, f"answered invalid items {bad}"
    check_answers(predictor, texts, results, predictor.logits(texts))


@FEW
@given(arg=st.one_of(
    valid_text,  # a bare str: refused, not split into characters
    st.binary(max_size=20), st.none(), st.integers(), st.floats(),
    st.lists(valid_text, max_size=5).map(tuple),
    st.lists(valid_text, max_size=5).map(lambda x: (t for t in x)),  # a generator
    st.lists(valid_text, max_size=5).map(lambda x: np.array(x, dtype=object)),
    st.lists(valid_text, min_size=1, max_size=5).map(np.array),  # np.str_ items
    st.dictionaries(st.text(max_size=3), valid_text, max_size=3),  # refused: not its keys
    st.sets(st.text(max_size=3), max_size=3),  # refused: no order
))
def test_any_argument_is_answered_or_refused(predictor, arg):
    try:
        results = predictor.predict(arg)
    except MtopError as e:
        assert isinstance(e, DataError) and str(e).startswith(("texts:", "text 0:")), e
        return
    assert isinstance(arg, (tuple, np.ndarray)) or hasattr(arg, "__next__")
    assert all(isinstance(r, dict) for r in results)


def test_named_edge_cases(predictor, model_dir):
    texts = ["", " ", "\x00", "\x00" * 1000, "\ufeff", "\u200b" * 50, "e\u0301" * 500,
             "👩‍👩‍👧‍👦" * 30, "مرحبا بالعالم שלום", "Ǳ\u0345ΐ", "İstanbul ﬁ ß", "\U0010ffff",
             "word " * 10_000, "文本" * 100_000]
    logits = predictor.logits(texts)
    check_answers(predictor, texts, predictor.predict(texts), logits)
    assert predictor.logits([]).shape == (0, len(TASKS), 3)
    assert predictor.embed([]).shape == (0, len(TASKS) * predictor.spec.encoder.hidden_size)
    assert predictor.predict([]) == []
    empty = predictor.tokenize([])  # one padding row, as any batch pads
    assert {k: v.shape for k, v in empty.items()} == dict.fromkeys(empty, (1, 16))
    for bad, where in ((["ok", "\ud800"], "text 1: not valid Unicode"),
                       (["ok"] * 20 + [b"x"], "text 20: expected a string, got bytes"),
                       (["ok"] * 9 + [None], "text 9: expected a string, got NoneType"),
                       ("a text", "single str")):
        with pytest.raises(DataError, match=where):
            predictor.predict(bad)
    with pytest.raises(MtopError, match="batch_size"):
        mtop_jax.load(model_dir, batch_size=0)


def test_loaded_predictor_is_the_saved_model(predictor, model_dir, saved, reference):
    check_is_the_saved_model(predictor, model_dir, saved, reference, BATCH)


@LOADS
@given(batch_size=st.one_of(st.integers(-2, 40), st.sampled_from(
    [True, False, 1.5, 8.0, "8", None, np.int64(3), 2**40])))
def test_load_succeeds_with_the_saved_model_or_refuses_the_batch_size(
        model_dir, saved, reference, devices, batch_size):
    valid = (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
             and batch_size >= 1)
    try:
        loaded = mtop_jax.load(model_dir, devices=devices[:1], batch_size=batch_size)
    except MtopError as e:
        assert not valid, f"refused batch_size {batch_size!r}: {e}"
        assert "batch_size" in str(e)
        return
    assert valid, f"loaded with batch_size {batch_size!r}"
    check_is_the_saved_model(loaded, model_dir, saved, reference, int(batch_size))


@FUZZ
@given(lines=st.lists(st.text(MIXED.filter(lambda c: c not in "\r\n"), max_size=30),
                      max_size=20),
       crlf=st.booleans())
def test_read_texts_keeps_one_text_per_line(tmp_path, lines, crlf):
    path = tmp_path / "in.txt"
    path.write_bytes("".join(x + ("\r\n" if crlf else "\n") for x in lines).encode("utf-8"))
    expected = list(lines)
    if expected:
        expected[0] = expected[0].removeprefix("\ufeff")
    assert read_texts(path) == expected


def test_read_texts_names_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"fine\nstill fine\n\x00\xff\xfe binary\n")
    with pytest.raises(DataError, match=r"bin.txt:3: not UTF-8"):
        read_texts(path)


# ---------------------------------------------------------------------- 10k texts


class _Spy:
    """Records the rows of every call, then delegates."""

    def __init__(self, fn, rows):
        self.fn, self.rows, self.calls = fn, rows, []

    def __call__(self, *args, **kwargs):
        self.calls.append(self.rows(*args))
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def traced_peak(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def corpus(n: int) -> list[str]:
    """Texts of at least the serving length, so every batch is full width."""
    return [f"{i} a package of shared libraries and tools for the desktop " * 3
            for i in range(n)]


def test_10k_texts_run_one_batch_at_a_time_in_bounded_memory(model_dir, devices, saved,
                                                             reference):
    predictor = mtop_jax.load(model_dir, devices=devices[:1])  # batch_size 32
    check_is_the_saved_model(predictor, model_dir, saved, reference, 32)
    n, size = 10_000, predictor.batch_size
    texts = corpus(n)
    predictor.logits(texts[:2 * size])  # compile outside the measurement
    one_batch, _ = traced_peak(lambda: predictor.logits(texts[:size]))
    tokenizer = predictor.tokenizer = _Spy(predictor.tokenizer, lambda t, **_: len(t))
    batches, forward = predictor.batches, []

    def spied_batches(texts):  # what the forward pass is fed, batch by batch
        for count, batch in batches(texts):
            forward.append(batch["input_ids"].shape[0])
            yield count, batch

    predictor.batches = spied_batches
    peak, logits = traced_peak(lambda: predictor.logits(texts))
    assert logits.shape == (n, len(TASKS), 3) and np.all(np.isfinite(logits))
    assert max(tokenizer.calls) == max(forward) == size
    assert len(forward) == len(tokenizer.calls) == math.ceil(n / size)
    # The output (and the per-batch pieces it is concatenated from) plus a few batches;
    # nothing proportional to the 10k tokenised texts.
    bound = 3 * logits.nbytes + 16 * one_batch
    all_at_once, _ = traced_peak(lambda: predictor.tokenize(texts))
    print(f"\n10k texts: peak {peak / 2**20:.2f} MiB (output {logits.nbytes / 2**20:.2f} MiB, "
          f"one batch {one_batch / 2**10:.0f} KiB, bound {bound / 2**20:.2f} MiB); "
          f"tokenising all at once: {all_at_once / 2**20:.1f} MiB")
    assert peak < bound
    assert all_at_once > 2 * bound  # the bound would catch tokenising everything at once


def test_cli_predicts_a_10k_line_file(model_dir, tmp_path, capsys):
    odd = ["", " \t ", "\x00nul", "line\u2028separator", "next\x85line", "form\x0cfeed",
           "مرحبا", "文本", "👩‍👩‍👧‍👦", "e\u0301", "x" * 5000]
    texts = [odd[i % len(odd)] if i % 3 else f"package {i} for the desktop"
             for i in range(10_000)]
    source = tmp_path / "in.txt"
    source.write_bytes(("\ufeff" + "\r\n".join(texts) + "\n").encode("utf-8"))
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(model_dir), "--input", str(source),
                 "--output", str(out), "--batch-size", "64"]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 10_001
    rows = [json.loads(x) for x in lines[:-1]]
    assert [r["text"] for r in rows] == texts
    assert all(r["predictions"]["topic"]["label"] in TASKS[0].labels for r in rows)
    # Bytes that are not UTF-8, and a lone surrogate from argv: one-line errors, exit 2.
    source.write_bytes(b"fine\n\xff\xfe\x00binary\n")
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), "--input", str(source),
                 "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "in.txt:2: not UTF-8" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_dir), "--text", "ok",
                 "--text", b"\xff".decode("utf-8", "surrogateescape")]) == 2
    assert "text 1: not valid Unicode" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_dir), "--text", "ok", "--batch-size", "0"]) == 2


@pytest.mark.slow
def test_50k_texts_and_megabyte_texts(model_dir, devices):
    """5x the texts, the same bound: memory beyond the output does not grow with n."""
    predictor = mtop_jax.load(model_dir, devices=devices[:1])
    texts = corpus(50_000)
    predictor.logits(texts[:64])
    one_batch, _ = traced_peak(lambda: predictor.logits(texts[:predictor.batch_size]))
    peak, logits = traced_peak(lambda: predictor.logits(texts))
    assert logits.shape[0] == 50_000 and np.all(np.isfinite(logits))
    assert peak < 3 * logits.nbytes + 16 * one_batch
    huge = ["文本" * 500_000, "word " * 200_000, "\x00" * 1_000_000, "😀" * 1_000_000]
    logits = predictor.logits(huge)
    check_answers(predictor, huge, predictor.format(logits), logits)
