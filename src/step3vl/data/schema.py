"""The dataset record schema: the product contract for one line of a dataset shard.

``schemas/dataset.schema.json`` (JSON Schema draft 2020-12) is the single source of truth; this
module loads it from the installed package and checks records against it. The schema fixes shape
and types only; content rules (unique ids, ``<image>`` tags, answers, image safety) live in the
data gate (:mod:`step3vl.data.gate`), which reports both kinds of failure side by side.

``jsonschema`` costs ~80 us per record, which is most of the gate's time on a large dataset. So
:func:`schema_errors` first runs a check compiled from the same schema file for the keywords it
uses (type, enum, required, properties, additionalProperties: false, items, minLength, minItems,
dependentRequired). That check may only say "conforms"; anything it does not accept goes to
``jsonschema``, which has the last word and writes the messages. If the schema ever uses another
keyword, the compiled check is not built and every record goes to ``jsonschema``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

SCHEMA_RESOURCE: Final = "schemas/dataset.schema.json"
# Messages quote the offending value; a 1 MB string must not become a 1 MB error message.
_MAX_MESSAGE_CHARS: Final = 200


def _load_schema() -> dict[str, Any]:
    text = resources.files("step3vl").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


RECORD_SCHEMA: Final[dict[str, Any]] = _load_schema()


@lru_cache(maxsize=1)
def record_validator() -> Validator:
    """A draft 2020-12 validator for :data:`RECORD_SCHEMA` (built once; the schema is checked)."""
    # jsonschema is a hard dependency of great_expectations, so it is always installed with us;
    # it is imported here so that importing this module stays cheap.
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(RECORD_SCHEMA)
    return Draft202012Validator(RECORD_SCHEMA)


# --------------------------------------------------------------------------- compiled fast check

Check = Callable[[Any], bool]
_ANNOTATIONS: Final = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples"})
_TYPES: Final[dict[str, Check]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # Stricter than JSON Schema (which also takes 1.0 and rejects nothing else): a float that is
    # an integer is left to jsonschema, never wrongly accepted here.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class _Unsupported(Exception):
    pass


def _compile(schema: Any) -> Check:
    """A predicate that is True only for instances ``schema`` accepts (it may reject more)."""
    if schema is True or schema == {}:
        return lambda v: True
    if not isinstance(schema, dict):
        raise _Unsupported(repr(schema))
    unknown = set(schema) - _ANNOTATIONS - {
        "type", "enum", "required", "properties", "additionalProperties", "items", "minLength",
        "minItems", "dependentRequired",
    }  # fmt: skip
    if unknown:
        raise _Unsupported(", ".join(sorted(unknown)))
    checks: list[Check] = []
    if "type" in schema:
        if not isinstance(schema["type"], str) or schema["type"] not in _TYPES:
            raise _Unsupported(f"type {schema['type']!r}")
        checks.append(_TYPES[schema["type"]])
    if "enum" in schema:
        # Strings only: Python's 1 == True would let a bool through an integer enum.
        if not all(isinstance(e, str) for e in schema["enum"]):
            raise _Unsupported("non-string enum")
        allowed = frozenset(schema["enum"])
        checks.append(lambda v: isinstance(v, str) and v in allowed)
    if "minLength" in schema:
        n = schema["minLength"]
        checks.append(lambda v: not isinstance(v, str) or len(v) >= n)
    if "minItems" in schema:
        n_items = schema["minItems"]
        checks.append(lambda v: not isinstance(v, list) or len(v) >= n_items)
    if "items" in schema:
        item = _compile(schema["items"])
        checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
    if "required" in schema:
        required = tuple(schema["required"])
        checks.append(lambda v: not isinstance(v, dict) or all(k in v for k in required))
    if "properties" in schema:
        props = {k: _compile(s) for k, s in schema["properties"].items()}
        checks.append(lambda v: not isinstance(v, dict) or all(props[k](v[k]) for k in v if k in props))
    if "additionalProperties" in schema:
        if schema["additionalProperties"] is not False:
            raise _Unsupported("additionalProperties other than false")
        known = frozenset(schema.get("properties", {}))
        checks.append(lambda v: not isinstance(v, dict) or known.issuperset(v))
    if "dependentRequired" in schema:
        deps = {k: tuple(d) for k, d in schema["dependentRequired"].items()}
        checks.append(
            lambda v: not isinstance(v, dict) or all(all(d in v for d in deps[k]) for k in deps if k in v)
        )
    return lambda v: all(check(v) for check in checks)


@lru_cache(maxsize=1)
def fast_check() -> Check | None:
    """The compiled check for :data:`RECORD_SCHEMA`, or None if the schema uses other keywords."""
    try:
        return _compile(RECORD_SCHEMA)
    except _Unsupported:
        return None


def schema_errors(record: Mapping[str, Any], *, limit: int = 3) -> list[str]:
    """Up to ``limit`` readable schema violations of ``record`` (empty when it conforms).

    Each message starts with the JSON path of the offending value, e.g.
    ``messages/1/role: 'bot' is not one of ['system', 'user', 'assistant']``.
    """
    fast = fast_check()
    if fast is not None and fast(record):
        return []
    validator = record_validator()
    errors = sorted(validator.iter_errors(record), key=lambda e: [str(p) for p in e.absolute_path])
    out = []
    for err in errors[:limit]:
        where = "/".join(str(p) for p in err.absolute_path) or "<record>"
        message = err.message
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
        out.append(f"{where}: {message}")
    return out
