"""Deadlines as every layer reads them."""

from __future__ import annotations

# A caller's cancellation this close to its deadline is the deadline: the client's clock started before ours.
CANCEL_NEAR_DEADLINE = 0.05
