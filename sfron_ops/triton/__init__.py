"""Triton kernels for every op family, one launch per pass over all tensors of a call.

``KERNELS`` maps each family stem to a function with the signature of its op
in :mod:`sfron_ops._ops` (the table every backend provides). Each family is
also registered as a ``torch.library.triton_op`` named ``sfron_ops::<op>triton_``
(e.g. ``sfron_ops::sgd_update_triton_``), which is what ``torch.compile``
records: the dispatcher ops of :mod:`sfron_ops._ops` keep their CUDA slot for
the compiled extension. Runs on CUDA tensors, and on CPU tensors with
``TRITON_INTERPRET=1``. Launch strategy and pointer tables: :mod:`._common`.
"""

import importlib

from .. import _ops
from ._common import clear_caches, count_launches

_FAMILIES = {stem: importlib.import_module(f".{stem}", __name__) for stem in _ops.SCHEMAS}

#: family stem -> kernel with the op's signature
KERNELS = {stem: getattr(module, _ops.OP_NAMES[stem]) for stem, module in _FAMILIES.items()}

#: family stem -> the triton_op (``torch.ops.sfron_ops.<op>triton_``)
TRITON_OPS = {stem: getattr(module, _ops.OP_NAMES[stem] + "triton_") for stem, module in _FAMILIES.items()}

__all__ = ["KERNELS", "TRITON_OPS", "clear_caches", "count_launches"]
