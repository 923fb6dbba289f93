"""The real language server with faults injected into its engine, for tests/test_faults.py:

    python -m tests.fault_injection serve [serve options]

A hole whose prefix contains one of the markers below fails that way, every time it is tried;
every other hole runs normally. Only the failure is simulated: the server, the engine thread,
the model and the protocol are the real ones.
"""

from __future__ import annotations

import sys
import weakref

import torch

import model.decoding.sampler as sampler_module
import model.engine as engine_module
from diffusion_lsp.cli import main

STEP_ERROR = "INJECT_STEP_ERROR"  # the forward pass raises a RuntimeError
OUT_OF_MEMORY = "INJECT_OUT_OF_MEMORY"  # the forward pass raises torch.OutOfMemoryError
WORKER_DIES = "INJECT_WORKER_DIES"  # the worker raises outside a step (finishing the hole)
OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
               "23.65 GiB of which 1.02 GiB is free.\nIf reserved but unallocated memory is "
               "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")

# id(HoleState) -> (the state, weakly; marker), for holes that must fail. The weak reference
# tells a marked hole from a later one that got its id after it was freed (a healthy hole
# failing as the dead one did made the restart test flaky)
_faults: dict[int, tuple[weakref.ref, str]] = {}


def _fault_of(states) -> str | None:
    for state in states:
        held, marker = _faults.get(id(state), (None, ""))
        if held is not None and held() is state:
            return marker
    return None


def install() -> None:
    """Wrap the engine's submit (to mark holes), forward pass and result (to fail them)."""
    submit, forward_holes, state_result = (engine_module.Engine.submit,
                                           sampler_module.forward_holes,
                                           engine_module.state_result)

    def marking_submit(self, prefix, suffix, *args, **kwargs):
        request = submit(self, prefix, suffix, *args, **kwargs)
        for marker in (STEP_ERROR, OUT_OF_MEMORY, WORKER_DIES):
            if marker in prefix:
                _faults[id(request.state)] = (weakref.ref(request.state), marker)
        return request

    def failing_forward(model, states, **kwargs):
        fault = _fault_of(states)
        if fault == STEP_ERROR:
            raise RuntimeError("injected fault in the forward pass")
        if fault == OUT_OF_MEMORY:
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return forward_holes(model, states, **kwargs)

    def failing_result(model, state, timings):
        if _fault_of([state]) == WORKER_DIES:
            raise RuntimeError("injected fault in the engine's worker")
        return state_result(model, state, timings)

    engine_module.Engine.submit = marking_submit
    sampler_module.forward_holes = failing_forward  # the engine's step looks it up there
    engine_module.state_result = failing_result


if __name__ == "__main__":
    install()
    sys.exit(main())
