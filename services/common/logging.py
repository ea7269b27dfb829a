"""Configure structlog: JSON lines on stderr, context bound per request.

Log lines carry ids, outcomes and durations only. No field of a request body
is ever passed to a logger, and keys and secrets never are.
"""

import logging
import sys

import structlog


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send JSON log lines to stderr, each with the service's name."""
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=level.upper()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
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
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
