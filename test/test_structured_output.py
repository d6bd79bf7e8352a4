"""Regex- and JSON-schema-constrained decoding produces outputs that satisfy the constraint."""

from __future__ import annotations

import json
import re

import pytest

from adrenaline import Engine


@pytest.fixture(scope="module")
def engine(default_model):
    return Engine(default_model, dtype="float32", max_total_tokens=4096)


def test_regex(engine):
    pattern = r"(\+1 )?[0-9]{3}-[0-9]{4}"
    outs = engine.generate(
        ["My phone number is", "Call me at"], {"temperature": 0, "max_new_tokens": 20, "regex": pattern}
    )
    for o in outs:
        assert re.fullmatch(pattern, o["text"]), o["text"]
        assert o["meta_info"]["finish_reason"]["type"] == "stop"


def test_json_schema(engine):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "city": {"type": "string", "enum": ["Paris", "London"]},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a person living in Paris as JSON."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    out = engine.generate(chat, {"temperature": 0, "max_new_tokens": 64, "json_schema": json.dumps(schema)})
    obj = json.loads(out["text"])
    assert set(obj) == {"name", "age", "city"}
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int) and obj["city"] in ("Paris", "London")


def test_sampled_outputs_still_match(engine):
    outs = engine.generate(
        ["Pick a number:"] * 3,
        [
            {"temperature": 1.0, "max_new_tokens": 8, "regex": "[1-9][0-9]?", "sampling_seed": s}
            for s in range(3)
        ],
    )
    assert all(re.fullmatch("[1-9][0-9]?", o["text"]) for o in outs)


def test_invalid_constraints_are_client_errors(engine):
    with pytest.raises(ValueError, match="invalid regex"):
        engine.generate("x", {"regex": "([a-z"})
    with pytest.raises(ValueError, match="invalid json_schema"):
        engine.generate("x", {"json_schema": "{not json"})
