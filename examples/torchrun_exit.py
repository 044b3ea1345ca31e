"""Running an example's main() as a script, alone or as one of torchrun's processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_as_script(main: Callable[[], object]) -> None:
    """Calls main(); under torchrun (WORLD_SIZE > 1) then ends the process without interpreter finalisation.

    torch's gloo worker threads outlive destroy_process_group, and one that frees a finished
    collective's tensors while the interpreter finalises aborts the process ("terminate called without
    an active exception") after a good run.
    """
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
