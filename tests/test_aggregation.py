"""FedAvg math: hand-checkable averages, BatchNorm buffers, dtypes, purity, errors, and the all-reduce twin.

Each test follows Prepare / Execute / Assert. Numbers are chosen so the expected result can be checked by
hand (weights 1 and 3 normalise to 1/4 and 3/4, exact in binary floating point).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from microfed.training.aggregation import allreduce_average, check_compatible, weighted_average
from microfed.training.errors import MicrofedError

pytestmark = pytest.mark.unit

State = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------- helpers


def small_bn_model(seed: int) -> nn.Sequential:
    """A tiny CNN with BatchNorm: parameters, float running statistics and an int64 batch counter."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )


def trained_state(seed: int, batches: int) -> State:
    """State of `small_bn_model(seed)` after `batches` training-mode forward passes (updates BN buffers)."""
    model = small_bn_model(seed)
    model.train()
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 1, 6, 6, generator=gen) * (seed + 1) + seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def clone_state(state: State) -> State:
    return {k: v.clone() for k, v in state.items()}


def assert_states_equal(a: State, b: State) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gloo_group() -> Iterator[None]:
    """A single-process gloo group (world size 1), always destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- the math


def test_two_states_with_weights_1_and_3_give_the_hand_computed_average() -> None:
    # Prepare: 0 and 4 with weights 1 and 3 -> 0/4 + 3*4/4 = 3.
    a = {"w": torch.tensor([0.0, 8.0, -4.0]), "b": torch.tensor(2.0)}
    b = {"w": torch.tensor([4.0, 0.0, 4.0]), "b": torch.tensor(6.0)}

    # Execute
    out = weighted_average([a, b], [1, 3])

    # Assert
    assert torch.equal(out["w"], torch.tensor([3.0, 2.0, 2.0]))
    assert torch.equal(out["b"], torch.tensor(5.0))
    assert out["w"].dtype == torch.float32


def test_weights_are_normalised() -> None:
    # Prepare
    a = {"w": torch.tensor([0.0, 8.0, -4.0])}
    b = {"w": torch.tensor([4.0, 0.0, 4.0])}

    # Execute
    one_three = weighted_average([a, b], [1, 3])
    two_six = weighted_average([a, b], [2.0, 6.0])
    n_k = weighted_average([a, b], [250, 750])

    # Assert
    assert torch.equal(one_three["w"], two_six["w"])
    assert torch.equal(one_three["w"], n_k["w"])


def test_batchnorm_statistics_are_averaged_and_the_batch_counter_stays_an_integer() -> None:
    # Prepare: two micro-models that saw 1 and 3 batches; weights n_k = 1 and 3.
    a = trained_state(seed=0, batches=1)
    b = trained_state(seed=1, batches=3)
    assert int(a["1.num_batches_tracked"]) == 1 and int(b["1.num_batches_tracked"]) == 3
    assert not torch.equal(a["1.running_mean"], b["1.running_mean"])

    # Execute
    out = weighted_average([a, b], [1, 3])

    # Assert: every float entry (parameters *and* running statistics) is 1/4 a + 3/4 b.
    assert list(out) == list(a)
    for key in ("0.weight", "1.weight", "1.running_mean", "1.running_var", "4.bias"):
        expected = 0.25 * a[key].double() + 0.75 * b[key].double()
        torch.testing.assert_close(out[key].double(), expected, rtol=0, atol=1e-6)
    counter = out["1.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert counter.shape == a["1.num_batches_tracked"].shape
    assert int(counter) == 3  # the maximum of the inputs, not a float average (2.5)
    for key, tensor in out.items():
        assert tensor.dtype == a[key].dtype, key


def test_averaged_state_loads_into_the_model() -> None:
    # Prepare
    a, b = trained_state(seed=0, batches=2), trained_state(seed=1, batches=2)

    # Execute
    model = small_bn_model(seed=5)
    model.load_state_dict(weighted_average([a, b], [1, 1]))

    # Assert
    torch.testing.assert_close(model[1].running_var, (a["1.running_var"] + b["1.running_var"]) / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_tensors_keep_their_dtype(dtype: torch.dtype) -> None:
    # Prepare: values exactly representable in every one of these dtypes.
    a = {"h": torch.tensor([1.0, 2.0, -8.0], dtype=dtype), "f": torch.tensor([0.0])}
    b = {"h": torch.tensor([3.0, 4.0, 8.0], dtype=dtype), "f": torch.tensor([4.0])}

    # Execute
    out = weighted_average([a, b], [1, 1])

    # Assert
    assert out["h"].dtype == dtype
    assert out["f"].dtype == torch.float32
    assert torch.equal(out["h"], torch.tensor([2.0, 3.0, 0.0], dtype=dtype))


def test_integer_tensors_take_the_elementwise_maximum() -> None:
    # Prepare
    a = {"count": torch.tensor([1, 9, 3], dtype=torch.int32)}
    b = {"count": torch.tensor([4, 2, 3], dtype=torch.int32)}

    # Execute
    out = weighted_average([a, b], [100, 1])

    # Assert
    assert out["count"].dtype == torch.int32
    assert torch.equal(out["count"], torch.tensor([4, 9, 3], dtype=torch.int32))


def test_inputs_are_not_modified_and_the_result_shares_no_storage() -> None:
    # Prepare
    states = [trained_state(seed=0, batches=1), trained_state(seed=1, batches=2)]
    states[0]["extra.double"] = torch.tensor([1.0, 2.0], dtype=torch.float64)
    states[1]["extra.double"] = torch.tensor([3.0, 4.0], dtype=torch.float64)
    before = [clone_state(s) for s in states]

    # Execute
    out = weighted_average(states, [2, 5])

    # Assert
    for state, copy in zip(states, before, strict=True):
        assert_states_equal(state, copy)
    for key, tensor in out.items():
        for state in states:
            assert not shares_storage(tensor, state[key]), key
    # Writing into the result must not reach the inputs (a single input is the easiest place to alias).
    single = weighted_average([states[0]], [1])
    for tensor in single.values():
        tensor.fill_(7)
    assert_states_equal(states[0], before[0])


def test_result_does_not_require_grad_when_parameters_do() -> None:
    # Prepare: named_parameters() tensors require grad, unlike state_dict() ones.
    params = [dict(small_bn_model(seed).named_parameters()) for seed in (0, 1)]

    # Execute
    out = weighted_average(params, [1, 1])

    # Assert
    assert not any(t.requires_grad for t in out.values())


def test_permutation_of_inputs_and_weights_does_not_change_the_result() -> None:
    # Prepare
    states = [trained_state(seed=s, batches=s + 1) for s in range(3)]
    weights = [1.0, 2.0, 5.0]
    order = [2, 0, 1]

    # Execute
    out = weighted_average(states, weights)
    permuted = weighted_average([states[i] for i in order], [weights[i] for i in order])

    # Assert
    for key in out:
        assert out[key].dtype == permuted[key].dtype
        torch.testing.assert_close(out[key], permuted[key], rtol=0, atol=1e-6)


def test_equal_inputs_give_the_input_back() -> None:
    # Prepare
    state = trained_state(seed=3, batches=2)

    # Execute
    out = weighted_average([clone_state(state) for _ in range(3)], [1, 1, 1])

    # Assert
    assert_states_equal(out, state)


# -------------------------------------------------------------------------------------------- errors


def pair(**overrides: torch.Tensor) -> list[State]:
    """Two compatible states; keyword overrides replace (or add) entries of the second one."""
    a = {"layer.weight": torch.zeros(2, 3), "layer.bias": torch.zeros(2), "bn.count": torch.tensor(1)}
    b = clone_state(a)
    b.update(overrides)
    return [a, b]


NAMES = ["w0", "w1"]


def test_empty_input_is_an_error() -> None:
    with pytest.raises(MicrofedError, match="nothing to aggregate"):
        weighted_average([], [])
    with pytest.raises(MicrofedError, match="nothing to aggregate"):
        check_compatible([])


def test_weights_must_match_the_number_of_states() -> None:
    with pytest.raises(MicrofedError, match=r"2 micro-models but 1 weights"):
        weighted_average(pair(), [1.0])


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf])
def test_a_non_positive_or_non_finite_weight_names_its_input(bad: float) -> None:
    with pytest.raises(MicrofedError, match=r"^w1: weight must be a positive number") as info:
        weighted_average(pair(), [1.0, bad], names=NAMES)
    assert "w0" not in str(info.value)


def test_without_names_the_input_is_named_by_position() -> None:
    with pytest.raises(MicrofedError, match=r"input 1"):
        weighted_average(pair(), [1.0, -2.0])


def test_a_missing_key_names_the_key_and_the_input() -> None:
    # Prepare
    states = pair()
    del states[1]["layer.bias"]

    # Execute / Assert
    with pytest.raises(MicrofedError, match=r"w1") as info:
        weighted_average(states, [1, 1], names=NAMES)
    assert "'layer.bias'" in str(info.value)
    assert "missing" in str(info.value)


def test_an_extra_key_names_the_key_and_the_input() -> None:
    states = pair(**{"head.weight": torch.zeros(1)})

    with pytest.raises(MicrofedError, match=r"w1") as info:
        weighted_average(states, [1, 1], names=NAMES)
    assert "'head.weight'" in str(info.value)
    assert "unexpected" in str(info.value)


def test_a_key_missing_from_the_first_input_is_reported_too() -> None:
    states = pair()
    del states[0]["layer.bias"]

    with pytest.raises(MicrofedError, match=r"w1") as info:
        weighted_average(states, [1, 1], names=NAMES)
    assert "'layer.bias'" in str(info.value)


def test_a_shape_mismatch_names_the_key_the_input_and_both_shapes() -> None:
    states = pair(**{"layer.weight": torch.zeros(3, 2)})

    with pytest.raises(MicrofedError, match=r"^w1: tensor 'layer.weight'") as info:
        weighted_average(states, [1, 1], names=NAMES)
    assert "(3, 2)" in str(info.value) and "(2, 3)" in str(info.value)


def test_a_dtype_mismatch_names_the_key_and_the_input() -> None:
    states = pair(**{"layer.bias": torch.zeros(2, dtype=torch.float64)})

    with pytest.raises(MicrofedError, match=r"^w1: tensor 'layer.bias'") as info:
        weighted_average(states, [1, 1], names=NAMES)
    assert "float64" in str(info.value) and "float32" in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_a_tensor_names_the_key_and_the_input(bad: float) -> None:
    states = pair(**{"layer.bias": torch.tensor([0.0, bad])})

    with pytest.raises(MicrofedError, match=r"^w1: tensor 'layer.bias' contains NaN or Inf"):
        weighted_average(states, [1, 1], names=NAMES)


def test_check_compatible_accepts_matching_states() -> None:
    check_compatible(pair(), NAMES)  # no exception


# --------------------------------------------------------------------------- all-reduce (world size 1)


def test_allreduce_on_one_rank_returns_the_state_itself(gloo_group: None) -> None:
    # Prepare: one rank, so the weighted average over ranks is the state itself (= weighted_average([s])).
    state = trained_state(seed=2, batches=3)
    state["half"] = torch.tensor([1.5, -2.0], dtype=torch.float16)
    state["brain"] = torch.tensor([0.25, 3.0], dtype=torch.bfloat16)
    before = clone_state(state)

    # Execute
    out = allreduce_average(state, weight=120.0)

    # Assert
    assert_states_equal(out, weighted_average([before], [120.0]))
    assert_states_equal(out, before)
    assert out["1.num_batches_tracked"].dtype == torch.int64
    assert int(out["1.num_batches_tracked"]) == 3
    assert_states_equal(state, before)
    for key, tensor in out.items():
        assert not shares_storage(tensor, state[key]), key


@pytest.mark.parametrize("bad", [0.0, -3.0, math.nan])
def test_allreduce_rejects_a_non_positive_weight(gloo_group: None, bad: float) -> None:
    with pytest.raises(MicrofedError, match="weight must be a positive number"):
        allreduce_average({"w": torch.zeros(2)}, weight=bad)
