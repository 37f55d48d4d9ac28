"""The policy a pipeline runs, built from the node's settings (the node, the replay, the server).

One function, so the live node and the offline replay load the same thing the same way: the
engine registry's backend and numeric format (``engine/registry.py``), observations keyed by model
slot (``input_keys="slots"``: slot names, "state", "prompt"; slots no configured camera feeds are
black with mask False), the noise seed and the prompt buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import NodeConfig


def engine_options(config: NodeConfig) -> Any:
    """The ``EngineOptions`` the parameters describe (checked against the registry)."""
    from ..engine.registry import EngineOptions

    m = config.model
    return EngineOptions(backend=m.backend, precision=m.dtype, device=m.device,
                         engine_dir=m.engine_dir, build_if_missing=m.build_if_missing,
                         runtime=m.runtime, checkpoint=m.checkpoint).resolved()


def load_policy(config: NodeConfig, camera_slots: Sequence[str] = ()) -> Any:
    """``pi0_ros.policy.Policy`` from the checkpoint the settings name, or a
    ``pi0_ros.serve.RemotePolicy`` on the server ``remote.uri`` names.

    ``camera_slots``: the configured cameras' slots ("" = resolved from the checkpoint later)."""
    import os

    from ..policy import Policy

    m = config.model
    if m.remote_uri:
        from ..serve import RemotePolicy

        return RemotePolicy(m.remote_uri, api_key=m.remote_api_key
                            or os.environ.get("PI0_ROS_API_KEY") or None,
                            timeout_s=m.remote_timeout)
    if m.torch_threads > 0:  # a fixed small count: steady latency, reproducible replays
        from ..processing import set_torch_threads

        set_torch_threads(m.torch_threads)
    slots = tuple(camera_slots)
    return Policy.from_checkpoint(
        m.checkpoint,
        engine_options=engine_options(config),
        num_steps=m.num_steps,
        norm_stats=m.norm_stats or None,
        tokenizer=m.tokenizer or None,
        cameras={s: s for s in slots} if slots and all(slots) else None,
        input_keys="slots",
        prompt_buckets=m.prompt_buckets,
        seed=m.seed,
        pipeline=m.pipeline,
        embedding=m.embedding or None,
        allow_unknown_processor_steps=m.allow_unknown_processor_steps,
        resize=None if m.resize == "auto" else m.resize,
        semantics=m.semantics,
        rtc=config.rtc if config.rtc.enabled else None,
    )
