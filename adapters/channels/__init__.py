"""Channel adapters (SPEC section 7) and the registry that finds them by name.

A channel type is the name of an entry point in the `kairos.channels` group whose value is a
`Channel` subclass (`adapters.channels.base`).  Kairos registers its built-in channels the same way
(pyproject.toml), and also knows them by name here, so a source checkout that was never installed
still finds them.  A third party ships a package with its own entry point and names it in
`[channels.NAME] type = "..."`; nothing in Kairos changes.  docs/channels.md says how.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from adapters.channels.base import Channel

ENTRY_POINT_GROUP = "kairos.channels"

# The built-in channels, as their entry points in pyproject.toml name them.
BUILTIN_CHANNELS: dict[str, str] = {
    "sms": "adapters.channels.sms:SmsChannel",
    "mms": "adapters.channels.mms:MmsChannel",
    "portal": "adapters.channels.portal:PortalChannel",
    "crm": "adapters.channels.crm:CrmChannel",
    "file": "adapters.channels.files:FileChannel",
    "stdout": "adapters.channels.files:StdoutChannel",
}


def channel_kinds() -> dict[str, str]:
    """Every known channel type -> "module:Class", built-ins and installed plug-ins.

    A plug-in may not take a built-in's name: a config that says `type = "sms"` must not mean a
    different class depending on what happens to be installed.
    """
    kinds = dict(BUILTIN_CHANNELS)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        known = kinds.get(point.name)
        if known is not None and known != point.value:
            raise ValueError(
                f"channel type {point.name!r} is registered twice: {known} and {point.value} "
                f"(entry point group {ENTRY_POINT_GROUP!r}); uninstall one of them"
            )
        kinds[point.name] = point.value
    return kinds


def load_channel_class(kind: str) -> type[Channel]:
    """The `Channel` subclass registered as `kind`; ValueError naming the known types otherwise."""
    kinds = channel_kinds()
    target = kinds.get(kind)
    if target is None:
        known = ", ".join(map(repr, sorted(kinds)))
        raise ValueError(
            f"unknown channel type {kind!r}; known types: {known} (a plug-in registers more in the "
            f"{ENTRY_POINT_GROUP!r} entry point group)"
        )
    module_name, _, attribute = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"channel type {kind!r} is registered as {target} but cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Channel)):
        raise ValueError(f"channel type {kind!r}: {target} is not a subclass of adapters.channels.base.Channel")
    return cls


def make_channel(name: str, table: dict) -> Channel:
    """The channel configured by a `[channels.NAME]` table without the outbox's delivery keys."""
    options = dict(table)
    kind = options.pop("type", None)
    if not isinstance(kind, str):
        raise ValueError(f"channel {name!r}: key 'type' is required: the channel type (sms, file, ...)")
    return load_channel_class(kind).from_config(name, options)
