"""Check that the model server has the configured model.

The CDS service runs this check at start and then every
ARXIO_MODEL_CHECK_INTERVAL_SECONDS, and reports the result under its own
health-check name. The service's main names stay SERVING either way,
because rules-only reviews need no model.
"""

import asyncio

import httpx
import ollama
import structlog

log = structlog.get_logger()

# Health-check name of the model dependency: SERVING while the model server
# lists the model, NOT_SERVING before the first successful check and after
# a failed one.
MODEL_HEALTH_NAME = "arxio.cds.v1.ClinicalDecisionSupportService/model"
# Seconds one check may take. /api/show reads metadata and runs no model,
# so a server that takes longer is treated as unavailable.
CHECK_TIMEOUT = 5.0


class ModelPresence:
    """Ask the model server, with /api/show, whether it has the model."""

    def __init__(
        self,
        client: ollama.AsyncClient,
        model: str,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self._client = client
        self._model = model
        self._timeout = timeout
        # The outcome of the last check: None after a success. Starts as a
        # value no check returns, so the first outcome is always logged.
        self._last_problem: str | None = "not checked yet"

    async def check(self) -> bool:
        """Return whether the model is present; log when that changes."""
        problem = await self._problem()
        if problem != self._last_problem:
            if problem is None:
                log.info("model present", model=self._model)
            else:
                log.warning(
                    "model not available", model=self._model, reason=problem
                )
            self._last_problem = problem

        return problem is None

    async def _problem(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.show(self._model)
        except (TimeoutError, httpx.TimeoutException):
            return f"model server timed out after {self._timeout:g} s"
        except ConnectionError:
            return "model server unreachable"
        except httpx.TransportError:
            return "model server connection failed"
        except ollama.ResponseError as error:
            if error.status_code == 404:
                return (
                    f'model server has no model "{self._model}": pull it '
                    "or set ARXIO_MODEL"
                )
            return f"model server returned HTTP {error.status_code}"
        except ValueError:
            return "model server sent a malformed response"

        return None
