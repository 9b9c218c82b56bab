"""Export the built-in models into the model repository, then exit: the one-shot step before replicas start.

Every replica exports missing models at startup by itself; replicas that share one repository volume would
race to write the same versions, so compose runs this once first (`model-export`) and the servers then find
intact copies. It reads the same settings as the server (MODELSERVER_* and flags), so the seed and the
repository path cannot disagree with the servers'.
"""

from __future__ import annotations

import sys

from server.base.tf_logging import quiet_tensorflow_logs

quiet_tensorflow_logs()  # before anything imports TensorFlow

from models.registry import BUILTIN_MODELS  # noqa: E402
from server.registry import repository  # noqa: E402
from server.settings import parse_settings  # noqa: E402


def main() -> int:
    settings = parse_settings()
    for definition in BUILTIN_MODELS.values():
        exported = repository.ensure_exported(
            settings.model_repository, definition.name, definition.version, definition.build, settings.seed
        )
        state = "exported" if exported else "already intact"
        print(f"{definition.name} version {definition.version}: {state} in {settings.model_repository}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
