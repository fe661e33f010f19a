"""Triton kernels for every op family, one launch per pass over all tensors of a call.

``KERNELS`` maps each family stem to a function with the signature of its op
in :mod:`sfron_ops._ops` (the table every backend provides). Each family is
also registered as a ``torch.library.triton_op`` named ``sfron_ops::<op>triton_``
(e.g. ``sfron_ops::sgd_update_triton_``), which is what ``torch.compile``
records: the dispatcher ops of :mod:`sfron_ops._ops` keep their CUDA slot for
the compiled extension. Runs on CUDA tensors, and on CPU tensors with
``TRITON_INTERPRET=1``. Launch strategy and pointer tables: :mod:`._common`.
"""

from ._common import clear_caches, count_launches
from .adamw_update import adamw_update_, adamw_update_triton_
from .fisher_accumulate import fisher_accumulate_, fisher_accumulate_triton_
from .masked_norm import masked_sq_norm_, masked_sq_norm_triton_
from .saliency_mask import saliency_mask_, saliency_mask_triton_
from .sgd_update import sgd_update_, sgd_update_triton_
from .slow_sync import slow_sync_, slow_sync_triton_

#: family stem -> kernel with the op's signature
KERNELS = {
    "masked_norm": masked_sq_norm_,
    "sgd_update": sgd_update_,
    "adamw_update": adamw_update_,
    "fisher_accumulate": fisher_accumulate_,
    "saliency_mask": saliency_mask_,
    "slow_sync": slow_sync_,
}

#: family stem -> the triton_op (``torch.ops.sfron_ops.<op>triton_``)
TRITON_OPS = {
    "masked_norm": masked_sq_norm_triton_,
    "sgd_update": sgd_update_triton_,
    "adamw_update": adamw_update_triton_,
    "fisher_accumulate": fisher_accumulate_triton_,
    "saliency_mask": saliency_mask_triton_,
    "slow_sync": slow_sync_triton_,
}

__all__ = ["KERNELS", "TRITON_OPS", "clear_caches", "count_launches"]
