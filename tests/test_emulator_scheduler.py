"""The emulator's scheduler and KV cache, step by step without a clock (vLLM V1 rules)."""

from __future__ import annotations

import pytest

from loadgen.emulator.kvcache import KVCache, prompt_block_hashes
from loadgen.emulator.profiles import EngineLimits
from loadgen.emulator.scheduler import FINISHED, RUNNING, WAITING, EngineRequest, Scheduler


def limits(**overrides: int) -> EngineLimits:
    values = dict(max_num_seqs=256, max_num_batched_tokens=8192, num_gpu_blocks=1000,
                  block_size=16, max_model_len=131072)
    values.update(overrides)
    return EngineLimits(**values)


def request(name: str, prompt_len: int, output_len: int, block_size: int = 16,
            prefix: str | None = None) -> EngineRequest:
    tokens = [f"{prefix or name}{i}" for i in range(prompt_len)]
    return EngineRequest(name, tokens, output_len, "stop", block_size)


def step(sched: Scheduler) -> tuple[dict[str, int], list[str]]:
    plan = sched.schedule()
    scheduled = {req.request_id: n for req, n in plan.scheduled}
    return scheduled, [r.request_id for r in sched.complete(plan, 0.0)]


def test_chunked_prefill_then_one_token_per_step() -> None:
    sched = Scheduler(limits())
    req = request("a", 10000, 3)
    sched.add(req)
    assert step(sched) == ({"a": 8192}, [])
    assert step(sched) == ({"a": 1808}, ["a"])  # the prefill's last chunk samples a token
    assert step(sched) == ({"a": 1}, ["a"])
    assert step(sched) == ({"a": 1}, ["a"])
    assert req.state == FINISHED and req.num_output == 3
    assert not sched.has_work() and sched.kv.usage() == 0.0


def test_running_first_then_waiting_fcfs_within_budget() -> None:
    sched = Scheduler(limits(max_num_batched_tokens=100))
    a, b, c = request("a", 60, 5), request("b", 60, 5), request("c", 60, 5)
    for r in (a, b, c):
        sched.add(r)
    assert step(sched)[0] == {"a": 60, "b": 40}  # b gets the budget's remainder
    assert step(sched)[0] == {"a": 1, "b": 20, "c": 60}


def test_sequence_cap() -> None:
    sched = Scheduler(limits(max_num_seqs=2))
    for i in range(5):
        sched.add(request(f"r{i}", 10, 50))
    step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 3


def test_preemption_of_most_recent_and_recompute() -> None:
    # 4 blocks of 4 tokens; two requests of 6 prompt tokens (2 blocks each) fill the cache.
    sched = Scheduler(limits(num_gpu_blocks=4, block_size=4))
    a, b = request("a", 6, 10, 4), request("b", 6, 10, 4)
    sched.add(a)
    sched.add(b)
    assert step(sched) == ({"a": 6, "b": 6}, ["a", "b"])
    assert step(sched) == ({"a": 1, "b": 1}, ["a", "b"])  # 7 tokens of KV each
    assert step(sched) == ({"a": 1, "b": 1}, ["a", "b"])  # 8 tokens: still 2 blocks each
    # a needs a third block: b (the most recently admitted) is preempted; no admissions.
    scheduled, _ = step(sched)
    assert scheduled == {"a": 1}
    assert b.state == WAITING and sched.waiting[0] is b and b.num_computed == 0
    assert sched.num_preemptions == 1 and b.blocks == []
    # b comes back to recompute prompt + its 2 output tokens once a has finished.
    while a.state != FINISHED:
        step(sched)
    scheduled, sampled = step(sched)
    # prompt (6) + the 3 tokens it had sampled; its cached prompt block was evicted by a
    assert scheduled == {"b": 9} and sampled == ["b"] and b.state == RUNNING
    while b.state != FINISHED:
        step(sched)
    assert a.num_output == b.num_output == 10


def test_request_preempts_itself_when_alone_is_too_big() -> None:
    sched = Scheduler(limits(num_gpu_blocks=2, block_size=4))
    a, b = request("a", 3, 20, 4), request("b", 3, 20, 4)
    sched.add(a)
    step(sched)
    sched.add(b)
    for _ in range(30):
        step(sched)
    assert sched.num_preemptions > 0


def test_prefix_cache_hit_leaves_last_token_to_compute() -> None:
    sched = Scheduler(limits())
    first = request("a", 64, 1, prefix="p")
    sched.add(first)
    step(sched)
    assert first.state == FINISHED
    again = request("b", 64, 1, prefix="p")  # same 64 tokens = 4 full blocks
    sched.add(again)
    scheduled, _ = step(sched)
    assert scheduled == {"b": 16}  # 3 blocks cached; the last block holds the last token
    assert again.num_cached_tokens == 48
    assert (sched.prefix_queries, sched.prefix_hits) == (128, 48)


def test_prefix_cache_partial_match() -> None:
    sched = Scheduler(limits())
    sched.add(request("a", 40, 1, prefix="p"))
    step(sched)
    other = EngineRequest("b", [f"p{i}" for i in range(20)] + ["x"] * 30, 1, "stop", 16)
    sched.add(other)
    assert step(sched)[0] == {"b": 50 - 16}


def test_lru_eviction_of_cached_blocks() -> None:
    kv = KVCache(num_blocks=4, block_size=4)
    a = request("a", 8, 1, 4)
    assert kv.allocate(a, 8)
    kv.free(a)
    assert kv.num_free_blocks == 4 and len(kv.lookup(a.block_hashes, 2)) == 2
    b = request("b", 8, 1, 4)
    assert kv.allocate(b, 8)  # takes the two never-used blocks first
    assert len(kv.lookup(a.block_hashes, 2)) == 2
    c = request("c", 4, 1, 4)
    assert kv.allocate(c, 4)  # evicts a's least recently freed block (its tail)
    assert len(kv.lookup(a.block_hashes, 2)) == 1
    assert not kv.allocate(request("d", 8, 1, 4), 8)
    assert kv.usage() == 0.75


def test_block_hashes_are_chained() -> None:
    one = prompt_block_hashes(["x"] * 8 + ["y"] * 4, 4)
    two = prompt_block_hashes(["z"] * 4 + ["x"] * 4 + ["y"] * 4, 4)
    assert len(one) == 3 and one[2] != two[2]  # same block text, different prefix
    assert prompt_block_hashes(["x"] * 7, 4) == one[:1]


def test_abort_frees_at_next_step() -> None:
    sched = Scheduler(limits())
    a, b = request("a", 20, 100), request("b", 20, 100)
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.abort(a)
    sched.abort(b)
    scheduled, _ = step(sched)
    assert scheduled == {} and not sched.running and not sched.waiting
    assert sched.kv.usage() == 0.0 and sched.num_aborted == 2


@pytest.mark.parametrize("output_len", [1, 2, 7])
def test_output_length_is_exact(output_len: int) -> None:
    sched = Scheduler(limits())
    req = request("a", 5, output_len)
    sched.add(req)
    sampled = 0
    while req.state != FINISHED:
        sampled += step(sched)[1].count("a")
    assert sampled == output_len == sched.generation_tokens
