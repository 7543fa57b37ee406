"""tp-llama: tensor-parallel inference of Meta Llama checkpoints with DTensor and DCP."""

import os

# CPU tensors of 2 MiB and more on transparent huge pages (torch's own allocator setting, read
# at its first allocation: hence here, before any). A decode step streams every weight, and
# with 4 KiB pages the TLB misses cost: measured 3-13% on the products of a step, alternating
# in one process (AMD EPYC, Zen 3, 2 threads). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
