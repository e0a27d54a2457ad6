"""Structured output in the HTTP API: OpenAI's ``response_format`` and vLLM's ``structured_outputs`` and
``guided_*`` fields into one ``StructuredOutputs``, checked by the grammar backend before anything is sent,
so an invalid schema, regex or grammar is a 400 naming its field with the backend's reason (the engine would
end the request with the same reason)."""

from __future__ import annotations

from tpserve.server.protocol import APIError, SamplingFields
from tpserve.structured_outputs import StructuredOutputs, check_grammar


def structured_from(req: SamplingFields) -> StructuredOutputs | None:
    """The request's one constraint, or None; a 400 naming the field when two are given or one is invalid."""
    given: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
        given.append(("response_format", {"json_schema": rf.json_schema.schema_}))
    so = req.structured_outputs
    if so is not None:
        fields = {k: v for k, v in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                    ("grammar", so.grammar)) if v is not None}
        if so.json_object:
            fields["json_object"] = True
        if so.disable_any_whitespace is False:
            fields["any_whitespace"] = True
        given.append(("structured_outputs", fields))
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            given.append((name, {kind: value}))
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"give one structured-output constraint, not {' and '.join(n for n, _ in given)}",
                       given[1][0])
    name, fields = given[0]
    try:
        constraint = StructuredOutputs(**fields)
    except ValueError as e:
        raise APIError(400, f"{name}: {e}", name) from None
    why = check_grammar(constraint)
    if why is not None:
        raise APIError(400, f"{name}: invalid {constraint.kind}: {why}", name)
    return constraint
