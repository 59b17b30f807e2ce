"""samplers.py: step counts, coverage and determinism of each multi-task sampler, and
length-bucketed batching on real SST sentence lengths."""
import csv
import random
from collections import Counter

import pytest

from samplers import (SAMPLERS, break_steps, length_bucketed_batches, make_plan,
                      proportional_steps, roundrobin_steps, sequential_steps)

# Three tasks of 7, 3 and 5 batches, in this order.
TASK_SIZES = {"para": 7, "sst": 3, "sts": 5}


def make_task_batches(sizes=TASK_SIZES):
    """{task: make_batches}; a batch is the tuple (task, k) for k in 0..n-1, shuffled each pass."""
    def batches_of(task, n_batches):
        def make_batches(rng):
            batches = [(task, k) for k in range(n_batches)]
            rng.shuffle(batches)
            return batches
        return make_batches
    return {task: batches_of(task, n) for task, n in sizes.items()}


def batches_used(plan, task):
    return [step[task] for step in plan if task in step]


def assert_each_pass_covers_every_batch(used, n_batches):
    """`used` is whole passes over n_batches batches, each a permutation, then one partial pass
    without repeats."""
    for start in range(0, len(used), n_batches):
        one_pass = used[start:start + n_batches]
        assert len(set(one_pass)) == len(one_pass)
        if len(one_pass) == n_batches:
            assert set(one_pass) == {(one_pass[0][0], k) for k in range(n_batches)}


# ---------------------------------------------------------------------------------------------
# sequential

def test_sequential_yields_every_batch_of_each_task_in_turn():
    plan = sequential_steps(make_task_batches(), random.Random(0))
    assert len(plan) == 15
    assert all(len(step) == 1 for step in plan)
    assert [next(iter(step)) for step in plan] == ["para"] * 7 + ["sst"] * 3 + ["sts"] * 5
    for task, n in TASK_SIZES.items():
        assert sorted(batches_used(plan, task)) == [(task, k) for k in range(n)]


# ---------------------------------------------------------------------------------------------
# break

def test_break_stops_when_the_smallest_task_runs_out():
    plan = break_steps(make_task_batches(), random.Random(0))
    assert len(plan) == 3
    assert all(list(step) == ["para", "sst", "sts"] for step in plan)
    assert sorted(batches_used(plan, "sst")) == [("sst", k) for k in range(3)]
    for task in ("para", "sts"):
        assert len(set(batches_used(plan, task))) == 3


# ---------------------------------------------------------------------------------------------
# roundrobin

def test_roundrobin_runs_for_the_largest_task_with_every_task_in_every_step():
    plan = roundrobin_steps(make_task_batches(), random.Random(0))
    assert len(plan) == 7
    assert all(list(step) == ["para", "sst", "sts"] for step in plan)


def test_roundrobin_uses_every_para_batch_once():
    plan = roundrobin_steps(make_task_batches(), random.Random(0))
    assert sorted(batches_used(plan, "para")) == [("para", k) for k in range(7)]


def test_roundrobin_restarts_smaller_tasks_with_full_passes():
    plan = roundrobin_steps(make_task_batches(), random.Random(0))
    assert_each_pass_covers_every_batch(batches_used(plan, "sst"), 3)  # passes of 3, 3, then 1
    assert_each_pass_covers_every_batch(batches_used(plan, "sts"), 5)  # passes of 5, then 2


def test_roundrobin_reshuffles_each_restart():
    sst = batches_used(roundrobin_steps(make_task_batches({"para": 300, "sst": 3}),
                                        random.Random(0)), "sst")
    passes = {tuple(sst[start:start + 3]) for start in range(0, 300, 3)}
    assert len(passes) == 6  # all 3! orders turn up over 100 passes


# ---------------------------------------------------------------------------------------------
# proportional

def test_proportional_yields_one_task_per_step_for_as_many_steps_as_batches():
    plan = proportional_steps(make_task_batches(), random.Random(0))
    assert len(plan) == 15
    assert all(len(step) == 1 for step in plan)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_proportional_task_frequencies_approach_size_to_the_alpha_shares(alpha):
    rng = random.Random(0)
    counts = Counter()
    for _ in range(2000):  # 30,000 steps: the standard error of each share is below 0.003
        plan = proportional_steps(make_task_batches(), rng, alpha)
        counts.update(next(iter(step)) for step in plan)
    total_weight = sum(n ** alpha for n in TASK_SIZES.values())
    for task, n in TASK_SIZES.items():
        assert abs(counts[task] / sum(counts.values()) - n ** alpha / total_weight) < 0.02, task


