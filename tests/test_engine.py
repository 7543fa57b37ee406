"""The paged engine on one process: float32 greedy tokens equal a full forward pass over the
whole sequence however the engine gets there (batched, chunked, from the prefix cache, after a
preemption), block accounting, cancellation and sampling. (Across ranks, the server and
generate.py tests cover it.)"""

import subprocess
import sys

import pytest
import torch

from helpers import LLAMA3_TINY, REPO, random_weights
from llama.args import ModelArgs
from llama.engine import (FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Engine, EngineConfig, Request, SamplingParams,
                          generate, use_compiled_decode)
from llama.engine.model_runner import _COMPILED_DECODE
from llama.engine.sampler import greedy_tokens
from llama.errors import UserError
from llama.logits_processing import LogitsParams
from llama.model import Transformer
from llama.serving import warm_up

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    args = ModelArgs(**{**LLAMA3_TINY, "max_seq_len": 64, "max_batch_size": 3}, vocab_size=300)
    model = Transformer(args).eval()
    model.load_state_dict(random_weights(args, seed=3))
    return model


def prompts(n: int, seed: int = 0, longest: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(length),), generator=g).tolist()
            for length in torch.randint(1, longest, (n,), generator=g)]


_REFERENCE: dict[tuple, list[int]] = {}


