"""Matching Grafana's root URL against a manifest's ``rootUrls`` (private signatures)."""

from __future__ import annotations

import posixpath
import re
from urllib.parse import SplitResult, urlsplit

# gobwas/glob, which Grafana uses, is compiled with '/' and '.' as separators: a single '*'
# or '?' never crosses a path segment or a host label.
_SEPARATORS = "/."


class RootURLError(ValueError):
    """A root URL (configured, or listed in a manifest) cannot be parsed."""


def root_url_matches(root_urls: list[str], grafana_root_url: str, *, allow_glob: bool) -> bool:
    """Whether Grafana's root URL is one the manifest was signed for.

    An entry matches on equal scheme, host (with port) and cleaned request URI; for
    ``private-glob`` signatures an entry may also be a glob over the whole URL.
    """
    target = _split(grafana_root_url)
    for spec in root_urls:
        if allow_glob and compile_glob(spec).fullmatch(grafana_root_url):
            return True
        try:
            spec_url = _split(spec)
        except RootURLError:
            # A glob such as https://g[0-9].example.com/ is no URL, but may still match above.
            if allow_glob:
                continue
            raise
        if (
            spec_url.scheme == target.scheme
            and _host(spec_url) == _host(target)
            and _clean(_request_uri(spec_url)) == _clean(_request_uri(target))
        ):
            return True
    return False


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - evaluated for its ValueError on a malformed port
    except ValueError as exc:
        raise RootURLError(f"cannot parse URL {url!r}: {exc}") from exc
    return parts


def _host(url: SplitResult) -> str:
    # Go's URL.Host is the netloc without user info.
    return url.netloc.rpartition("@")[2]


def _request_uri(url: SplitResult) -> str:
    uri = url.path or "/"
    if url.query:
        uri += "?" + url.query
    return uri


def _clean(path: str) -> str:
    """Go's path.Clean: like normpath, but a leading '//' collapses too."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Translate a gobwas/glob pattern (separators '/' and '.') into a regular expression."""
    regex, _ = _translate(pattern, 0, in_group=False)
    return re.compile(regex, re.DOTALL)


def _translate(pattern: str, i: int, *, in_group: bool) -> tuple[str, int]:
    """Translate from ``i`` until the end (or, inside ``{...}``, until ',' or '}')."""
    not_sep = f"[^{re.escape(_SEPARATORS)}]"
    out: list[str] = []
    while i < len(pattern):
        char = pattern[i]
        if in_group and char in ",}":
            return "".join(out), i
        if char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif char == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
            else:
                out.append(f"{not_sep}*")
                i += 1
        elif char == "?":
            out.append(not_sep)
            i += 1
        elif char == "[":
            regex, i = _translate_class(pattern, i)
            out.append(regex)
        elif char == "{":
            regex, i = _translate_group(pattern, i)
            out.append(regex)
        else:
            out.append(re.escape(char))
            i += 1
    if in_group:
        raise RootURLError(f"unclosed '{{' in glob {pattern!r}")
    return "".join(out), i


def _translate_class(pattern: str, start: int) -> tuple[str, int]:
    end = pattern.find("]", start + 1)
    if end == -1:
        raise RootURLError(f"unclosed '[' in glob {pattern!r}")
    body = pattern[start + 1 : end]
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    if not body:
        raise RootURLError(f"empty character class in glob {pattern!r}")
    escaped = "".join("-" if c == "-" else re.escape(c) for c in body)
    return f"[{'^' if negate else ''}{escaped}]", end + 1


def _translate_group(pattern: str, start: int) -> tuple[str, int]:
    alternatives: list[str] = []
    i = start + 1
    while True:
        regex, i = _translate(pattern, i, in_group=True)
        alternatives.append(regex)
        if pattern[i] == "}":
            return f"(?:{'|'.join(alternatives)})", i + 1
        i += 1  # past ','
