"""Variable expansion in provisioning values, by the rules of Grafana's ``provisioning/values``.

Every string value (including strings nested in ``jsonData``) is expanded; keys never are.
``$$`` is a literal ``$``. ``$NAME`` and ``${NAME}`` read the environment (an unset variable
is empty, as in Grafana), ``$__env{NAME}`` too, and ``$__file{path}`` is the file's content
with surrounding whitespace trimmed. Unlike Grafana, a value is expanded exactly once: Grafana
expands ``${NAME}`` and then runs the result through ``os.ExpandEnv`` again, so a password
``Pa$sw0rd`` in ``${PASSWORD}`` loses ``$sw0rd``; here it stays intact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Go's os.Expand: these characters after "$" are one-character names ($1, $?, ...).
_SPECIAL = frozenset("*#$@!?-0123456789")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_PROVIDER = re.compile(r"__([A-Za-z0-9_]+)\{([^}]+)\}")


class ExpansionError(ValueError):
    """A value cannot be expanded; the message says which reference and why."""


@dataclass
class Expander:
    """Expands values against one environment, noting what it read along the way."""

    env: Mapping[str, str]
    base_dir: Path = Path()
    files: set[Path] = field(default_factory=set)
    unset: set[str] = field(default_factory=set)

    def expand(self, value: str) -> str:
        return "$".join(self._expand_part(part) for part in value.split("$$"))

    def _expand_part(self, text: str) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            dollar = text.find("$", i)
            if dollar < 0:
                out.append(text[i:])
                break
            out.append(text[i:dollar])
            value, i = self._reference(text, dollar)
            out.append(value)
        return "".join(out)

    def _reference(self, text: str, dollar: int) -> tuple[str, int]:
        """The value of the reference starting at ``text[dollar] == "$"``, and where it ends."""
        rest = dollar + 1
        if rest >= len(text):
            return "$", rest
        if provider := _PROVIDER.match(text, rest):
            return self._provider(provider.group(1), provider.group(2)), provider.end()
        if text[rest] == "{":
            close = text.find("}", rest)
            if close < 0:
                raise ExpansionError(f"unterminated '${{' in {text!r}")
            if close == rest + 1:
                raise ExpansionError(f"empty '${{}}' in {text!r}")
            return self._env(text[rest + 1 : close]), close + 1
        if text[rest] in _SPECIAL:
            return self._env(text[rest]), rest + 1
        if name := _NAME.match(text, rest):
            return self._env(name.group(0)), name.end()
        return "$", rest

    def _env(self, name: str) -> str:
        if name not in self.env:
            self.unset.add(name)
            return ""
        return self.env[name]

    def _provider(self, name: str, argument: str) -> str:
        if name == "env":
            return self._env(argument)
        if name == "file":
            path = Path(argument)
            if not path.is_absolute():
                path = self.base_dir / path
            self.files.add(path)
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ExpansionError(f"$__file{{{argument}}}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ExpansionError(f"$__file{{{argument}}}: not UTF-8 text") from None
        raise ExpansionError(
            f"$__{name}{{...}} is not supported (only $__env{{}} and $__file{{}} are)"
        )
