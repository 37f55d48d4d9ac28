"""Shared test set-up.

- DDS discovery stays on loopback for every rclpy test and node subprocess
  (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``; ``ROS_LOCALHOST_ONLY`` is ignored in Kilted).
- Markers: ``ros`` (needs rclpy), ``gpu`` (needs CUDA), ``slow``; the first two skip with a
  reason where their requirement is missing.
- Fixtures: ``fixtures_dir`` (test/fixtures), ``ros_domain_id`` (a fresh ROS_DOMAIN_ID, also set
  in os.environ for subprocesses), ``ros_context`` (a private rclpy Context on that domain).
- ``FIXTURES`` and the helpers in ``ros_helpers`` are importable from test modules
  (``from ros_helpers import FIXTURES, private_context``).
"""

from __future__ import annotations

import os

import pytest
from ros_helpers import FIXTURES, fresh_domain_id, private_context

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")

__all__ = ["FIXTURES"]

MARKERS = {
    "ros": "needs rclpy (ROS 2 Python client library); skipped with a reason without it",
    "gpu": "needs a CUDA device; skipped with a reason without one",
    "slow": "takes more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def _rclpy_missing() -> str | None:
    try:
        import rclpy  # noqa: F401
    except Exception as exc:  # ImportError, or a typesupport library that does not load
        return f"rclpy is not importable ({type(exc).__name__}: {exc})"
    return None


def _cuda_missing() -> str | None:
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    return None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available())"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Check each requirement once, and only when a collected test asks for it.
    checks = {"ros": _rclpy_missing, "gpu": _cuda_missing}
    reasons: dict[str, str | None] = {}
    for item in items:
        for name, check in checks.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in reasons:
                reasons[name] = check()
            if reasons[name]:
                item.add_marker(pytest.mark.skip(reason=reasons[name]))


@pytest.fixture(scope="session")
def fixtures_dir():
    """test/fixtures (openpi / LeRobot tiny checkpoints, preprocessing references)."""
    return FIXTURES


@pytest.fixture
def ros_domain_id(monkeypatch: pytest.MonkeyPatch) -> int:
    """A ROS_DOMAIN_ID no earlier test of this session used, exported for subprocesses."""
    domain_id = fresh_domain_id()
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))
    return domain_id


@pytest.fixture
def ros_context(ros_domain_id: int):
    """A private, initialized rclpy Context on ``ros_domain_id``; shut down after the test."""
    with private_context(ros_domain_id) as ctx:
        yield ctx


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (CPU time on a shared 2-core runner; exactness
    never depends on it), the previous count restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
