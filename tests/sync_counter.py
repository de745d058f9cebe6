"""Count the operations that make the host wait for the device: reading a value back (`.item()`,
`bool(tensor)`, `if tensor.any()`), ops whose output shape depends on the data (`nonzero`,
`masked_select`, ...: the host must read a count before it can allocate), and copies to the CPU.
On a GPU each one stalls the host until the queued kernels finish, so a training step should have
none. The ops are counted on any device (a CPU run shows what a CUDA run would sync on).

    with HostSyncCounter() as syncs:
        loss = model(x, y)[1]
        loss.backward()
    assert not syncs.ops, syncs.ops
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read device memory on the host (by name, so every overload counts)
READBACK_OPS = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), float() of a tensor
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",  # data-dependent output shapes: the host reads the size
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::_unique2",
    "aten::unique_dim",
}
COPY_OPS = {"aten::_to_copy", "aten::copy_"}


def copies_to_host(name, args, kwargs):
    """Is this copy op moving a non-CPU tensor to the CPU?"""
    if name == "aten::_to_copy":
        source, target = args[0], kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu"
    target, source = args[0], args[1]  # copy_(self, src)
    return target.device.type == "cpu" and isinstance(source, torch.Tensor) and source.device.type != "cpu"


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode recording, in .ops, the name of every host-syncing op run under it (autograd's
    backward included, as the mode is active on the thread that runs it)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in READBACK_OPS or (name in COPY_OPS and copies_to_host(name, args, kwargs)):
            self.ops.append(name)
        return func(*args, **kwargs)
