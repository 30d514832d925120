"""Reading a channel's config table (`[channels.NAME]` without `type`), naming the channel and key in errors."""

from __future__ import annotations

from typing import Any

from adapters.outputs import OutputOptions
from engine.rules import parse_duration


class ChannelOptions(OutputOptions):
    """`OutputOptions` worded for channels, with durations and listen addresses.

    Each accessor removes its key; `finish()` refuses any key left over, so a misspelt option is an error.
    """

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"channel {self.output!r}: key {key!r} {message}")

    def duration_ms(self, key: str, default: Any = OutputOptions._REQUIRED) -> int:
        """A duration in the rules-file notation ("7d", "1d12h", "500ms") as milliseconds > 0."""
        value = self._take(key, default)
        try:
            ms = parse_duration(value)
        except ValueError as exc:
            raise self.error(key, f"{exc}, not {value!r}") from None
        if ms <= 0:
            raise self.error(key, f"must be a positive duration, not {value!r}")
        return ms

    def listen(self, key: str, default: str) -> tuple[str, int]:
        """A HOST:PORT to listen on; port 0 picks a free port."""
        value = self.string(key, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise self.error(key, f"must be HOST:PORT, not {value!r}")
        return host.strip("[]"), int(port)

    def strings(self, key: str, default: Any = OutputOptions._REQUIRED) -> dict[str, str]:
        """A table of strings (`templates = { welcome = "..." }`)."""
        value = self._take(key, default)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.error(key, f"must be a table of strings, not {value!r}")
        return dict(value)

    def finish(self) -> None:
        if self._left:
            keys = ", ".join(map(repr, sorted(self._left)))
            raise ValueError(f"channel {self.output!r}: unknown key(s) {keys}")
