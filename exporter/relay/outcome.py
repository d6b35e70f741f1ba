"""How an exchange ends: one table from what went wrong to its outcome and its answer.

The relay raises or receives these exceptions; `outcome_of` is the only place that turns one
into an `Outcome` (the `error_type` label), and `ANSWERS` the only place that says what the
client is told when llmtap must answer itself because no byte of the upstream's answer was
relayed yet. The messages name what failed, never where: internal addresses go to the log.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from exporter.record import Outcome


class UpstreamConnectError(Exception):
    """No connection to the upstream could be made (refused, unreachable, timed out)."""


class UpstreamResetError(Exception):
    """The upstream closed or reset the connection before its answer was complete."""

    def __init__(self, message: str, before_response: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response  # no byte of the response came back


class InternalError(Exception):
    """A bug in llmtap: logged with its traceback, answered 500, counted."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer llmtap gives instead of relaying: a failed admission check, say."""

    status: int
    kind: str  # the error type the client's dialect names (protocols.errors.error_body)
    message: str
    outcome: Outcome = Outcome.ANSWERED  # ANSWERED: the status is the error_type
    retry_after: int | None = None


class Refused(Exception):
    """An Upstream that will not take the request (the router with no backend) raises this."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


OUTCOMES: dict[type[BaseException], Outcome] = {
    UpstreamConnectError: Outcome.UPSTREAM_CONNECT,
    UpstreamResetError: Outcome.UPSTREAM_RESET,
    asyncio.CancelledError: Outcome.CANCELLED,
    TimeoutError: Outcome.TIMEOUT,  # an upstream's own deadline (the router's attempts)
    InternalError: Outcome.INTERNAL,
}


def outcome_of(error: BaseException) -> Outcome:
    for kind in type(error).__mro__:
        if (outcome := OUTCOMES.get(kind)) is not None:
            return outcome
    return Outcome.INTERNAL


# What llmtap answers when an exchange fails before any byte of the answer went out. The
# outcomes missing here (cancelled, client_timeout) have no one left to answer.
ANSWERS: dict[Outcome, Refusal] = {
    Outcome.UPSTREAM_CONNECT: Refusal(502, "upstream_unavailable",
                                      "llmtap cannot connect to the model server"),
    Outcome.UPSTREAM_RESET: Refusal(502, "upstream_unavailable",
                                    "the model server closed the connection without answering"),
    Outcome.TIMEOUT: Refusal(504, "timeout", "the model server did not answer in time "
                             "(llmtap --first-byte-timeout)"),
    Outcome.INTERNAL: Refusal(500, "internal_error", "llmtap failed to relay this request; "
                              "its log has the details"),
}
# What ends a stream that was already relaying (Ollama streams carry it as a last error line).
BROKEN_STREAM = {
    Outcome.TIMEOUT: "the model server went silent (llmtap --idle-timeout)",
    Outcome.UPSTREAM_RESET: "the model server broke off the answer",
    Outcome.INTERNAL: "llmtap failed while relaying the answer",
}
