"""The Ray application's /metrics: every replica's `fornax serve` metrics in one Prometheus text,
each sample labelled `replica="<id>"` (Ray Serve ingress process; plain text, no Ray)."""

from __future__ import annotations

import re

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_sample(line: str, replica: str) -> str:
    """One sample line with `replica="<id>"` as its first label."""
    match = _NAME.match(line)
    if match is None:
        return line
    name, rest = match.group(0), line[match.end():]
    label = f'replica="{_escape(replica)}"'
    if rest.startswith("{"):
        inner = rest[1:]
        return f"{name}{{{label}" + ("," if not inner.startswith("}") else "") + inner
    return f"{name}{{{label}}}{rest}"


def _family(sample: str, families: dict[str, list[str]]) -> str:
    """The family a sample belongs to: its name, or the histogram/summary it is a part of."""
    match = _NAME.match(sample)
    name = match.group(0) if match else sample
    if name in families:
        return name
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created", "_gcount", "_gsum"):
        if name.endswith(suffix) and name[:-len(suffix)] in families:
            return name[:-len(suffix)]
    return name


def merge(texts: list[tuple[str, str]]) -> str:
    """Prometheus texts of several replicas ((replica id, text) each) as one exposition: each
    family's HELP and TYPE once, then every replica's samples of it, each with its replica."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts:
        for raw in text.splitlines():
            line = raw.rstrip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    head = heads.setdefault(parts[2], [])
                    samples.setdefault(parts[2], [])
                    if not any(h.split(None, 2)[1] == parts[1] for h in head):
                        head.append(line)
                continue
            name = _family(line, heads)
            samples.setdefault(name, []).append(label_sample(line, replica))
    out: list[str] = []
    for family, lines in samples.items():
        out += heads.get(family, [])
        out += lines
    return "\n".join(out) + "\n"
