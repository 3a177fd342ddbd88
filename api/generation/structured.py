"""Output constraints of a request (response_format, structured_outputs, legacy guided_*) as the
engine's StructuredOutputsParams fields; every constraint is enforced or refused (API workers).

The engine compiles the constraint with xgrammar and refuses what cannot compile (a 400 with the
compiler's message naming the request's field), or what does not compile within its time limit
(a 400 "grammar too complex"); this module only checks shapes and that a request asks for one
constraint.
"""

from __future__ import annotations

from typing import Any

from fornax.api.server.errors import APIError

BACKEND_HEADER = "x-fornax-structured-output-backend"
BACKEND = "xgrammar"  # the only backend; `guided_decoding_backend` is accepted and answered here

_KIND_TYPES: dict[str, tuple[type, ...]] = {
    "json": (str, dict), "regex": (str,), "choice": (list,), "grammar": (str,),
    "json_object": (bool,), "structural_tag": (str, dict),
}
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties")
# accepted and without effect: fornax never falls back to another backend
_IGNORED = ("disable_fallback", "backend")
_LEGACY = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))


def request_constraint(req: Any) -> dict[str, Any] | None:
    """The request's one constraint as StructuredOutputsParams keyword arguments, or None.

    Sources: response_format (json_object, json_schema, structural_tag), structured_outputs
    (vLLM's field) and guided_json/guided_regex/guided_choice/guided_grammar (older vLLM). Two of
    them at once, or an unknown option, is a 400 naming the field. `source` names the field
    for the engine's compile errors (invalid, "grammar too complex"); structured_outputs needs
    none (the engine names structured_outputs.<kind>).
    """
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None:
        constraint = _from_response_format(fmt)
        if constraint is not None:
            found.append(("response_format", {**constraint, "source": "response_format"}))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(req.structured_outputs)))
    for name, kind in _LEGACY:
        value = getattr(req, name, None)
        if value is not None:
            found.append((name, {kind: _checked(kind, value, name), "source": name}))
    if getattr(req, "guided_whitespace_pattern", None) is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported (xgrammar allows any JSON "
                       "whitespace, or none with structured_outputs.disable_any_whitespace)",
                       "guided_whitespace_pattern")
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise APIError(400, f"a request can carry one output constraint, got {names}",
                       found[1][0])
    return found[0][1] if found else None


def backend_headers(constraint: dict[str, Any] | None) -> dict[str, str]:
    """Response headers telling which backend enforced the constraint (whatever was asked)."""
    return {BACKEND_HEADER: BACKEND} if constraint is not None else {}


def _checked(kind: str, value: Any, param: str) -> Any:
    if not isinstance(value, _KIND_TYPES[kind]) or isinstance(value, bool) != (
            kind == "json_object"):
        want = " or ".join("an object" if t is dict else t.__name__ for t in _KIND_TYPES[kind])
        raise APIError(400, f"{param} must be {want}", param)
    if kind == "choice" and isinstance(value, list) and (
            not value or not all(isinstance(c, str) for c in value)):
        raise APIError(400, f"{param} must be a non-empty list of strings", param)
    if kind in ("regex", "grammar") and not value:
        raise APIError(400, f"{param} must not be empty", param)
    return value


def _from_structured_outputs(spec: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in spec if k not in _KIND_TYPES and k not in _OPTIONS
                     and k not in _IGNORED)
    if unknown:
        raise APIError(400, f"structured_outputs does not support {unknown}; it takes one of "
                       f"{list(_KIND_TYPES)} and the options {list(_OPTIONS)}",
                       f"structured_outputs.{unknown[0]}")
    out: dict[str, Any] = {}
    for kind in _KIND_TYPES:
        value = spec.get(kind)
        if value is None or value is False:
            continue
        out[kind] = _checked(kind, value, f"structured_outputs.{kind}")
    if len(out) != 1:
        raise APIError(400, "structured_outputs needs exactly one of " + ", ".join(_KIND_TYPES)
                       + f" (got {sorted(out) or 'none'})", "structured_outputs")
    for option in _OPTIONS:
        value = spec.get(option)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise APIError(400, f"structured_outputs.{option} must be a boolean",
                           f"structured_outputs.{option}")
        out[option] = value
    return out


def _from_response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format.json_schema must be an object with a `schema`",
                           "response_format.json_schema")
        schema = spec.get("schema", spec.get("json_schema"))
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           "response_format.json_schema.schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise APIError(400, "response_format.json_schema.strict must be a boolean",
                           "response_format.json_schema.strict")
        # xgrammar is always strict about properties the schema does not name (strict or not)
        return {"json": schema}
    if kind == "structural_tag":
        return {"structural_tag": _structural_tag(fmt)}
    raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, "
                   "json_schema, structural_tag", "response_format.type")


def _structural_tag(fmt: dict[str, Any]) -> dict[str, Any]:
    """vLLM's two shapes: {"format": {...}} (xgrammar's) or the older {"structures", "triggers"}."""
    if "format" in fmt:
        if not isinstance(fmt["format"], dict):
            raise APIError(400, "response_format.format must be an object",
                           "response_format.format")
        return {"type": "structural_tag", "format": fmt["format"]}
    structures, triggers = fmt.get("structures"), fmt.get("triggers")
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or \
            not all(isinstance(t, str) and t for t in triggers):
        raise APIError(400, "a structural_tag response_format needs `format`, or `structures` "
                       "and `triggers`", "response_format")
    tags = []
    for i, item in enumerate(structures):
        if not isinstance(item, dict) or not isinstance(item.get("begin"), str) or \
                not isinstance(item.get("end"), str):
            raise APIError(400, f"response_format.structures[{i}] needs string `begin` and `end` "
                           "and a `schema`", f"response_format.structures[{i}]")
        schema = item.get("schema", {})
        tags.append({"type": "tag", "begin": item["begin"], "end": item["end"],
                     "content": {"type": "json_schema", "json_schema": schema}})
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}
