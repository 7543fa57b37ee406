"""The continuous-batching engine on one process: exactness of batched decoding, slots,
cancellation and sampling. (Across ranks, the server and generate.py tests cover it.)"""

import pytest
import torch

from helpers import LLAMA3_TINY, random_weights
from llama.args import ModelArgs
from llama.generation import (_COMPILED_DECODE, FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Engine, Request,
                              SamplingParams, generate, greedy_tokens, use_compiled_decode)
from llama.model import Transformer
from llama.serving import warm_up

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    args = ModelArgs(**{**LLAMA3_TINY, "max_seq_len": 64, "max_batch_size": 3}, vocab_size=300)
    model = Transformer(args).eval()
    model.load_state_dict(random_weights(args, seed=3))
    return model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(length),), generator=g).tolist()
            for length in torch.randint(1, 20, (n,), generator=g)]


@torch.inference_mode()
def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes over the whole sequence, no cache."""
    tokens = list(prompt)
    for _ in range(n):
        model.setup_caches(1)
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


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


def test_cached_batched_decoding_matches_full_forward(model):
    batch = prompts(5, seed=1)
    completions = generate(model, batch, 12, frozenset(), temperature=0.0)  # 5 prompts over 3 slots
    for prompt, completion in zip(batch, completions):
        assert completion.tokens == reference_greedy(model, prompt, 12)
        assert completion.finish_reason == FINISH_LENGTH


def test_greedy_tokens_do_not_depend_on_neighbours_or_arrival_time(model):
    """float32 greedy: a request alone equals the same request among others arriving at any step."""
    batch = prompts(7, seed=2)
    requests = [Request(i, p, 10 + i, frozenset(), GREEDY) for i, p in enumerate(batch)]
    alone = {}
    for r in requests:
        alone |= run(Engine(model, 3), {0: [r]})
    together = run(Engine(model, 3), {0: requests[:2], 1: requests[2:4], 5: requests[4:6], 9: requests[6:]})
    assert together == alone


def test_sampling_follows_the_request_seed_only(model):
    sampled = [Request(i, p, 8, frozenset(), SamplingParams(0.9, 0.95, seed=7)) for i, p in enumerate(prompts(2))]
    greedy_neighbour = Request(5, prompts(1, seed=9)[0], 20, frozenset(), GREEDY)
    first = run(Engine(model, 3), {0: sampled})
    second = run(Engine(model, 3), {0: [greedy_neighbour], 2: sampled[:1], 3: sampled[1:]})
    assert first == {k: v for k, v in second.items() if k != 5}
    other_seed = run(Engine(model, 3), {0: [Request(0, sampled[0].prompt, 8, frozenset(), SamplingParams(0.9, 0.95, 8))]})
    assert other_seed[0] != first[0]


def test_stop_ids_cancellation_and_slots(model):
    [p0, p1, p2] = prompts(3, seed=4)
    expected = reference_greedy(model, p0, 6)
    engine = Engine(model, 2)  # the model holds one set of caches: build the engine after the reference
    engine.submit(Request(0, p0, 50, frozenset({expected[3]}), GREEDY))
    engine.submit(Request(1, p1, 50, frozenset(), GREEDY))
    engine.submit(Request(2, p2, 50, frozenset(), GREEDY))
    events = [e for _ in range(5) for e in engine.step()]  # the 5th step admits request 2
    stop = [e for e in events if e.request_id == 0]
    assert [e.token for e in stop] == expected[:3] + [None] and stop[-1].finish_reason == FINISH_STOP
    assert engine.active == 2 and not engine.waiting  # request 2 took the freed slot
    assert engine.cancel(1).finish_reason == FINISH_CANCELLED
    assert engine.active == 1 and engine.cancel(1) is None
    engine.cancel(2)
    assert not engine.busy


def test_warm_up_runs_every_decode_variant(model):
    """serve.py's warm-up must compile the greedy and the sampled decode step, each with and
    without logits processing: a step with any sampled row runs the sampled variant, so
    warming both up at once left the greedy one to the first client (15 s on a GPU)."""
    engine = Engine(model, 2)
    variants = []
    step = engine._step
    engine._step = lambda *inputs: variants.append((inputs[-2], inputs[-1] is not None)) or step(*inputs)
    warm_up(engine)
    assert set(variants) == {(False, False), (True, False), (False, True), (True, True)}


def test_compiled_steps_keep_to_their_model_and_cache_size(model):
    """A compiled decode step skips dynamo's guards on the model's modules
    (generation._compile_decode), so each model and cache size must get its own: two models of
    other widths and two cache sizes, taking turns, each give the eager greedy tokens."""
    wider_args = ModelArgs(**{**LLAMA3_TINY, "dim": 2 * LLAMA3_TINY["dim"], "max_seq_len": 64, "max_batch_size": 3},
                           vocab_size=300)
    wider = Transformer(wider_args).eval()
    wider.load_state_dict(random_weights(wider_args, seed=4))
    batch = prompts(3, seed=5)
    eager = {(name, n): [c.tokens for c in generate(m, batch[:n], 5, frozenset(), temperature=0.0)]
             for name, m in (("model", model), ("wider", wider)) for n in (2, 3)}
    for m in (model, wider):
        use_compiled_decode(m)
    try:
        for name, m, n in (("model", model, 3), ("wider", wider, 3), ("model", model, 2), ("model", model, 3)):
            assert [c.tokens for c in generate(m, batch[:n], 5, frozenset(), temperature=0.0)] == eager[name, n]
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
