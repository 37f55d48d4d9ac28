"""Unit tests for pi0_ros.control.chunk: validation (with reasons) and interpretations."""

import numpy as np
import pytest

from pi0_ros.control.chunk import ActionChunk, ChunkError, chunk_from_arrays

NAMES = ("a", "b")
EXACT = 1e-12  # positions are sums of a few float64 terms


def test_absolute_is_the_default_and_times_follow_t0_dt():
    acts = np.array([[0.1, -0.2], [0.3, 0.4], [0.5, 0.6]])
    c = ActionChunk(t0=1.0, dt=0.1, joint_names=NAMES, actions=acts)
    assert c.interpretation == ("absolute", "absolute")
    np.testing.assert_array_equal(c.to_positions(), acts)
    np.testing.assert_allclose(c.times, [1.0, 1.1, 1.2], atol=EXACT)
    assert c.t_end == pytest.approx(1.2) and c.horizon == 3


def test_delta_is_relative_to_state0():
    acts = np.array([[0.1, -0.1], [0.2, 0.0]])
    c = ActionChunk(0.0, 0.1, NAMES, acts, interpretation="delta", state0=[1.0, 2.0])
    np.testing.assert_allclose(c.to_positions(), [[1.1, 1.9], [1.2, 2.0]], atol=EXACT)


def test_velocity_rectangle_rule_from_state0_at_t0():
    """p_0 = state0; p_k = state0 + dt * sum_{i<k} a_i (velocity a_k held over [t_k, t_k+dt))."""
    vel = np.array([[1.0], [2.0], [-4.0], [100.0]])  # the last one acts after t_end only
    c = ActionChunk(0.0, 0.5, ("a",), vel, interpretation="velocity", state0=[3.0])
    np.testing.assert_allclose(c.to_positions()[:, 0], [3.0, 3.5, 4.5, 2.5], atol=EXACT)


def test_per_joint_interpretation_mixes_without_crosstalk():
    acts = np.array([[0.1, 1.0, 0.7], [0.2, 1.0, 0.8], [0.3, 1.0, 0.9]])
    c = ActionChunk(0.0, 0.5, ("arm", "arm2", "gripper"), acts,
                    interpretation=("delta", "velocity", "absolute"), state0=[1.0, 2.0, 5.0])
    np.testing.assert_allclose(c.to_positions(),
                               [[1.1, 2.0, 0.7], [1.2, 2.5, 0.8], [1.3, 3.0, 0.9]], atol=EXACT)


def test_arrays_are_copied_and_read_only():
    acts = np.zeros((2, 2))
    c = ActionChunk(0.0, 0.1, NAMES, acts)
    acts[0, 0] = 5.0  # the caller's array stays theirs
    assert c.actions[0, 0] == 0.0 and acts.flags.writeable
    with pytest.raises(ValueError):
        c.actions[0, 0] = 1.0


@pytest.mark.parametrize("kwargs, reason", [
    (dict(actions=np.full((2, 2), np.nan)), "non_finite"),
    (dict(actions=np.array([[0.0, np.inf], [0.0, 0.0]])), "non_finite"),
    (dict(t0=float("nan")), "non_finite"),
    (dict(interpretation="delta", state0=[0.0, np.nan]), "non_finite"),
    (dict(actions=np.ones((2, 3))), "dimension"),
    (dict(actions=np.ones(4)), "dimension"),
    (dict(actions=np.ones((0, 2))), "dimension"),
    (dict(interpretation="delta", state0=[0.0]), "dimension"),
    (dict(dt=0.0), "dt"),
    (dict(dt=-1.0), "dt"),
    (dict(dt=float("inf")), "dt"),
    (dict(joint_names=("a", "a")), "joint_names"),
    (dict(interpretation="bogus"), "interpretation"),
    (dict(interpretation=("absolute",)), "interpretation"),
    (dict(interpretation="delta"), "interpretation"),  # no state0
])
def test_invalid_chunks_raise_with_reason(kwargs, reason):
    base = dict(t0=0.0, dt=0.1, joint_names=NAMES, actions=np.zeros((2, 2)))
    base.update(kwargs)
    with pytest.raises(ChunkError) as info:
        ActionChunk(**base)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_chunk_from_arrays_flat_row_major():
    c = chunk_from_arrays(0.0, 0.1, NAMES, [1, 2, 3, 4, 5, 6], horizon=3, action_dim=2)
    np.testing.assert_array_equal(c.actions, [[1, 2], [3, 4], [5, 6]])


@pytest.mark.parametrize("kwargs, reason, match", [
    (dict(actions=np.zeros(5)), "dimension", "action_dim"),
    (dict(actions=np.zeros(6), horizon=4), "horizon", "horizon"),
    (dict(actions=np.zeros(6), action_dim=3), "dimension", "actions dim"),
])
def test_chunk_from_arrays_rejects(kwargs, reason, match):
    with pytest.raises(ChunkError, match=match) as info:
        chunk_from_arrays(0.0, 0.1, NAMES, **kwargs)
    assert info.value.reason == reason
