"""Every `vllm serve` flag in `fornax serve`: parsed, grouped as vLLM groups it, checked at start (main).

vLLM's list is data (vllm_serve_flags.json, from vLLM's own parser); what fornax does with each
flag is vllm_flag_status.STATUS. `add_vllm_flags` registers the flags fornax has no code for
(no-op and refused ones) plus vLLM's other spellings of fornax's own flags; `check_vllm_flags`
turns what was given into start-up log lines and exit-2 problems, so no flag is ever silently
ignored. `python -m fornax.api.server.vllm_flags` prints README.md's table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fornax.api.server.vllm_flag_status import STATUS

DATA_PATH = Path(__file__).with_name("vllm_serve_flags.json")
STATUSES = ("implemented", "mapped", "no-op", "refused")
OWN_GROUP_PREFIX = "fornax"  # title prefix of the groups of fornax's own flags
_OFF_TEXTS = ("", "false", "0", "none", "[]", "{}")


@dataclass(frozen=True)
class VllmFlag:
    """One flag of `vllm serve` (its data row) with fornax's status for it."""

    name: str
    aliases: tuple[str, ...]
    negations: tuple[str, ...]
    kind: str  # bool, int, float, str, size, json, json-or-str
    nargs: str | None
    choices: tuple[Any, ...]
    default: Any
    group: str
    status: str
    accept: tuple[str, ...]  # a no-op's accepted values ("off": false/0/empty); () = any value
    note: str

    @property
    def dest(self) -> str:
        """Where argparse keeps a no-op or refused flag's value (never a fornax setting)."""
        return "vllm_" + self.name[2:].replace("-", "_")

    @property
    def negative_spellings(self) -> tuple[str, ...]:
        """Spellings that switch it off: vLLM's `--disable-x` pairs and the `--no-` form."""
        if self.kind != "bool" or not self.negations:
            return self.negations
        no_form = "--no-" + self.name[2:]
        return self.negations + (() if no_form in self.negations else (no_form,))

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases, *self.negative_spellings)


def vllm_source() -> dict[str, Any]:
    """The data file: vLLM's version and commit, its group titles and its flag rows."""
    data: dict[str, Any] = json.loads(DATA_PATH.read_text(encoding="utf-8"))
    return data


def parse_status_table(text: str = STATUS) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """STATUS lines -> {flag name: (status, accepted values, note)}; a malformed line raises."""
    table: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for line in text.strip().splitlines():
        if line.startswith("## "):
            continue
        head, _, note = line.partition(" | ")
        name, status, *rest = head.split()
        if status not in STATUSES or len(rest) > 1 or name in table:
            raise ValueError(f"vllm_flag_status.STATUS: bad line {line!r}")
        accept: tuple[str, ...] = ()
        if rest:
            accept = ("off",) if rest[0] == "off" else tuple(rest[0].lstrip("=").split(","))
        table[name] = (status, accept, note.strip())
    return table


@lru_cache(maxsize=1)
def vllm_flags() -> tuple[VllmFlag, ...]:
    """vLLM's flags in vLLM's order; one without a status line is refused (a test forbids it)."""
    table = parse_status_table()
    out = []
    for row in vllm_source()["flags"]:
        status, accept, note = table.get(row["name"], ("refused", (), "not reviewed yet"))
        out.append(VllmFlag(row["name"], tuple(row.get("aliases", ())),
                            tuple(row.get("negations", ())), row["kind"], row.get("nargs"),
                            tuple(row.get("choices") or ()), row.get("default"), row["group"],
                            status, accept, note))
    return tuple(out)


@lru_cache(maxsize=1)
def _by_spelling() -> dict[str, VllmFlag]:
    return {s: flag for flag in vllm_flags() for s in flag.spellings}


def vllm_flag(spelling: str) -> VllmFlag | None:
    return _by_spelling().get(spelling)


# -- parsing ----------------------------------------------------------------------------------

