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


_RATE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B(?:\s*/\s*s)?\s*\Z", re.IGNORECASE)


class ByteRate(click.ParamType):
    """A rate in bytes per second with a unit: ``2MB``, ``500KiB``, ``1.5MB/s``, ``800B``. KB/MB/GB are decimal
    (1000), KiB/MiB/GiB binary (1024). A bare number is refused: these options once took KB/s, and a silent 500
    B/s where 500 KB/s was meant would stall every transfer."""

    name = "rate"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value)
        if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
            self.fail(f"{text.strip()!r} has no unit: give a unit, e.g. 500KB (bytes per second; a bare number "
                      f"once meant KB/s)", param, ctx)
        m = _RATE.match(text)
        if not m:
            self.fail(f"{text!r} is not a rate such as 2MB, 500KiB or 1.5MB/s", param, ctx)
        number, prefix, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
        if binary and not prefix:
            self.fail(f"{text!r} is not a rate such as 2MB, 500KiB or 1.5MB/s", param, ctx)
        rate = int(number * (1024 if binary else 1000) ** " KMGT".index(prefix or " "))
        if rate < 1024:
            self.fail(f"{text!r} is below the smallest rate, 1KiB/s", param, ctx)
        return rate
