"""Property-based tests (hypothesis) of the two pieces of math everything rests on: the split and FedAvg.

Split: for any class sizes, shard counts, ratios, strategies and seeds, the shards partition the training set
(every example in exactly one shard), the same seed gives the same shards, and the manifests written to disk
count exactly what the tensors hold. A split that cannot be made is refused with a MicrofedError, never
answered with a partial one.

Aggregation: the weights are normalised (scaling them changes nothing; every output lies between the inputs),
the order of the inputs does not matter, equal inputs come back unchanged, integer buffers stay integers (the
maximum), dtypes are kept and the inputs are never modified.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from microfed.training.aggregation import weighted_average
from microfed.training.datasets import ImageData, LoadedDataset
from microfed.training.errors import MicrofedError
from microfed.training.io import read_safetensors, sha256_file
from microfed.training.shards import SPLITS, SplitConfig, assign_shards, write_shards

pytestmark = pytest.mark.unit

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DISK = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------- split


@st.composite
def split_cases(draw: st.DrawFn) -> tuple[list[int], SplitConfig]:
    per_class = draw(st.lists(st.integers(0, 30), min_size=1, max_size=6))
    workers = draw(st.integers(1, 6))
    split = draw(st.sampled_from(SPLITS))
    ratios = None
    if split != "dirichlet" and draw(st.booleans()):
        ratios = tuple(draw(st.lists(st.floats(0.1, 10.0), min_size=workers, max_size=workers)))
    alpha = draw(st.sampled_from([0.05, 0.5, 5.0, 100.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    config = SplitConfig(val_fraction=0.0, workers=workers, split=split, ratios=ratios, alpha=alpha, seed=seed)
    return per_class, config


def labels_for(per_class: list[int], seed: int = 0) -> torch.Tensor:
    labels = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor(per_class, dtype=torch.int64))
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def class_names(n: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(n))


@FAST
@given(split_cases())
def test_every_example_lands_in_exactly_one_shard_or_the_split_is_refused(case: tuple[list[int], SplitConfig]) -> None:
    per_class, config = case
    labels = labels_for(per_class)
    n, k = len(labels), config.workers

    try:
        parts = assign_shards(labels, class_names(len(per_class)), config)
    except MicrofedError as e:
        # Refusals are for splits that cannot be made, and they never happen where one obviously can.
        assert "empty" in str(e) or "too few" in str(e) or "dirichlet" in str(e)
        assert not (config.split == "iid" and config.ratios is None and n >= k)
        assert not (config.split == "stratified" and config.ratios is None and min(per_class) >= k)
        return

    assert len(parts) == k
    everything = torch.cat(parts)
    assert torch.equal(everything.sort().values, torch.arange(n))  # each index exactly once
    assert all(p.numel() > 0 and p.dtype == torch.int64 for p in parts)
    again = assign_shards(labels, class_names(len(per_class)), config)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))  # deterministic for the seed
    if config.split == "stratified" and config.ratios is None:
        for part in parts:  # every shard holds n_c / k of class c, rounded either way
            counts = torch.bincount(labels[part], minlength=len(per_class)).tolist()
            assert all(abs(count - size / k) < 1 for count, size in zip(counts, per_class, strict=True))


@DISK
@given(split_cases(), st.integers(1, 3), st.integers(0, 5))
def test_the_manifests_count_what_the_shards_hold(
    case: tuple[list[int], SplitConfig], channels_choice: int, test_size: int
) -> None:
    per_class, config = case
    channels = 1 if channels_choice < 3 else 3
    labels = labels_for(per_class, seed=1)
    n = len(labels)
    images = torch.arange(n * channels * 4 * 3, dtype=torch.int64).remainder(251).to(torch.uint8)
    images = images.view(n, channels, 4, 3)
    names = class_names(len(per_class))
    test_labels = torch.arange(test_size) % len(per_class)
    dataset = LoadedDataset(
        name="prop",
        train=ImageData(images=images, labels=labels, class_names=names),
        test=ImageData(images=torch.zeros(test_size, channels, 4, 3, dtype=torch.uint8), labels=test_labels,
                       class_names=names),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        try:
            summary = write_shards(dataset, out, config)
        except MicrofedError:
            return  # refused splits are covered above; nothing else to count
        seen: list[torch.Tensor] = []
        for i, listed in enumerate(summary["shards"]):
            tensors, _ = read_safetensors(out / listed["file"])
            manifest = json.loads((out / f"shard-{i:05d}.json").read_text())
            shard_labels = tensors["labels"]
            histogram = torch.bincount(shard_labels, minlength=len(names)).tolist()
            assert manifest["num_examples"] == listed["num_examples"] == len(shard_labels) == len(tensors["images"])
            assert manifest["class_histogram"] == listed["class_histogram"] == histogram
            assert manifest["sha256"] == listed["sha256"] == sha256_file(out / listed["file"])
            assert manifest["image_shape"] == [channels, 4, 3] and manifest["class_names"] == list(names)
            seen.append(shard_labels)
        assert summary["num_train_examples"] == n == sum(s["num_examples"] for s in summary["shards"])
        everything = torch.cat(seen)
        assert torch.bincount(everything, minlength=len(names)).tolist() == per_class  # nothing lost or doubled
        assert summary["num_test_examples"] == test_size
        assert json.loads((out / "test.json").read_text())["num_examples"] == test_size


# -------------------------------------------------------------------------------------------- average

FLOAT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Rounding of the float64 accumulator, seen in each result dtype (relative; bfloat16 keeps 8 bits of mantissa).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}
Case = tuple[list[dict[str, torch.Tensor]], list[float]]  # states and their weights
finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def state_sets(draw: st.DrawFn, min_states: int = 1) -> Case:
    """k compatible states (a few float tensors of drawn shapes and dtypes plus an int64 counter) and weights."""
    k = draw(st.integers(min_states, 5))
    layout = draw(
        st.lists(
            st.tuples(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), st.sampled_from(sorted(FLOAT_DTYPES))),
            min_size=1,
            max_size=3,
        )
    )
    states = []
    for _ in range(k):
        state = {}
        for i, (shape, dtype) in enumerate(layout):
            values = draw(hnp.arrays(np.float32, shape, elements=finite32))
            state[f"t{i}"] = torch.from_numpy(values).to(FLOAT_DTYPES[dtype])
        state["bn.num_batches_tracked"] = torch.tensor(draw(st.integers(0, 10**6)), dtype=torch.int64)
        states.append(state)
    weights = draw(
        st.lists(st.one_of(st.integers(1, 100_000).map(float), st.floats(1e-3, 1e6)), min_size=k, max_size=k)
    )
    return states, weights


def snapshot(states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{key: t.clone() for key, t in s.items()} for s in states]


@FAST
@given(state_sets(), st.integers(-8, 8))
def test_weights_are_normalised(case: Case, power: int) -> None:
    states, weights = case
    before = snapshot(states)

    out = weighted_average(states, weights)
    scaled = weighted_average(states, [w * 2.0**power for w in weights])  # a power of two scales exactly

    for key in out:
        assert torch.equal(out[key], scaled[key]), key
        if out[key].is_floating_point():  # a convex combination stays between the inputs, element-wise
            stacked = torch.stack([s[key] for s in states]).double()
            lo, hi = stacked.min(0).values, stacked.max(0).values
            # exact below float64; a float64 tensor has no spare accumulator bits and may step out by an ulp
            slack = 1e-15 * torch.maximum(lo.abs(), hi.abs()) if out[key].dtype == torch.float64 else 0.0
            assert bool((out[key].double() >= lo - slack).all()), key
            assert bool((out[key].double() <= hi + slack).all()), key
            expected = sum(w / sum(weights) * s[key].double() for s, w in zip(states, weights, strict=True))
            assert isinstance(expected, torch.Tensor)
            tolerance = TOLERANCE[out[key].dtype]
            torch.testing.assert_close(out[key].double(), expected, rtol=tolerance, atol=tolerance)
    for state, original in zip(states, before, strict=True):  # inputs untouched
        assert all(torch.equal(state[key], original[key]) for key in state)


@FAST
@given(state_sets(min_states=2), st.data())
def test_the_order_of_the_inputs_does_not_matter(case: Case, data: st.DataObject) -> None:
    states, weights = case
    order = data.draw(st.permutations(range(len(states))))

    out = weighted_average(states, weights)
    permuted = weighted_average([states[i] for i in order], [weights[i] for i in order])

    for key in out:
        assert out[key].dtype == permuted[key].dtype == states[0][key].dtype
        if out[key].is_floating_point():
            # float64 sums in another order can differ in their last bit, which can round to a neighbour
            tolerance = TOLERANCE[out[key].dtype]
            torch.testing.assert_close(out[key], permuted[key], rtol=tolerance, atol=tolerance)
        else:
            assert torch.equal(out[key], permuted[key])


@FAST
@given(state_sets(), st.integers(1, 5))
def test_equal_inputs_come_back_unchanged(case: Case, k: int) -> None:
    states, weights = case
    state = states[0]

    out = weighted_average([snapshot([state])[0] for _ in range(k)], (weights * k)[:k])

    assert out.keys() == state.keys()
    for key in state:
        assert out[key].dtype == state[key].dtype
        if state[key].dtype == torch.float64:
            # The float64 accumulator has no spare bits over a float64 tensor: k * (x * 1/k) may be off by an ulp.
            torch.testing.assert_close(out[key], state[key], rtol=1e-15, atol=0)
        else:  # every narrower dtype is exact: the accumulator's rounding vanishes when cast back
            assert torch.equal(out[key], state[key]), key


@FAST
@given(state_sets())
def test_integer_buffers_stay_integers_and_take_the_maximum(
    case: Case,
) -> None:
    states, weights = case

    out = weighted_average(states, weights)

    counter = out["bn.num_batches_tracked"]
    assert counter.dtype == torch.int64 and counter.shape == ()
    assert int(counter) == max(int(s["bn.num_batches_tracked"]) for s in states)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@FAST
@given(case=state_sets())
def test_a_non_finite_value_anywhere_is_refused(case: Case, bad: float) -> None:
    states, weights = case
    victim = states[-1]["t0"]
    victim.view(-1)[0] = bad

    with pytest.raises(MicrofedError, match=f"input {len(states) - 1}: tensor 't0' contains NaN or Inf"):
        weighted_average(states, weights)