def choice_type(choices: tuple[Any, ...], aliases: dict[str, str] | None = None
                ) -> Callable[[str], Any]:
    """A value parser taking any case of `choices` (and `aliases`), returning the canonical one;
    others are an argparse error listing the choices."""
    table = {str(c).lower(): c for c in choices}
    table.update({k.lower(): v for k, v in (aliases or {}).items()})

    def parse(text: str) -> Any:
        try:
            return table[str(text).strip().lower()]
        except KeyError:
            shown = ", ".join(str(c) for c in choices)
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {shown})"
                                             ) from None

    parse.__name__ = "choice"
    return parse


def json_value(text: str) -> Any:
    """A JSON value as vLLM's config flags take it; '' or 'None' is none."""
    if text.strip() in ("", "None"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _json_or_str(text: str) -> Any:
    return json_value(text) if text.lstrip().startswith("{") else text


def _size(text: str) -> int:
    from fornax.api.server.args import parse_size  # args imports this module

    return -1 if text.strip().lower() in ("auto", "-1") else parse_size(text)


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """vLLM's optional values: 'None' (or nothing) is none, which is vLLM's default."""
    def optional(text: str) -> Any:
        return None if text.strip() in ("", "None") else parse(text)

    optional.__name__ = getattr(parse, "__name__", "value")  # argparse's error names the type
    return optional


_KIND_TYPES: dict[str, Callable[[str], Any]] = {
    "int": _optional(int), "float": _optional(float), "str": _optional(str),
    "size": _optional(_size), "json": json_value, "json-or-str": _optional(_json_or_str)}


_METAVARS = {"int": "N", "float": "X", "str": "VALUE", "size": "SIZE", "json": "JSON",
             "json-or-str": "JSON"}


def _help(flag: VllmFlag) -> str:
    accepted = ""
    if flag.accept == ("off",):
        accepted = " Accepted only switched off."
    elif flag.accept:
        accepted = f" Accepted only as {', '.join(flag.accept)}."
    elif flag.status == "refused":
        accepted = " (exit 2 when given, unless with vLLM's default value)"
    return f"[{flag.status}] {flag.note}.{accepted}"


def _add_flag(group: Any, flag: VllmFlag) -> None:
    """A no-op or refused flag, parsed as vLLM parses it; not given leaves None."""
    positive = (flag.name, *flag.aliases)
    if flag.kind == "bool":
        group.add_argument(*positive, dest=flag.dest, action="store_const", const=True,
                           default=None, help=_help(flag))
        if flag.negative_spellings:
            group.add_argument(*flag.negative_spellings, dest=flag.dest, action="store_const",
                               const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    kw: dict[str, Any] = {"type": _KIND_TYPES[flag.kind], "metavar": _METAVARS[flag.kind]}
    if flag.choices:
        kw["type"] = choice_type(flag.choices)
        kw["metavar"] = "{" + ",".join(str(c) for c in flag.choices) + "}"
    if flag.nargs == "append":
        kw["action"] = "append"
    elif flag.nargs:
        kw["nargs"] = flag.nargs
    group.add_argument(*positive, dest=flag.dest, default=None, help=_help(flag), **kw)


def _attach_spellings(parser: argparse.ArgumentParser, flag: VllmFlag, group: Any) -> None:
    """vLLM's other spellings of a flag fornax parses itself (`--disable-prefix-caching`, `-asc`)."""
    known = parser._option_string_actions
    action = known[next(s for s in flag.spellings if s in known)]
    for spelling in flag.spellings:
        if spelling in known:
            continue
        if spelling in flag.negative_spellings:
            group.add_argument(spelling, dest=action.dest, action="store_const", const=False,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            action.option_strings = [*action.option_strings, spelling]
            known[spelling] = action


class FlagGroups:
    """`fornax serve --help` groups as vLLM's (Frontend, ModelConfig, ...): a flag added here
    joins the group of its vLLM counterpart, a fornax-only flag the fornax group named by
    `add_argument(..., fornax=...)` ("server", "engine", ...)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.groups: dict[str, Any] = {}
        for title in vllm_source()["groups"]:
            self.groups[title] = parser._optionals if title == "options" else \
                parser.add_argument_group(title)

    def group(self, title: str) -> Any:
        if title not in self.groups:
            self.groups[title] = self.parser.add_argument_group(title)
        return self.groups[title]

    def add_argument(self, *names: str, fornax: str = "server", **kw: Any) -> argparse.Action:
        flag = next((f for n in names if (f := vllm_flag(n)) is not None), None)
        title = flag.group if flag is not None else f"{OWN_GROUP_PREFIX}: {fornax}"
        action: argparse.Action = self.group(title).add_argument(*names, **kw)
        return action

    def adder(self, fornax: str) -> _GroupAdder:
        """An object whose add_argument() routes as above, fornax-only flags to `fornax`."""
        return _GroupAdder(self, fornax)

    def add_vllm_flags(self) -> None:
        """Every vLLM flag the parser lacks (after fornax's own flags were added)."""
        known = self.parser._option_string_actions
        for flag in vllm_flags():
            if any(s in known for s in flag.spellings):
                _attach_spellings(self.parser, flag, self.group(flag.group))
            else:
                _add_flag(self.group(flag.group), flag)


class _GroupAdder:
    def __init__(self, groups: FlagGroups, fornax: str) -> None:
        self.groups, self.fornax = groups, fornax

    def add_argument(self, *names: str, **kw: Any) -> argparse.Action:
        return self.groups.add_argument(*names, fornax=self.fornax, **kw)


# -- checking at start -------------------------------------------------------------------------

def _text(value: Any) -> str:
    """A value as the accepted-values column compares it (no case, 1.0 as 1, lists joined)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value).lower()


def accepts(flag: VllmFlag, value: Any) -> bool:
    """Whether a given value is fine: a no-op's accepted values, a refused flag's vLLM default."""
    if flag.status == "refused":
        return _text(value) == _text(flag.default) or \
            (flag.default in (None, False) and _text(value) in _OFF_TEXTS)
    if flag.accept == ("off",):
        return _text(value) in _OFF_TEXTS
    return not flag.accept or _text(value) in {a.lower() for a in flag.accept}


def check_vllm_flags(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(problems: exit 2, notes: one log line each) for the no-op and refused flags given."""
    problems: list[str] = []
    notes: list[str] = []
    for flag in vllm_flags():
        value = getattr(args, flag.dest, None)
        if value is None or flag.status in ("implemented", "mapped"):
            continue
        shown = f"{flag.name} {json.dumps(value) if not isinstance(value, str) else value}"
        if not accepts(flag, value):
            wanted = (" (accepted only switched off)" if flag.accept == ("off",) else
                      f" (accepted only as {', '.join(flag.accept)})" if flag.accept else "")
            problems.append(f"{shown}: not supported by fornax: {flag.note}{wanted}")
        elif flag.status == "refused":
            notes.append(f"{shown}: vLLM's default, so nothing is asked ({flag.note})")
        else:
            notes.append(f"{shown}: accepted, no effect in fornax: {flag.note}")
    return problems, notes


# -- README ------------------------------------------------------------------------------------

def counts() -> dict[str, int]:
    flags = vllm_flags()
    return {status: sum(f.status == status for f in flags) for status in STATUSES}


def markdown_table() -> str:
    """README.md's table: every `vllm serve` flag with fornax's status, in vLLM's groups."""
    source = vllm_source()
    summary = ", ".join(f"{n} {s}" for s, n in counts().items())
    lines = [f"{len(vllm_flags())} flags of `vllm serve` {source['vllm_version']} "
             f"(commit {source['vllm_commit']}): {summary}.", "",
             "| flag | status | in fornax |", "| --- | --- | --- |"]
    group = None
    for flag in vllm_flags():
        if flag.group != group:
            group = flag.group
            lines.append(f"| **{group}** | | |")
        names = ", ".join(f"`{s}`" for s in flag.spellings)
        status = flag.status
        if flag.accept:
            status += " (only off)" if flag.accept == ("off",) else \
                f" (only {', '.join(flag.accept)})"
        lines.append(f"| {names} | {status} | {flag.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
