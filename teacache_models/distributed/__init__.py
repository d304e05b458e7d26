"""Generation on several ranks with torch.distributed: CFG parallelism and Ulysses sequence parallelism.

Launch with `torchrun --nproc-per-node N` (NCCL on GPUs, Gloo on CPUs), then:

    state = init_parallel(cfg_parallel=True, sp_degree=2)   # 4 ranks: 2 CFG branches x 2 token shards
    state.enable_sequence_parallel(model)                   # shards tokens, shares TeaCache decisions

Importing this package starts nothing; every collective has the timeout given to `init_parallel`.
"""

from .cfg import CFGParallel
from .runtime import DistributedError, ParallelState, init_parallel
from .sequence import SequenceParallel, SequenceParallelMixin, all_gather_tensor

__all__ = [
    "CFGParallel",
    "DistributedError",
    "ParallelState",
    "SequenceParallel",
    "SequenceParallelMixin",
    "all_gather_tensor",
    "init_parallel",
]
