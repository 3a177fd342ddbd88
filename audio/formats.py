"""Subtitle and text renderings of transcription segments: text, srt, vtt (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TEXT_FORMATS = ("text", "srt", "vtt")
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def format_timestamp(seconds: float, decimal: str = ".", always_hours: bool = False) -> str:
    """12.5 -> '00:00:12.500' (srt uses ',' as the decimal mark and always shows hours)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    head = f"{hours:02d}:" if always_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_srt(segments: Sequence[Any]) -> str:
    blocks = []
    for i, seg in enumerate(segments, start=1):
        start = format_timestamp(seg.start, ",", always_hours=True)
        end = format_timestamp(seg.end, ",", always_hours=True)
        blocks.append(f"{i}\n{start} --> {end}\n{seg.text.strip().replace('-->', '->')}\n")
    return "\n".join(blocks)


def to_vtt(segments: Sequence[Any]) -> str:
    lines = ["WEBVTT", ""]
    for seg in segments:
        lines.append(f"{format_timestamp(seg.start, always_hours=True)} --> "
                     f"{format_timestamp(seg.end, always_hours=True)}")
        lines.append(seg.text.strip().replace("-->", "->"))
        lines.append("")
    return "\n".join(lines)


def render_text(fmt: str, text: str, segments: Sequence[Any]) -> tuple[str, str]:
    """(body, content type) of the plain-text formats."""
    if fmt == "srt":
        return to_srt(segments), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(segments), "text/vtt; charset=utf-8"
    return text + "\n", "text/plain; charset=utf-8"
