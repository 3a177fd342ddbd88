"""Print `vllm serve`'s flags as api/server/vllm_serve_flags.json rows (run where vllm is installed).

Usage: VLLM_TARGET_DEVICE=cpu python tools/dump_vllm_serve_flags.py > rows.json; then replace the
"flags" list, the version and the commit in api/server/vllm_serve_flags.json and give every new
flag a status in api/server/vllm_flag_status.py (tests/unit/test_vllm_flags.py names the missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

_KINDS = {"int": "int", "float": "float", "str": "str", "loads": "json", "parse_dataclass": "json",
          "union_dict_and_str": "json-or-str", "human_readable_int": "size",
          "human_readable_int_or_auto": "size", "parse_reasoning_parser": "str", "<lambda>": "str",
          None: "str"}


def _inner_name(parse: Any) -> str | None:
    """vLLM wraps value parsers in closures (optional_type, parse_type): the innermost name."""
    name = getattr(parse, "__name__", None)
    while name in ("_optional_type", "_parse_type") and parse.__closure__:
        parse = parse.__closure__[0].cell_contents
        name = getattr(parse, "__name__", None)
    return name


def _plain(value: Any) -> Any:
    if value is argparse.SUPPRESS:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return _plain(getattr(value, "value", None))  # an enum member; a config object: None


def rows() -> dict[str, Any]:
    import vllm
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    flags = []
    for group in parser._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            negative = set(getattr(action, "negative_option_strings", ()) or ())
            spellings = [o for o in action.option_strings if o not in negative]
            name = next(o for o in spellings if o.startswith("--"))
            switch = isinstance(action, (argparse._StoreTrueAction,
                                         argparse.BooleanOptionalAction))
            row: dict[str, Any] = {"name": name}
            if aliases := [o for o in spellings if o != name]:
                row["aliases"] = aliases
            if negations := [o for o in action.option_strings if o in negative]:
                row["negations"] = negations
            row["kind"] = "bool" if switch else _KINDS.get(_inner_name(action.type), "str")
            if isinstance(action, argparse._AppendAction):
                row["nargs"] = "append"
            elif action.nargs not in (None, 0):
                row["nargs"] = action.nargs
            if action.choices:
                row["choices"] = [c for c in _plain(list(action.choices)) if c is not None]
            row["default"] = _plain(action.default)
            row["group"] = group.title
            flags.append(row)
    try:
        from vllm._version import __commit_id__ as commit
    except ImportError:
        commit = None
    return {"vllm_version": vllm.__version__, "vllm_commit": commit, "flags": flags}


if __name__ == "__main__":
    json.dump(rows(), sys.stdout, indent=1)
    sys.stdout.write("\n")
