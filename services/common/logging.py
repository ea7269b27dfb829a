"""Configure structlog: JSON lines on stderr, context bound per request.

Log lines carry ids, outcomes and durations only. No field of a request body
is ever passed to a logger, and keys and secrets never are.
"""

import contextvars
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Fields of the RPC being served, merged into every line logged while it
# runs. One context variable holding a dict costs far less per RPC than a
# structlog context variable per field.
_RPC_FIELDS: contextvars.ContextVar[dict[str, Any] | None] = (
    contextvars.ContextVar("arxio_rpc_fields", default=None)
)


def start_rpc_fields(**fields: Any) -> contextvars.Token:
    """Begin the fields of one RPC; pass the token to `end_rpc_fields`."""
    return _RPC_FIELDS.set(dict(fields))


def end_rpc_fields(token: contextvars.Token) -> None:
    _RPC_FIELDS.reset(token)


def bind_rpc_fields(**fields: Any) -> None:
    """Add fields to the lines of the RPC being served, if there is one."""
    current = _RPC_FIELDS.get()
    if current is not None:
        current.update(fields)


def _merge_rpc_fields(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    current = _RPC_FIELDS.get()
    if current:
        for name, value in current.items():
            event_dict.setdefault(name, value)

    return event_dict


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send JSON log lines to stderr, each with the service's name."""
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=level.upper()
    )

    def add_service(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["service"] = service
        return event_dict

    structlog.configure(
        processors=[
            add_service,
            _merge_rpc_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
