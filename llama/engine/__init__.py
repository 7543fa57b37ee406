"""The inference engine: continuous batching over a paged KV cache with prefix caching.

Its parts, one file each: sequence (a request's state), block_manager (the pool of KV blocks
and the prefix cache), scheduler (what each step computes), model_runner (the forward passes),
sampler (logits to tokens) and engine (the step loop, and generate())."""

from llama.engine.engine import (Completion, Engine, EngineConfig, EngineStats, check_prompts,  # noqa: F401
                                 generate)
from llama.engine.model_runner import single_row_kernels, use_compiled_decode  # noqa: F401
from llama.engine.sampler import SamplingParams  # noqa: F401
from llama.engine.sequence import (FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Request,  # noqa: F401
                                   TokenEvent)
