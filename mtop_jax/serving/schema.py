"""The JSON of ``POST /v1/predict``: a request body read into texts, tasks and top_k, or
a :class:`RequestError` with the HTTP status and a message naming the field.

Body: ``{"texts": [str, ...], "tasks": [str, ...] | null, "top_k": int | null}``; only
``texts`` is required. ``top_k`` defaults to 1, ``null`` asks for every class.
Answer: ``{"model", "step", "predictions": [{task: {"label", "score", "top_k"} |
{"value"}}, ...]}``, a prediction per text in order (``Predictor.predict``'s shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mtop_jax.errors import DataError

FIELDS = ("texts", "tasks", "top_k")


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class PredictRequest:
    texts: list[str]
    tasks: tuple[int, ...]  # indices into the model's tasks, in the order asked
    top_k: int | None


def parse_request(body: bytes, predictor: Any, *, max_texts: int) -> PredictRequest:
    """``body`` checked against the schema and the model's tasks; 400 or 413 otherwise."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"body: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"body: malformed JSON ({str(e).splitlines()[0][:200]})") \
            from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body: expected a JSON object with {FIELDS[0]!r}, got "
                                f"{_json_type(data)}")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise RequestError(400, f"body: unknown field {unknown[0][:100]!r}; expected "
                                f"{list(FIELDS)}")
    if "texts" not in data:
        raise RequestError(400, "texts: required (a list of strings)")
    texts = data["texts"]
    if not isinstance(texts, list):
        raise RequestError(400, f"texts: expected a list of strings, got {_json_type(texts)}")
    if len(texts) > max_texts:
        raise RequestError(413, f"texts: {len(texts)} texts, over the limit of {max_texts} "
                                "a request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RequestError(400, f"texts[{i}]: expected a string, got {_json_type(t)}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(400, f"texts[{i}]: not valid Unicode (lone surrogate at "
                                        f"character {e.start})") from None
    try:
        tasks, top_k = predictor.check_request(data.get("tasks"), data.get("top_k", 1))
    except DataError as e:
        raise RequestError(400, str(e)) from None
    return PredictRequest(texts, tasks, top_k)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