@torch.inference_mode()
def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes over the whole sequence, no cache."""
    key = (id(model), tuple(prompt), n)
    if key not in _REFERENCE:
        tokens = list(prompt)
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        _REFERENCE[key] = tokens[len(prompt):]
    return _REFERENCE[key]


def run(engine: Engine, arrivals: dict[int, list[Request]]) -> dict[int, list[int]]:
    """Step the engine, submitting arrivals[k] before step k; the tokens each request got."""
    out: dict[int, list[int]] = {}
    step = 0
    while engine.busy or step <= max(arrivals):
        for request in arrivals.get(step, []):
            engine.submit(request)
        for event in engine.step():
            if event.token is not None:
                out.setdefault(event.request_id, []).append(event.token)
        step += 1
    return out


def assert_pool_empty(engine: Engine) -> None:
    assert engine.blocks.num_used == 0 and all(b.ref_count == 0 for b in engine.blocks.blocks)


def test_cached_batched_decoding_matches_full_forward(model):
    batch = prompts(5, seed=1, longest=40)
    engine = Engine(model, EngineConfig(block_size=4))
    completions = generate(engine, batch, 12, frozenset(), temperature=0.0)  # 5 prompts, 3 at a time
    for prompt, completion in zip(batch, completions):
        assert completion.tokens == reference_greedy(model, prompt, 12)
        assert completion.finish_reason == FINISH_LENGTH
    assert_pool_empty(engine)


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4, prefill_chunk=1),  # every prompt token a step
    EngineConfig(block_size=4, prefill_chunk=7),  # chunks across block boundaries, prompts sharing a step
    EngineConfig(block_size=4, prefill_chunk=7, prefix_caching=False),
    EngineConfig(block_size=16),
], ids=["chunk1", "chunk7", "chunk7-no-prefix-cache", "block16"])
def test_greedy_tokens_do_not_depend_on_neighbours_chunks_or_arrival_time(model, config):
    """float32 greedy: a request equals the full forward, alone or among others arriving at any step."""
    batch = prompts(7, seed=2, longest=30)
    requests = [Request(i, p, 10 + i, frozenset(), GREEDY) for i, p in enumerate(batch)]
    expected = {r.id: reference_greedy(model, r.prompt, r.max_new_tokens) for r in requests}
    engine = Engine(model, config)
    for r in requests:
        assert run(engine, {0: [r]}) == {r.id: expected[r.id]}
    engine = Engine(model, config)
    assert run(engine, {0: requests[:2], 1: requests[2:4], 5: requests[4:6], 9: requests[6:]}) == expected
    assert_pool_empty(engine)


def test_prefix_cache_hits_give_the_same_tokens(model):
    """Prompts sharing a prefix: a whole block-aligned prompt again (its last block recomputed),
    prompts that differ only in their last token, one ending exactly on a block boundary, and a
    continuation of an earlier prompt and its reply (a chat's next turn)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 300, (16,), generator=g).tolist()  # 4 blocks of 4
    reply = reference_greedy(model, base, 6)
    cases = [base, base, base[:-1] + [(base[-1] + 1) % 300], base[:12], base[:13], base + reply + [7, 8]]
    engine = Engine(model, EngineConfig(block_size=4, max_num_seqs=1))
    for i, prompt in enumerate(cases):
        assert run(engine, {0: [Request(i, prompt, 6, frozenset(), GREEDY)]}) == \
            {i: reference_greedy(model, prompt, 6)}, f"case {i}"
    # Hits: 3 blocks (the last of 16 tokens is recomputed), 3, 2 (12 tokens: its 3rd block
    # holds the last token), 3, then base and the first block of the reply.
    assert engine.blocks.hit_tokens == 4 * (3 + 3 + 2 + 3 + 5)
    assert engine.blocks.queried_tokens == sum(map(len, cases))
    assert_pool_empty(engine)
    uncached = Engine(model, EngineConfig(block_size=4, max_num_seqs=1, prefix_caching=False))
    run(uncached, {0: [Request(0, base, 6, frozenset(), GREEDY), Request(1, base, 6, frozenset(), GREEDY)]})
    assert uncached.blocks.hit_tokens == 0


def test_concurrent_requests_share_blocks_and_release_them(model):
    """Two running requests with a common prefix hold its blocks once, each counted twice."""
    prefix = list(range(100, 112))  # 3 blocks of 4
    engine = Engine(model, EngineConfig(block_size=4))
    engine.submit(Request(0, prefix + [1], 20, frozenset(), GREEDY))
    engine.step()  # computes request 0's prompt, keys its full blocks
    engine.submit(Request(1, prefix + [2], 20, frozenset(), GREEDY))
    engine.step()
    [a, b] = engine.scheduler.running
    assert a.block_table[:3] == b.block_table[:3] and a.block_table[3] != b.block_table[3]
    assert [engine.blocks.blocks[i].ref_count for i in a.block_table[:3]] == [2, 2, 2]
    assert engine.cancel(0).finish_reason == FINISH_CANCELLED
    assert [engine.blocks.blocks[i].ref_count for i in b.block_table[:3]] == [1, 1, 1]
    engine.cancel(1)
    assert_pool_empty(engine)
    assert not engine.busy


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(model):
    """8 requests at once over a pool of 8 blocks of 4 tokens (room for one to two of them):
    sequences are preempted and recomputed on most steps, and every one still gets the tokens
    it gets alone (half of them with penalties, whose state is rebuilt after a preemption); the
    pool is empty afterwards."""
    batch = prompts(8, seed=7, longest=16)
    penalized = LogitsParams(frequency_penalty=3.0, logit_bias=((7, 8.0),))  # 7, until its count says no
    requests = [Request(i, p, 14, frozenset(), GREEDY, penalized if i % 2 else LogitsParams())
                for i, p in enumerate(batch)]
    expected = {r.id: reference_greedy(model, r.prompt, 14) for r in requests if r.id % 2 == 0}
    for r in requests[1::2]:
        expected |= run(Engine(model), {0: [r]})
    assert expected[1] != reference_greedy(model, requests[1].prompt, 14)  # the penalties matter
    for prefix_caching in (True, False):
        engine = Engine(model, EngineConfig(num_blocks=8, block_size=4, max_num_seqs=8, prefill_chunk=6,
                                            prefix_caching=prefix_caching))
        assert run(engine, {0: requests}) == expected
        assert engine.scheduler.preemptions > 8
        assert_pool_empty(engine)
        assert not engine.sampler.rows


def test_a_step_decoding_beside_a_prompt_chunk_is_one_forward(model):
    """While one request decodes, another's prompt arrives and is prefilled in chunks: every step
    is one pass over the weights (one output projection), the decoding request's token included,
    and both get the tokens they get alone."""
    first, second = prompts(2, seed=11, longest=30)
    requests = [Request(0, first, 12, frozenset(), GREEDY), Request(1, second + [5] * 20, 8, frozenset(), GREEDY)]
    engine = Engine(model, EngineConfig(block_size=4, prefill_chunk=6))
    forwards = []
    hook = model.output.register_forward_hook(lambda *_: forwards.append(1))
    out: dict[int, list[int]] = {}
    try:
        engine.submit(requests[0])
        for step in range(40):
            if step == 3:
                engine.submit(requests[1])
            before = len(forwards)
            for event in engine.step():
                out.setdefault(event.request_id, []).extend([event.token] if event.token is not None else [])
            assert len(forwards) - before == 1, f"step {step}"
            if not engine.busy:
                break
    finally:
        hook.remove()
    assert out == {r.id: reference_greedy(model, r.prompt, r.max_new_tokens) for r in requests}


def test_the_torch_attention_path_gives_the_same_tokens(model, monkeypatch):
    """The path a GPU takes (no C kernel: torch gathers each table, cut to a power of two of
    blocks, under a mask), run here on CPU: the same tokens as a full forward pass, with chunks,
    prefix hits and preemptions."""
    monkeypatch.setattr("llama.model.cpu_linear.decode_attention_applies", lambda *tensors: False)
    batch = prompts(6, seed=10, longest=30)
    requests = [Request(i, p, 12, frozenset(), GREEDY) for i, p in enumerate(batch + batch[:2])]
    engine = Engine(model, EngineConfig(num_blocks=12, block_size=4, max_num_seqs=4, prefill_chunk=5))
    engine.runner.fixed_width = False
    widths = []
    decode = engine.runner._decode_step
    engine.runner._decode_step = lambda rows, width: widths.append(width) or decode(rows, width)
    assert run(engine, {0: requests[:6], 3: requests[6:]}) == \
        {r.id: reference_greedy(model, r.prompt, 12) for r in requests}
    assert set(widths) <= {1, 2, 4, 8, 16} and len(set(widths)) > 1
    assert engine.scheduler.preemptions and engine.blocks.hit_tokens
    assert_pool_empty(engine)


def test_a_sequence_alone_that_outgrows_the_pool_ends_at_its_length(model):
    """12 tokens of cache: the 13th token is sampled, never computed, and ends the request."""
    engine = Engine(model, EngineConfig(num_blocks=3, block_size=4))
    prompt = prompts(1, seed=8)[0][:5]
    events = []
    engine.submit(Request(0, prompt, 50, frozenset(), GREEDY))
    while engine.busy:
        events += engine.step()
    assert [e.token for e in events if e.token is not None] == reference_greedy(model, prompt, 13 - len(prompt))
    assert events[-1].finish_reason == FINISH_LENGTH
    assert_pool_empty(engine)


def test_a_prompt_longer_than_the_pool_or_max_seq_len_is_refused(model):
    engine = Engine(model, EngineConfig(num_blocks=3, block_size=4))
    with pytest.raises(UserError, match="request 0 has 12 tokens, at least the KV cache's 12; shorten it"):
        engine.submit(Request(0, list(range(12)), 5, frozenset(), GREEDY))
    with pytest.raises(UserError, match="request 1 has 64 tokens, at least max_seq_len 64"):
        Engine(model).submit(Request(1, list(range(64)), 5, frozenset(), GREEDY))
    assert not engine.busy


def test_sampling_follows_the_request_seed_only(model):
    sampled = [Request(i, p, 8, frozenset(), SamplingParams(0.9, 0.95, seed=7)) for i, p in enumerate(prompts(2))]
    greedy_neighbour = Request(5, prompts(1, seed=9)[0], 20, frozenset(), GREEDY)
    first = run(Engine(model), {0: sampled})
    second = run(Engine(model, EngineConfig(block_size=4, num_blocks=10)),
                 {0: [greedy_neighbour], 2: sampled[:1], 3: sampled[1:]})
    assert first == {k: v for k, v in second.items() if k != 5}
    other_seed = run(Engine(model), {0: [Request(0, sampled[0].prompt, 8, frozenset(), SamplingParams(0.9, 0.95, 8))]})
    assert other_seed[0] != first[0]


def test_stop_ids_cancellation_and_admission(model):
    [p0, p1, p2] = prompts(3, seed=4)
    expected = reference_greedy(model, p0, 6)
    engine = Engine(model, EngineConfig(max_num_seqs=2))
    engine.submit(Request(0, p0, 50, frozenset({expected[3]}), GREEDY))
    engine.submit(Request(1, p1, 50, frozenset(), GREEDY))
    engine.submit(Request(2, p2, 50, frozenset(), GREEDY))
    events = [e for _ in range(5) for e in engine.step()]  # the 5th step admits request 2
    stop = [e for e in events if e.request_id == 0]
    assert [e.token for e in stop] == expected[:3] + [None] and stop[-1].finish_reason == FINISH_STOP
    assert engine.active == 2 and not engine.scheduler.waiting  # request 2 took the freed place
    assert engine.cancel(1).finish_reason == FINISH_CANCELLED
    assert engine.active == 1 and engine.cancel(1) is None
    engine.cancel(2)
    assert not engine.busy
    assert_pool_empty(engine)


def test_warm_up_runs_every_sampling_variant(model):
    """serve.py's warm-up must compile the greedy and the sampled step, each with and without
    logits processing: a step with any sampled row runs the sampled variant, so warming both
    up at once left the greedy one to the first client (15 s on a GPU)."""
    engine = Engine(model, EngineConfig(max_num_seqs=2, prefill_chunk=8))
    variants = []
    pick = engine.sampler._sample_rows
    engine.sampler._sample_rows = lambda rows: lambda *inputs: (variants.append((inputs[-2], inputs[-1] is not None))
                                                                or pick(rows)(*inputs))
    chunks = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda todo, *rest: chunks.extend((seq.num_computed, n) for seq, n in todo) or \
        prefill(todo, *rest)
    warm_up(engine)
    assert set(variants) == {(False, False), (True, False), (False, True), (True, True)}
    # and the last chunk of the longest prompt the server accepts (the most memory a prefill
    # needs: its attention reads the whole context), so that it runs out of memory at start if it
    # must, rather than on a client's request; only that chunk: the whole prompt would take long
    longest = min(engine.max_seq_len, engine.capacity_tokens) - 1
    assert max(start + n for start, n in chunks) == longest
    assert sum(n for start, n in chunks) < 16
    assert_pool_empty(engine)


def test_compiled_steps_keep_to_their_model_and_shape(model):
    """A compiled decode step skips dynamo's guards on the model's modules
    (model_runner._compile_decode), so each model, pool and batch size must get its own: two
    models of other widths and two batch sizes, taking turns, each give the eager greedy tokens."""
    wider_args = ModelArgs(**{**LLAMA3_TINY, "dim": 2 * LLAMA3_TINY["dim"], "max_seq_len": 64, "max_batch_size": 3},
                           vocab_size=300)
    wider = Transformer(wider_args).eval()
    wider.load_state_dict(random_weights(wider_args, seed=4))
    batch = prompts(3, seed=5)
    eager = {(name, n): [c.tokens for c in generate(Engine(m), batch[:n], 5, frozenset(), temperature=0.0)]
             for name, m in (("model", model), ("wider", wider)) for n in (2, 3)}
    for m in (model, wider):
        use_compiled_decode(m)
    try:
        for name, m, n in (("model", model, 3), ("wider", wider, 3), ("model", model, 2), ("model", model, 3)):
            assert [c.tokens for c in generate(Engine(m), batch[:n], 5, frozenset(), temperature=0.0)] == eager[name, n]
    finally:
        _COMPILED_DECODE.pop(model)  # the module's other tests run it eager


def test_compiled_greedy_tokens_are_argmax_first_of_equals():
    """The compiled form (first index holding the maximum) picks what argmax picks, ties included."""
    logits = torch.randn(3, 1000).to(torch.bfloat16)
    logits[1, [5, 700]] = 9  # a tie: the first wins
    logits[2] = 0  # all equal: token 0
    expected = logits.argmax(dim=-1)
    assert expected[1:].tolist() == [5, 0]
    assert torch.equal(torch.compile(greedy_tokens, fullgraph=True, dynamic=False)(logits), expected)


@pytest.mark.parametrize("script", ["generate.py", "serve.py", "benchmark.py"])
def test_help_works(script):
    """Every script's --help (argparse formats each help with %: a bare percent sign broke it)."""
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    if script != "benchmark.py":
        assert "--kv_cache_tokens" in result.stdout and "--prefill_chunk" in result.stdout
