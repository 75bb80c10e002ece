"""Coverage-guided fuzzing of deployment YAML with atheris (optional: `pip install atheris`; not a test dependency).

    python tests/fuzz/atheris_spec.py -runs=100000 -max_len=4096

Any input must load as a `DeploymentSpec` or raise `ValueError`; anything else stops the run with the input saved.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from control_plane.spec import DeploymentSpec


def fuzz_one(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    with contextlib.suppress(ValueError):  # a refusal with a message is the expected outcome
        DeploymentSpec.from_yaml(text)


if __name__ == "__main__":
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()