def test_proportional_restarts_a_task_that_runs_out_with_full_passes():
    # uniform draws (alpha=0) over 15 steps use sst about 5 times: more than its 3 batches
    rng = random.Random(0)
    most_sst_steps = 0
    for _ in range(20):
        plan = proportional_steps(make_task_batches(), rng, alpha=0.0)
        for task, n in TASK_SIZES.items():
            assert_each_pass_covers_every_batch(batches_used(plan, task), n)
        most_sst_steps = max(most_sst_steps, len(batches_used(plan, "sst")))
    assert most_sst_steps > 3  # sst did run out and restart


# ---------------------------------------------------------------------------------------------
# all samplers

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_gives_same_plan_and_different_seed_a_different_one(sampler):
    def plan(seed):
        return make_plan(sampler, make_task_batches(), random.Random(seed))
    assert plan(0) == plan(0)
    assert plan(0) != plan(1)


def test_make_plan_dispatches_on_sampler_name():
    expected = {"sequential": sequential_steps, "break": break_steps,
                "roundrobin": roundrobin_steps, "proportional": proportional_steps}
    assert set(SAMPLERS) == set(expected)
    for name, steps in expected.items():
        assert (make_plan(name, make_task_batches(), random.Random(3))
                == steps(make_task_batches(), random.Random(3)))
    assert (make_plan("proportional", make_task_batches(), random.Random(3), alpha=0.0)
            == proportional_steps(make_task_batches(), random.Random(3), alpha=0.0))


def test_make_plan_rejects_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'random'"):
        make_plan("random", make_task_batches(), random.Random(0))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_reject_a_task_without_batches(sampler):
    with pytest.raises(ValueError, match="task 'sst' has no batches"):
        make_plan(sampler, make_task_batches({"para": 7, "sst": 0}), random.Random(0))


# ---------------------------------------------------------------------------------------------
# length_bucketed_batches

@pytest.fixture(scope="module")
def sst_lengths(data_dir):
    """Word counts of the 8,544 SST training sentences."""
    with open(data_dir / "ids-sst-train.csv", newline="") as f:
        return [len(row["sentence"].split()) for row in csv.DictReader(f, delimiter="\t")]


def padding_tokens(batches, lengths):
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch)
               for batch in batches)


def test_length_bucketed_batches_use_every_index_once(sst_lengths):
    batches = length_bucketed_batches(sst_lengths, 32, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(len(sst_lengths)))


def test_length_bucketed_batches_are_full_except_one(sst_lengths):
    batches = length_bucketed_batches(sst_lengths, 30, random.Random(0))
    sizes = sorted(len(batch) for batch in batches)
    assert sizes == [len(sst_lengths) % 30] + [30] * (len(sst_lengths) // 30)  # 8544 = 284*30 + 24


def test_length_bucketing_cuts_padding_versus_random_batches(sst_lengths):
    # bucket_size_in_batches=1 sorts within a single batch only: plain random batching
    random_batches = length_bucketed_batches(sst_lengths, 32, random.Random(0),
                                             bucket_size_in_batches=1)
    bucketed = length_bucketed_batches(sst_lengths, 32, random.Random(0))
    assert padding_tokens(bucketed, sst_lengths) < padding_tokens(random_batches, sst_lengths) / 5


def test_length_bucketed_batches_come_in_random_order_not_short_to_long(sst_lengths):
    """No curriculum: the batches of a chunk are shuffled among all the others, so a batch is as
    often shorter as longer than the one before it (sorted chunks would give a drop only where a
    chunk ends, at most 5 of 266 times)."""
    batches = length_bucketed_batches(sst_lengths, 32, random.Random(0))
    longest = [max(sst_lengths[i] for i in batch) for batch in batches]
    drops = sum(b < a for a, b in zip(longest, longest[1:]))
    assert len(batches) / 3 < drops < 2 * len(batches) / 3


def test_length_bucketed_batches_change_with_the_seed_and_not_without():
    length_rng = random.Random(7)
    lengths = [length_rng.randint(3, 60) for _ in range(500)]
    def batches(seed):
        return length_bucketed_batches(lengths, 16, random.Random(seed), bucket_size_in_batches=4)
    assert batches(0) == batches(0)
    assert batches(0) != batches(1)


def test_length_bucketed_batches_reject_nonpositive_sizes():
    with pytest.raises(ValueError, match="must both be at least 1"):
        length_bucketed_batches([5, 6, 7], 0, random.Random(0))
