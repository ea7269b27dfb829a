"""Generate the Python API package and Envoy's descriptor set from protos/.

Usage: python protos/generate.py OUTPUT_DIR
Writes OUTPUT_DIR/python (importable as `arxio.*`) and
OUTPUT_DIR/api_descriptor.pb (for Envoy's gRPC-JSON transcoder).
"""

import shutil
import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
# The transcoder needs these to render error details as JSON.
EXTRA_DESCRIPTOR_PROTOS = (
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
)


def include_paths() -> list[str]:
    well_known = files("grpc_tools").joinpath("_proto")
    # googleapis-common-protos installs google/api/*.proto beside its code.
    googleapis = Path(files("google.api").joinpath("annotations.proto"))

    return [str(PROTOS), str(well_known), str(googleapis.parent.parent.parent)]


def run_protoc(arguments: list[str]) -> None:
    includes = [f"-I{path}" for path in include_paths()]
    status = protoc.main(["protoc", *includes, *arguments])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


def main(output: Path) -> None:
    sources = sorted(
        str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto")
    )
    python_out = output / "python"
    if python_out.exists():
        shutil.rmtree(python_out)
    python_out.mkdir(parents=True)
    run_protoc(
        [
            f"--python_out={python_out}",
            f"--pyi_out={python_out}",
            f"--grpc_python_out={python_out}",
            *sources,
        ]
    )
    run_protoc(
        [
            f"--descriptor_set_out={output / 'api_descriptor.pb'}",
            "--include_imports",
            "--include_source_info",
            *sources,
            *EXTRA_DESCRIPTOR_PROTOS,
        ]
    )
    print(f"generated {len(sources)} protos into {output}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
