"""A small, strict multipart/form-data parser for uploads (API workers).

The whole body is already in memory (size-limited by the caller); parts are sliced out of it
without copies of the file data beyond one `bytes` slice. Anything malformed — no boundary, a
missing closing delimiter (a truncated upload), a part without a name, too many parts — raises
`MultipartError` with a message for the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

MAX_PARTS = 256
MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body is not valid multipart/form-data."""


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"form field {self.name!r} is not valid UTF-8 text") from None


def parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="a;b"; filename*=UTF-8''x.wav' -> ('form-data', {'name': 'a;b', ...})."""
    items: list[str] = []
    current, quoted, escaped = [], False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    main = items[0].strip().lower()
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    for item in items[1:]:
        key, sep, val = item.strip().partition("=")
        if not sep:
            continue
        key, val = key.strip().lower(), val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        if key.endswith("*"):  # RFC 5987: charset'lang'percent-encoded; wins over the plain one
            charset, _, rest = val.partition("'")
            _, _, encoded = rest.partition("'")
            try:
                extended[key[:-1]] = unquote(encoded, encoding=charset or "utf-8",
                                             errors="strict")
            except (LookupError, UnicodeDecodeError):
                continue
        else:
            params.setdefault(key, val)
    params.update(extended)
    return main, params


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data content type, or MultipartError."""
    if not content_type:
        raise MultipartError("the request has no Content-Type; send multipart/form-data")
    kind, params = parse_header_params(content_type)
    if kind != "multipart/form-data":
        raise MultipartError(f"the request body must be multipart/form-data, not {kind!r}")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise MultipartError("the multipart Content-Type has no valid boundary")
    return boundary.encode("latin-1", errors="replace")


def parse_multipart(body: bytes, content_type: str | None) -> list[Part]:
    """Every part of a multipart/form-data body, in order."""
    boundary = boundary_of(content_type)
    delim = b"--" + boundary
    if body.startswith(delim):
        pos = len(delim)
    else:
        first = body.find(b"\r\n" + delim)
        if first < 0:
            raise MultipartError("the multipart body does not contain its boundary")
        pos = first + 2 + len(delim)
    parts: list[Part] = []
    sep = b"\r\n" + delim
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise MultipartError("the multipart body ends early (truncated upload?)")
        pos = line_end + 2
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0 or head_end - pos > MAX_HEADER_BYTES:
            if body.startswith(b"\r\n", pos):
                head_end = pos - 2  # a part without headers
            else:
                raise MultipartError("a multipart part has no end of headers (truncated?)")
        headers = _headers(body[pos:head_end])
        data_start = head_end + 4
        data_end = body.find(sep, data_start)
        if data_end < 0:
            raise MultipartError("the multipart body has no closing boundary (truncated upload?)")
        disposition, params = parse_header_params(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in params:
            raise MultipartError("every multipart part needs 'Content-Disposition: form-data; "
                                 "name=...'")
        parts.append(Part(params["name"], body[data_start:data_end], params.get("filename"),
                          headers.get("content-type")))
        if len(parts) > MAX_PARTS:
            raise MultipartError(f"too many form fields (at most {MAX_PARTS})")
        pos = data_end + len(sep)


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line.strip():
            continue
        key, sep, value = line.decode("utf-8", errors="replace").partition(":")
        if not sep:
            raise MultipartError("a multipart part has a malformed header line")
        out[key.strip().lower()] = value.strip()
    return out
