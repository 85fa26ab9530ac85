"""click parameter types shared by the registry's and the client's command lines."""

from __future__ import annotations

import re

import click

_SIZE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*\Z", re.IGNORECASE)


class ByteSize(click.ParamType):
    """``20GiB``, ``512M``, ``1000000`` -> bytes (K/M/G/T are binary multiples)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size such as 20GiB, 512MiB or 1000000", param, ctx)
        number, unit = float(m.group(1)), m.group(2).upper()
        return int(number * 1024 ** " KMGT".index(unit or " "))
