"""Stand-ins for the engine's accelerate objects, for tests that drive an adapter directly."""

from contextlib import nullcontext

import torch


class FakeAccelerator:
    """What ``Adapter.setup`` reads from an ``accelerate.Accelerator``: one CPU process."""

    device = torch.device("cpu")
    process_index = 0
    main_process_first = staticmethod(nullcontext)

    def wait_for_everyone(self) -> None:
        pass
