"""Parameters -> NodeConfig: one mapping function, ValueErrors that name the value (no DDS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pi0_ros.ros.params import PARAMETERS, NodeConfig, config_from_parameters

CONFIG = Path(__file__).resolve().parents[1] / "config" / "policy_node.yaml"
GOOD = {name: default for name, (default, _) in PARAMETERS.items()}
GOOD.update(
    {
        "checkpoint": "/ckpt",
        "prompt": "pick",
        "cameras.topics": ["/a", "/b"],
        "joint_states.names": ["j1", "j2"],
        "actions.joint_names": ["j1", "j2", "g"],
    }
)


def _config(**changes) -> NodeConfig:
    values = dict(GOOD, **{k.replace("__", "."): v for k, v in changes.items()})
    return config_from_parameters(values.__getitem__)


def test_defaults_map_onto_a_frozen_config():
    config = _config()
    assert [c.topic for c in config.cameras] == ["/a", "/b"]
    assert all(not c.compressed and c.slot == "" for c in config.cameras)
    assert config.state_joint_names == ("j1", "j2")
    assert config.model.backend == "auto" and config.min_period == 0.0
    with pytest.raises(AttributeError):
        config.prompt = "other"  # frozen


def test_cameras_are_parallel_arrays():
    config = _config(
        cameras__slots=["left_wrist_0_rgb", "base_0_rgb"],
        cameras__transports=["compressed", "raw"],
    )
    assert [(c.slot, c.compressed) for c in config.cameras] == [
        ("left_wrist_0_rgb", True),
        ("base_0_rgb", False),
    ]


def test_rate_cap_becomes_a_period():
    assert _config(max_rate=4.0).min_period == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model__backend": "warp"}, "warp"),
        ({"model__dtype": "int3"}, "int3"),
        ({"model__device": "tpu"}, "tpu"),
        ({"model__num_steps": 0}, "num_steps"),
        ({"checkpoint": ""}, "checkpoint"),
        ({"prompt": "   "}, "prompt"),
        ({"cameras__topics": ["/a", "/b", "/c", "/d"]}, "4 cameras"),
        ({"cameras__topics": []}, "0 cameras"),
        ({"cameras__topics": ["/a", "/a"]}, "duplicate"),
        ({"cameras__slots": ["base_0_rgb"]}, "1 slots for 2 topics"),
        ({"cameras__slots": ["x", "x"]}, "duplicate slots"),
        ({"cameras__transports": ["raw", "theora"]}, "theora"),
        ({"joint_states__names": []}, "joint_states.names"),
        ({"joint_states__names": ["a", "a"]}, "duplicate"),
        ({"actions__joint_names": []}, "actions.joint_names"),
        ({"actions__dt": 0.0}, "actions.dt"),
        ({"max_rate": -1.0}, "-1.0"),
        ({"sync__slop": -0.01}, "-0.01"),
        ({"sync__queue_size": 0}, "queue_size"),
        ({"max_input_age": -0.5}, "-0.5"),
        ({"max_clock_skew": -1.0}, "max_clock_skew"),
        ({"qos__input_reliability": "sometimes"}, "sometimes"),
        ({"qos__input_depth": 0}, "input_depth"),
        ({"viz__path_indices": [0, 1]}, r"\[0, 1\]"),
        ({"viz__path_indices": [0, 1, 7]}, "out of range"),
        ({"viz__lookahead": -1}, "lookahead"),
        ({"diagnostics__period": 0.0}, "diagnostics.period"),
    ],
)
def test_invalid_values_raise_naming_the_value(changes, match):
    with pytest.raises(ValueError, match=match):
        _config(**changes)


def test_shipped_config_declares_only_known_parameters_and_is_valid():
    data = yaml.safe_load(CONFIG.read_text())
    params = data["/**"]["ros__parameters"]

    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    flat = dict(flatten(params))
    assert set(flat) <= set(PARAMETERS), set(flat) - set(PARAMETERS)
    values = {**GOOD, **flat, "checkpoint": "/ckpt"}
    config = config_from_parameters(values.__getitem__)
    assert len(config.cameras) == 2
    # The demo checkpoint's layout; state and action joints (and config/executor.yaml) agree.
    assert len(config.state_joint_names) == 8 and len(config.action_joint_names) == 8
