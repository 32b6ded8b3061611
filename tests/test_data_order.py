"""Specification of the training data order (dg_pipeline.data.order): seeded, split into global batches across
ranks, resumable mid-epoch."""

import torch

from dg_pipeline.data.collate import Collator, ExampleDataset
from dg_pipeline.data.examples import Example
from dg_pipeline.data.order import GlobalBatchSampler, ResumableLoader


def steps(sampler, epoch, rank, ranks, first_step=0):
    keys = list(sampler.rank_keys(epoch, rank, ranks, first_step))
    return [keys[i : i + sampler.batch_size] for i in range(0, len(keys), sampler.batch_size)]


def test_two_ranks_at_batch_b_train_on_the_global_batches_of_one_rank_at_batch_2b():
    one = GlobalBatchSampler(50, batch_size=8, seed=3, shuffle=True, drop_last=True)
    two = GlobalBatchSampler(50, batch_size=4, seed=3, shuffle=True, drop_last=True)
    for epoch in (0, 1):
        single = steps(one, epoch, 0, 1)
        rank0, rank1 = steps(two, epoch, 0, 2), steps(two, epoch, 1, 2)
        assert len(single) == len(rank0) == len(rank1) == 50 // 8
        assert [a + b for a, b in zip(rank0, rank1)] == single


def test_each_epoch_is_a_new_permutation_fixed_by_the_seed():
    sampler = GlobalBatchSampler(40, batch_size=4, seed=3, shuffle=True, drop_last=True)
    e0, e1 = sampler.epoch_order(0, 1), sampler.epoch_order(1, 1)
    assert sorted(e0) == list(range(40)) and e0 != e1
    assert GlobalBatchSampler(40, 4, seed=3, shuffle=True, drop_last=True).epoch_order(1, 1) == e1
    assert GlobalBatchSampler(40, 4, seed=4, shuffle=True, drop_last=True).epoch_order(1, 1) != e1


def test_validation_order_covers_every_example_with_equal_batches_per_rank():
    sampler = GlobalBatchSampler(10, batch_size=4, seed=0, shuffle=False, drop_last=False)
    rank0, rank1 = steps(sampler, 0, 0, 2), steps(sampler, 0, 1, 2)
    assert len(rank0) == len(rank1) == 2  # ceil(10 / 8); the last global batch is filled from the start
    seen = {i for batch in rank0 + rank1 for _, i in batch}
    assert seen == set(range(10))
    # Validation keys its examples with epoch 0 whatever epoch Lightning sets: the same noise every time.
    fixed = GlobalBatchSampler(10, batch_size=4, seed=0, shuffle=False, drop_last=False, keyed_by_epoch=False)
    fixed.set_epoch(2)
    assert {e for e, _ in fixed} == {0}


def test_a_smaller_dataset_than_one_global_batch_is_cycled_to_fill_it():
    sampler = GlobalBatchSampler(3, batch_size=4, seed=0, shuffle=True, drop_last=True)
    (batch,) = steps(sampler, 0, 0, 1)
    assert len(batch) == 4 and {i for _, i in batch} == {0, 1, 2}


def test_the_loader_resumes_an_epoch_at_its_next_unseen_batch_with_each_examples_key():
    examples = [Example([2, 6, 5], [6 + i % 10, 1], {}) for i in range(20)]
    collate = Collator(canvas_length=4, pad_id=0)

    def loader():
        return ResumableLoader(ExampleDataset(examples), GlobalBatchSampler(20, 4, seed=1, shuffle=True,
                                                                            drop_last=True), collate)

    uninterrupted = loader()
    uninterrupted.sampler.set_epoch(2)
    batches = list(uninterrupted)
    interrupted = loader()
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    next(iterator), next(iterator)
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches_done": 2}

    restarted = loader()
    restarted.load_state_dict(state)
    restarted.sampler.set_epoch(2)  # Lightning sets the restored epoch again
    rest = list(restarted)
    assert len(rest) == len(batches) - 2
    for a, b in zip(rest, batches[2:]):
        assert torch.equal(a["example_index"], b["example_index"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert torch.all(rest[0]["epoch"] == 2)
    assert restarted.state_dict() == {"epoch": 2, "batches_done": len(batches)}
    # The next epoch starts from its first batch again.
    restarted.sampler.set_epoch(3)
    assert len(list(restarted)) == len(batches)
