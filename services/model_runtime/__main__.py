"""Start the local model runtime: ``python -m services.model_runtime``.

It reads ARXIO_MODEL_PATH (the GGUF file, required), ARXIO_MODEL_NAME
(default gemma3:270m), ARXIO_HOST (default 127.0.0.1), ARXIO_PORT (default
11434, 0 picks a free port), ARXIO_MODEL_CONTEXT (context window in tokens,
default 4096), ARXIO_MODEL_THREADS (default 2) and
ARXIO_SHUTDOWN_GRACE_SECONDS (default 10).
"""

import sys

import structlog

from services.common.config import ConfigError, Environment
from services.common.logging import configure_logging
from services.model_runtime.server import RuntimeConfig, serve


def main() -> int:
    configure_logging("model-runtime")
    try:
        config = RuntimeConfig.from_env(Environment())
        serve(config)
    # OSError covers a host that does not resolve and a port in use.
    except (ConfigError, OSError) as error:
        structlog.get_logger().error(
            "model runtime not started", error=str(error)
        )
        return 2

    return 0


if __name__ == "__main__":
    sys.exit(main())
