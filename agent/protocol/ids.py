"""Which ids from inbound messages the agent may echo back (acks, update states).

A field taken from an unverified message (a command whose signature was not checked yet, a refused deployment)
goes out only when it has an id's shape: printable ASCII from ``ECHO_ID``, at most 128 characters. Anything else
(a lone surrogate, a 10 KB string, a number) is echoed as null, so a device never relays poison to the fleet.
"""

from __future__ import annotations

import re
from typing import Any

ECHO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/+=-]{0,127}$")


def echo_id(value: Any) -> str | None:
    """``value`` when it is an id that may be echoed back (``ECHO_ID``), else None."""
    return value if isinstance(value, str) and ECHO_ID.fullmatch(value) else None
