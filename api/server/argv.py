"""vLLM's command-line conventions for `fornax serve`, applied before argparse (main process).

`vllm serve` launch lines rely on its FlexibleArgumentParser; the same conventions here:
- `--config FILE.yaml`: flags from a YAML mapping (keys with dashes or underscores, `model:` too);
  a flag given on the command line wins over the file's;
- underscores in flag names (`--max_model_len 4096`);
- `-O3`, `-O 3`, `-O=3` for `--optimization-level 3`;
- `--help=ModelConfig` (one group's flags), `--help=cache` (flags whose name holds the word);
- dotted keys of JSON flags: `--compilation-config.mode 0`, `-cc.cudagraph_capture_sizes+ 1,2`,
  gathered into one JSON object per flag (after any whole JSON value, which they then replace).
Enum values in any case and the `--no-`/`--disable-` forms are the parser's (vllm_flags.py).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]


class ArgvError(Exception):
    """A launch line that cannot be read (exit 2; the message names the flag or the file)."""


class HelpText(Exception):
    """`--help=GROUP` or `--help=WORD` (vLLM's help search): the text to print, exit 0."""


def _help_for(parser: argparse.ArgumentParser, query: str) -> str:
    """One group's flags (`--help=ModelConfig`), or every flag whose name holds the word."""
    query = query.strip().lower().replace("_", "-")
    if query == "all":
        return parser.format_help()
    formatter = parser._get_formatter()
    groups = [g for g in parser._action_groups if (g.title or "").lower() == query]
    actions = [a for g in groups for a in g._group_actions] or [
        a for a in parser._actions if any(query in o.lower() for o in a.option_strings)]
    if not actions:
        titles = ", ".join(g.title or "" for g in parser._action_groups if g._group_actions)
        return f"no group or flag matches {query!r}; groups: {titles}\n"
    formatter.start_section(groups[0].title if groups else f"flags matching {query!r}")
    formatter.add_arguments(actions)
    formatter.end_section()
    return formatter.format_help()


_O_FORM = re.compile(r"^-O=?(.+)$")


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (`serve`) of a parser with subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def load_config_file(path: str) -> dict[str, Any]:
    """The mapping a `--config` YAML file holds, keys as written (ArgvError naming the file when
    it cannot be read or is not a mapping). Issue #22 adds a `models:` list here."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ArgvError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ArgvError(f"--config {path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ArgvError(f"--config {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgvError(f"--config {path}: a mapping of flag names to values is expected, "
                        f"got {type(data).__name__}")
    return data


def _off_spelling(key: str, options: dict[str, argparse.Action]) -> str | None:
    swapped = (key.replace("enable-", "disable-", 1) if key.startswith("enable-") else
               key.replace("disable-", "enable-", 1) if key.startswith("disable-") else None)
    for spelling in (f"--no-{key}", f"--{swapped}" if swapped else ""):
        if spelling in options and options[spelling].dest == options[f"--{key}"].dest:
            return spelling
    return None


def config_file_args(path: str, options: dict[str, argparse.Action],
                     skip_dests: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """A --config file's flags as command-line words, except those whose setting (`dest`) is in
    `skip_dests`; an unknown key is an ArgvError naming it."""
    words: list[str] = []
    for raw_key, value in load_config_file(path).items():
        key = str(raw_key).lstrip("-").replace("_", "-")
        flag = f"--{key}"
        action = options.get(flag)
        if action is None or key in ("config", "help"):
            raise ArgvError(f"--config {path}: unknown key {raw_key!r} (not a fornax serve flag)")
        if action.dest in skip_dests or value is None:
            continue
        switch = action.nargs == 0
        if isinstance(value, bool) and switch:
            if value:
                words.append(flag)
            elif off := _off_spelling(key, options):
                words.append(off)
            elif action.default not in (None, False):
                raise ArgvError(f"--config {path}: {raw_key}: false has no off form")
        elif isinstance(value, list) and isinstance(action, argparse._AppendAction):
            for item in value:
                words += [flag, _word(item)]
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            words += [flag, *(_word(item) for item in value)] if value else []
        else:
            words += [flag, _word(value)]
    return words


def _word(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)  # YAML dates and timestamps as their text
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _canonical(argv: list[str]) -> list[str]:
    """Underscores to dashes in flag names (not in values, not after a dotted key's first dot)
    and the -O forms."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word.startswith("--") and len(word) > 2:
            name, eq, value = word.partition("=")
            head, dot, rest = name.partition(".")
            out.append(head.replace("_", "-") + dot + rest + eq + value)
        elif (match := _O_FORM.match(word)) and not word.startswith("-O."):
            out += ["--optimization-level", match.group(1)]
        elif word == "-O" and i + 1 < len(argv) and argv[i + 1] in ("0", "1", "2", "3"):
            out.append("--optimization-level")
        else:
            out.append(word)
    return out


def _dotted_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        from fornax.api.server.args import parse_size  # args imports vllm_flags, not this

        try:
            return parse_size(text)
        except argparse.ArgumentTypeError:
            return text


def _merge(target: dict[str, Any], keys: list[str], value: Any, append: bool) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ArgvError(f"dotted key {'.'.join(keys)}: {key} is not an object")
    if append:
        current = target.setdefault(keys[-1], [])
        if not isinstance(current, list):
            raise ArgvError(f"dotted key {'.'.join(keys)}+: {keys[-1]} is not a list")
        current += value if isinstance(value, list) else [value]
    else:
        target[keys[-1]] = value


def _gather_dotted(argv: list[str], options: dict[str, argparse.Action]) -> list[str]:
    """`--compilation-config.mode 0`, `-cc.x=1`, `-cc.sizes+ 1,2` -> one JSON word per flag."""
    out: list[str] = []
    gathered: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, value = word.partition("=")
        flag, dot, path = name.partition(".")
        if not (word.startswith("-") and dot and flag in options and path):
            out.append(word)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ArgvError(f"{name}: a value is expected")
            value = argv[i + 1]
            i += 1
        i += 1
        append = path.endswith("+")
        keys = path.rstrip("+").split(".")
        parsed = [_dotted_value(v) for v in value.split(",")] if append else _dotted_value(value)
        canonical = options[flag].option_strings[0]
        _merge(gathered.setdefault(canonical, {}), keys, parsed, append)
    for flag, obj in gathered.items():
        out += [flag, json.dumps(obj)]
    return out


def _given_dests(argv: list[str], options: dict[str, argparse.Action]) -> set[str]:
    dests = set()
    for word in argv:
        if word.startswith("-"):
            action = options.get(word.partition("=")[0])
            if action is not None:
                dests.add(action.dest)
    return dests


def normalize_serve_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`fornax serve`'s arguments with vLLM's conventions resolved into plain argparse words."""
    options = parser._option_string_actions
    for word in argv:
        if word.startswith("--help="):
            raise HelpText(_help_for(parser, word.partition("=")[2]))
    words = _gather_dotted(_canonical(list(argv)), options)
    configs = [i for i, w in enumerate(words) if w == "--config" or w.startswith("--config=")]
    if len(configs) > 1:
        raise ArgvError("--config: give one file")
    if not configs:
        return words
    at = configs[0]
    if words[at] == "--config":
        if at + 1 >= len(words):
            raise ArgvError("--config: a YAML file is expected")
        path, rest = words[at + 1], words[:at] + words[at + 2:]
    else:
        path, rest = words[at].partition("=")[2], words[:at] + words[at + 1:]
    from_file = _gather_dotted(config_file_args(path, options, _given_dests(rest, options)),
                               options)
    # after a leading positional MODEL, so that a file's list flag cannot swallow it
    lead = 1 if rest and not rest[0].startswith("-") else 0
    return rest[:lead] + from_file + rest[lead:]
