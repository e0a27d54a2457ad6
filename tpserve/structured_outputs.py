"""What a structured-output request asks for: one constraint (a JSON schema, any JSON object, a regex, one of
a list of strings, or a grammar), checked for shape and size on the user's side and carried over the wire as
flat strings. Whether the constraint compiles is the grammar backend's verdict, given on the engine's side
(``tpserve.executor.structured``) and, for the server, before a request is sent (``tpserve.server.structured``).

No torch here, and the grammar backend only when a grammar is asked for: the proxy imports this module."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Bounds (the server's table in docs/server.md has the same): they bound the compile work a request can ask for.
MAX_SPEC_CHARS = 65536  # a JSON schema (as JSON text), a regex or a grammar
MAX_REGEX_CHARS = 4096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
WIRE_CHUNK_CHARS = 1024  # the wire's strings are at most 4 KiB (msgpack bytes): at most 4 bytes a character
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# OpenAI's json_object: a JSON object, nothing more said.
JSON_OBJECT_SCHEMA = '{"type":"object"}'


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of ``json_schema`` (a dict or its JSON text), ``json_object`` (True: any JSON object),
    ``regex``, ``choice`` (a list of strings) or ``grammar`` (Lark, or GBNF/EBNF as llguidance reads them).

    ``any_whitespace``: JSON may hold free whitespace between tokens. Off by default (vLLM's
    ``disable_any_whitespace``), since a weak model given the choice emits spaces until ``max_tokens``.
    Invalid shapes or sizes raise ``ValueError`` naming the field."""

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = False
    # The constraint as (kind, text): what the wire carries and what the engine's grammar cache is keyed by.
    kind: str = field(init=False, repr=False, compare=False, default="")
    spec: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (getattr(self, k) is not None and k != "json_object") or
                 (k == "json_object" and self.json_object is not False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputs: give exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        kind = given[0]
        if not isinstance(self.any_whitespace, bool):
            raise ValueError("StructuredOutputs.any_whitespace: must be a bool")
        if kind == "json_schema":
            spec = self._schema_text(self.json_schema)
        elif kind == "json_object":
            if self.json_object is not True:
                raise ValueError("StructuredOutputs.json_object: must be True")
            spec = JSON_OBJECT_SCHEMA
        elif kind == "regex":
            spec = _text("regex", self.regex, MAX_REGEX_CHARS)
        elif kind == "grammar":
            spec = _text("grammar", self.grammar, MAX_SPEC_CHARS)
        else:
            choices = self.choice
            if isinstance(choices, (str, bytes, dict)) or not hasattr(choices, "__iter__"):
                raise ValueError("StructuredOutputs.choice: must be a list of strings")
            choices = tuple(choices)
            if not 1 <= len(choices) <= MAX_CHOICES:
                raise ValueError(f"StructuredOutputs.choice: 1 to {MAX_CHOICES} strings")
            for c in choices:
                _text("choice", c, MAX_CHOICE_CHARS)
            object.__setattr__(self, "choice", choices)
            spec = json.dumps(list(choices), ensure_ascii=False)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "spec", spec)

    @staticmethod
    def _schema_text(schema: object) -> str:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"StructuredOutputs.json_schema: not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("StructuredOutputs.json_schema: must be a JSON object (a dict or its text)")
        try:  # compact text, in the schema's own key order (properties come out in that order)
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"StructuredOutputs.json_schema: not JSON data: {e}") from None
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"StructuredOutputs.json_schema: {len(text)} characters as JSON, at most "
                             f"{MAX_SPEC_CHARS}")
        return text

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredOutputs) and self.key == other.key

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on (the engine's cache key)."""
        return (self.kind, self.spec, self.any_whitespace)

    def to_wire(self) -> dict[str, Any]:
        """Flat fields for the wire's sampling-parameter dict: strings of at most 4 KiB, lists one deep."""
        chunks = [self.spec[i : i + WIRE_CHUNK_CHARS] for i in range(0, len(self.spec), WIRE_CHUNK_CHARS)]
        return {"structured_kind": self.kind, "structured_spec": chunks, "structured_any_whitespace":
                self.any_whitespace}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StructuredOutputs | None:
        """From the wire's fields (None when absent); anything malformed raises ``ValueError``."""
        kind = d.get("structured_kind")
        if kind is None:
            return None
        chunks = d.get("structured_spec")
        if kind not in KINDS or not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
            raise ValueError("SamplingParams.structured: malformed on the wire")
        if sum(map(len, chunks)) > MAX_SPEC_CHARS:
            raise ValueError(f"SamplingParams.structured: more than {MAX_SPEC_CHARS} characters")
        spec = "".join(chunks)
        ws = d.get("structured_any_whitespace", False)
        if kind == "json_object":
            return cls(json_object=True, any_whitespace=ws)
        if kind == "choice":
            try:
                choices = json.loads(spec)
            except ValueError:
                raise ValueError("SamplingParams.structured: malformed choices on the wire") from None
            return cls(choice=choices, any_whitespace=ws)
        return cls(**{kind: spec}, any_whitespace=ws)

    @classmethod
    def coerce(cls, v: object) -> StructuredOutputs:
        """A ``StructuredOutputs``, or a dict of its fields (``{"json_schema": {...}}``)."""
        if isinstance(v, cls):
            return v
        if isinstance(v, dict):
            unknown = set(v) - {*KINDS, "any_whitespace"}
            if unknown:
                raise ValueError(f"SamplingParams.structured: unknown field {sorted(unknown)[0]!r}")
            return cls(**v)
        raise ValueError("SamplingParams.structured: must be a StructuredOutputs or a dict such as "
                         "{'json_schema': {...}}")


def llguidance_grammar(so: StructuredOutputs) -> str:
    """The constraint as an llguidance grammar (not yet checked: ``LLMatcher.validate_grammar`` or a matcher
    reports its errors). JSON has no free whitespace unless ``any_whitespace``."""
    import llguidance
    from llguidance import LLMatcher

    if so.kind in ("json_schema", "json_object"):
        return LLMatcher.grammar_from_json_schema(so.spec, defaults={"whitespace_flexible": so.any_whitespace})
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        return llguidance.grammar_from("choice", so.spec)
    return llguidance.grammar_from("grammar", so.spec)  # Lark, or GBNF / EBNF converted to Lark


def check_grammar(so: StructuredOutputs) -> str | None:
    """The backend's reason why the constraint cannot compile, or None (no tokenizer needed: the server asks
    this before sending a request)."""
    from llguidance import LLMatcher

    try:
        why = LLMatcher.validate_grammar(llguidance_grammar(so))
    except Exception as e:  # noqa: BLE001 - the backend's reason, for that request alone
        return str(e).strip() or type(e).__name__
    return why.strip() or None


def _text(name: str, v: object, limit: int) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"StructuredOutputs.{name}: must be a non-empty string")
    if len(v) > limit:
        raise ValueError(f"StructuredOutputs.{name}: {len(v)} characters, at most {limit}")
    return v
