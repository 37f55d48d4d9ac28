"""One backend interface for every way of running the model: prepare / infer / release.

A backend is prepared once for a fixed configuration (``EngineSpec``: cameras, prompt-length
buckets, max batch, denoising steps) and then serves ``infer(inputs)`` with no allocation and no
shape change. Everything configuration-dependent lives in static buffers allocated at prepare
time, at max batch, one set per pipeline slot:

    host inputs --copy_--> static inputs --vision--> image tokens --prefix--> KV cache (in place)
                                                                --denoise--> static actions
                                                                               --copy--> host

``StaticBackend`` owns those buffers, the prompt-bucket choice, padding of smaller batches to a
captured batch size and slicing back, the per-stage timing, and the three-call pipelined protocol
(``begin_prefix`` / ``begin_denoise`` / ``collect``); subclasses decide only how a stage runs
(``_run_stage``): eagerly (``eager.py``) or by replaying a CUDA graph (``cuda_graph.py``).

Threading: a prepared backend is used by one thread only (the worker, ``worker.py``); on CUDA that
thread must also be the one that prepared it. Outputs are host copies, safe to hand to any thread.

Size (~660 lines, over the house's ~600): the static buffers, the bucket / batch selection,
the CPU and CUDA request paths and the pipelined protocol are one state machine over the same
slots; splitting it would spread the slot invariants over files.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..model import Pi0Model, PrefixCache, TimeConditioning
from ..model.rtc import AlignedPrefix, RTCConfig, RTCDenoiser, RTCPrefix

log = logging.getLogger(__name__)

STAGES = ("vision", "prefix", "denoise")
# Default prompt buckets; the last bucket is always the model's max_token_len.
DEFAULT_BUCKETS = (48, 112, 200)


def default_buckets(max_token_len: int) -> tuple[int, ...]:
    """(48, 112, 200) cut to the model's max prompt length: 48 -> (48,), 200 -> (48, 112, 200)."""
    return tuple(b for b in DEFAULT_BUCKETS if b < max_token_len) + (max_token_len,)


@dataclass(frozen=True)
class EngineSpec:
    """The fixed configuration a backend is prepared for (every static shape follows from it).

    ``prompt_buckets``: prompt lengths a prefix is prepared for; a request runs at the smallest
    bucket >= its number of valid tokens (tokens right-padded, so the truncation is exact).
    ``batch_sizes``: batch sizes with their own graph; a request of B rows runs at the smallest
    one >= B, padded (default: ``(max_batch,)`` only, i.e. everything is padded to max batch).
    ``pipeline``: two buffer slots so vision + prefix of observation N+1 can overlap the
    denoising of N (``begin_prefix`` / ``begin_denoise`` / ``collect``); doubles the buffers.
    ``rtc``: real-time chunking (``model/rtc.py``); when enabled the denoise stage is the guided
    sampler (``RTCDenoiser``) over a static ``RTCPrefix`` per slot, loaded from
    ``ModelInputs.prefix`` per request (rows without one: bit-identical to the plain sampler).
    None or disabled: the plain sampler, exactly as without the option.
    """

    num_cameras: int
    num_steps: int = 10
    max_batch: int = 1
    prompt_buckets: tuple[int, ...] = ()  # () -> default_buckets(config.max_token_len)
    batch_sizes: tuple[int, ...] = ()  # () -> (max_batch,)
    pipeline: bool = False
    seed: int = 0  # noise generator seed, used when a request brings no noise
    rtc: RTCConfig | None = None

    def __post_init__(self) -> None:
        if self.rtc is not None and not isinstance(self.rtc, RTCConfig):
            raise ValueError(f"EngineSpec.rtc: expected an RTCConfig or None, found "
                             f"{type(self.rtc).__name__}")
        for name in ("num_cameras", "num_steps", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EngineSpec.{name} must be a positive int, got {value!r}")
        buckets = tuple(sorted(set(int(b) for b in self.prompt_buckets)))
        if any(b <= 0 for b in buckets):
            raise ValueError(f"EngineSpec.prompt_buckets must be positive, got "
                             f"{self.prompt_buckets}")
        object.__setattr__(self, "prompt_buckets", buckets)
        sizes = tuple(sorted(set(int(b) for b in self.batch_sizes))) or (self.max_batch,)
        if sizes[0] <= 0 or sizes[-1] != self.max_batch:
            raise ValueError(f"EngineSpec.batch_sizes {self.batch_sizes} must be positive and "
                             f"end at max_batch={self.max_batch}")
        object.__setattr__(self, "batch_sizes", sizes)

    def resolve(self, max_token_len: int) -> EngineSpec:
        """Fill the default buckets and check them against the model's max prompt length."""
        buckets = self.prompt_buckets or default_buckets(max_token_len)
        if buckets[-1] > max_token_len:
            raise ValueError(f"prompt bucket {buckets[-1]} exceeds the model's max_token_len "
                             f"{max_token_len}")
        return dataclasses.replace(self, prompt_buckets=buckets)

    def bucket_for(self, num_tokens: int) -> int:
        for b in self.prompt_buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"prompt has {num_tokens} valid tokens, more than the largest bucket "
                         f"{self.prompt_buckets[-1]}")

    def batch_for(self, rows: int) -> int:
        for b in self.batch_sizes:
            if b >= rows:
                return b
        raise ValueError(f"batch of {rows} rows exceeds max_batch={self.max_batch}")


@dataclass(frozen=True)
class ModelInputs:
    """One model-level request (after tokenization / normalization / resizing), host tensors.

    images (B, N, 3, S, S) float32 in [-1, 1]; image_masks (B, N) bool; tokens (B, L) int,
    right-padded; token_mask (B, L) bool; state (B, A) float32 zero-padded to A; noise
    (B, H, A) float32 or None (drawn on the device from the backend's seeded generator).
    Host (CPU) tensors: the bucket is chosen from ``token_mask`` without touching the device.
    ``prefix``: RTC only (``EngineSpec.rtc``): one ``AlignedPrefix`` or None per row (the
    previous chunk in normalized model space, aligned to this observation; None: no guidance).
    """

    images: torch.Tensor
    image_masks: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    state: torch.Tensor
    noise: torch.Tensor | None = None
    prefix: tuple[AlignedPrefix | None, ...] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    def num_valid_tokens(self) -> int:
        """1 + the last valid token index over the batch (0 if no row has a valid token)."""
        mask = self.token_mask
        if mask.device.type != "cpu":
            raise ValueError("ModelInputs.token_mask must be a host tensor (choosing the prompt "
                             "bucket from a device tensor would synchronize)")
        cols = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(dim=0).numpy())
        return int(cols[-1]) + 1 if cols.size else 0


@dataclass(frozen=True)
class InferResult:
    """actions (B, H, A) float32 host tensor (normalized); timing in milliseconds:
    ``upload``, ``vision``, ``prefix``, ``denoise``, ``download`` (device time of each stage:
    CUDA events on CUDA, perf_counter on CPU) and ``total`` (host wall time of the request)."""

    actions: torch.Tensor
    timing: Mapping[str, float]
    bucket: int
    batch: int  # the (padded) batch size the request ran at


class Backend(abc.ABC):
    """The interface every engine backend implements (eager, CUDA graph, TensorRT)."""

    name: str = "backend"

    @abc.abstractmethod
    def prepare(self, spec: EngineSpec) -> None:
        """Allocate static buffers, precompute the time conditioning, warm up (and capture)."""

    @abc.abstractmethod
    def infer(self, inputs: ModelInputs) -> InferResult:
        """Run one request synchronously; returns host copies."""

    @abc.abstractmethod
    def release(self) -> None:
        """Drop every buffer / graph; the backend can be prepared again."""

    @property
    @abc.abstractmethod
    def prepared(self) -> bool: ...


# -- shared static-buffer machinery ---------------------------------------------------------------
def cache_rows(cache: PrefixCache, rows: int) -> PrefixCache:
    """A view of the first ``rows`` batch rows of a cache allocated at max batch (k/v are
    (depth, B, ...); every other tensor field is batch-first). Written in place through the view.
    """
    changes = {}
    for f in dataclasses.fields(cache):
        value = getattr(cache, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value[:, :rows] if f.name in ("k", "v") else value[:rows]
    return dataclasses.replace(cache, **changes)


@dataclass
class _Slot:
    """Static device buffers of one pipeline slot (and pinned host staging on CUDA)."""

    images: torch.Tensor  # (Bmax, N, 3, S, S) float32
    image_masks: torch.Tensor  # (Bmax, N) bool
    state: torch.Tensor  # (Bmax, A) float32
    noise: torch.Tensor  # (Bmax, H, A) float32
    tokens: dict[int, torch.Tensor]  # bucket -> (Bmax, bucket) int64
    token_mask: dict[int, torch.Tensor]  # bucket -> (Bmax, bucket) bool
    image_tokens: torch.Tensor  # (Bmax, N*T, W) activation dtype
    caches: dict[int, PrefixCache]  # bucket -> cache at max batch
    actions: torch.Tensor  # (Bmax, H, A) float32
    prefix: RTCPrefix | None = None  # RTC: the previous chunks, (Bmax, H, A) and per-row d / n
    staging: dict[str, torch.Tensor] = field(default_factory=dict)  # pinned host copies
    host_actions: torch.Tensor | None = None  # pinned (Bmax, H, A)
    events: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ticket:
    """A request between ``begin_prefix`` and ``collect`` (one per pipeline slot at a time)."""

    slot: int
    bucket: int
    batch: int
    rows: int
    t0: float
    host_ms: dict[str, float] = field(default_factory=dict)
    denoise_started: bool = False


class StaticBackend(Backend):
    """Static buffers + bucket / batch selection + timing; subclasses run the stages.

    Stage functions (``_stage_fn``) read and write only static tensors, so the same callables
    are run eagerly or captured once and replayed. ``release_unread`` (default on): on CUDA,
    ``prepare`` moves the weights the stages never read to host memory
    (``Pi0Model.release_unread_weights``; another step count can still be prepared).
    """

    release_unread = True

    def __init__(self, model: Pi0Model, device: str | torch.device | None = None, *,
                 runtime: Any = None):
        self.model = model.eval().requires_grad_(False)
        self.device = model.device  # always indexed ("cuda:0") when on a GPU
        if device is not None:
            asked = torch.device(device)
            if asked.type != self.device.type or asked.index not in (None, self.device.index):
                raise ValueError(f"model is on {self.device}, backend asked for {asked}")
        self.config = model.config
        self.spec: EngineSpec | None = None
        self.rtc: RTCConfig | None = None  # the prepared spec's RTC, when enabled
        self.conds: TimeConditioning | None = None
        self._slots: list[_Slot] = []
        self._busy: list[bool] = []
        self._next_slot = 0
        self._generator: torch.Generator | None = None
        # The CUDA runtime the stream / event / pinned-staging branches call: ``torch.cuda`` for
        # a CUDA model, or a stand-in (``cuda_standin.CudaStandin``) that runs them on CPU.
        self._rt = runtime if runtime is not None else (
            torch.cuda if self.device.type == "cuda" else None)
        self._cuda = self._rt is not None
        self._streams: dict[str, Any] = {}
        # Created once per backend and kept across release(): cuBLAS keeps a workspace per
        # (handle, stream), so fresh streams on every prepare would grow memory.
        self._own_streams: list[Any] = []

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def prepared(self) -> bool:
        return self.spec is not None

    def prepare(self, spec: EngineSpec) -> None:
        if self.prepared:
            self.release()
        spec = spec.resolve(self.config.max_token_len)
        if spec.rtc is not None and spec.rtc.enabled:
            self._check_rtc(spec.rtc)
            spec.rtc.delay_bound(self.config.action_horizon)  # max_delay <= H, else ValueError
            self.rtc = spec.rtc
        else:
            self.rtc = None
        if self._cuda:
            self._rt.set_device(self.device.index)  # per thread: the worker thread prepares
        with torch.no_grad():
            # pi0.5 adaRMS modulation / time embeddings: once per step count, never per request.
            self.conds = self.model.time_conditioning(spec.num_steps)
            if self.release_unread and self.device.type == "cuda":
                # The adaRMS dense / time MLP (pi0.5, prepare-only) and the last LM layer's
                # unread q / o / MLP go to host memory: ~0.7 GB of a full pi0.5 in bf16.
                freed = self.model.release_unread_weights("cpu")
                if freed:
                    log.info("moved %.2f GB of weights the stages never read to host memory",
                             freed / 1024**3)
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(spec.seed)
            self._slots = [self._alloc_slot(spec) for _ in range(2 if spec.pipeline else 1)]
            self._busy = [False] * len(self._slots)
            self._next_slot = 0
            if self._cuda:
                while len(self._own_streams) < 2:
                    self._own_streams.append(self._rt.Stream(self.device))
                prefix, denoise = self._own_streams
                self._streams = {"prefix": prefix,
                                 "denoise": denoise if spec.pipeline else prefix}
            self.spec = spec
            if self._cuda:
                # Buffers were zeroed and conds computed on the default stream; the engine
                # streams must not read them earlier.
                self._rt.synchronize(self.device)
            try:
                self._after_prepare()
            except BaseException:
                self.release()
                raise
        log.info("%s prepared: %s", self.name, spec)

    def _after_prepare(self) -> None:
        """Hook: warm up / capture. The eager backend runs one warm-up request."""

    def release(self) -> None:
        if self._cuda and self._streams:
            self._rt.synchronize(self.device)
        self._release_stages()
        self._slots, self.conds, self.spec, self._generator = [], None, None, None
        self.rtc = None
        self._streams = {}
        if self._cuda:
            self._rt.empty_cache()

    def _release_stages(self) -> None:
        """Hook: drop graphs."""

    def _check_rtc(self, config: RTCConfig) -> None:
        """Hook: refuse RTC where the backend cannot run the guided sampler (ValueError)."""
        from ..model.rtc import check_backend

        check_backend(self.name, _precision_name(self.model))

    def _alloc_slot(self, spec: EngineSpec) -> _Slot:
        cfg, dev, b = self.config, self.device, spec.max_batch
        n, s = spec.num_cameras, cfg.vision.image_size
        h, a = cfg.action_horizon, cfg.action_dim
        slot = _Slot(
            images=torch.zeros(b, n, cfg.vision.num_channels, s, s, device=dev),
            image_masks=torch.zeros(b, n, dtype=torch.bool, device=dev),
            state=torch.zeros(b, a, device=dev),
            noise=torch.zeros(b, h, a, device=dev),
            tokens={L: torch.zeros(b, L, dtype=torch.int64, device=dev)
                    for L in spec.prompt_buckets},
            token_mask={L: torch.zeros(b, L, dtype=torch.bool, device=dev)
                        for L in spec.prompt_buckets},
            image_tokens=torch.zeros(b, n * cfg.vision.tokens_per_image, cfg.lm.width,
                                     dtype=self.model.dtype, device=dev),
            caches={L: self.model.new_cache(b, n, L) for L in spec.prompt_buckets},
            actions=torch.zeros(b, h, a, device=dev),
            prefix=RTCPrefix.empty(b, h, a, dev) if self.rtc is not None else None,
        )
        if self._cuda:
            for name in ("images", "image_masks", "state", "noise"):
                t = getattr(slot, name)
                slot.staging[name] = self._pinned(t.shape, t.dtype)
            for L in spec.prompt_buckets:
                slot.staging[f"tokens{L}"] = self._pinned((b, L), torch.int64)
                slot.staging[f"token_mask{L}"] = self._pinned((b, L), torch.bool)
            slot.host_actions = self._pinned((b, h, a), torch.float32)
            names = ("start", "upload", "vision", "prefix", "denoise0", "denoise", "download")
            slot.events = {k: self._rt.Event(enable_timing=True) for k in names}
        return slot

    def _pinned(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Page-locked host staging (the stand-in runtime hands out plain host memory)."""
        alloc = getattr(self._rt, "empty_pinned", None)
        if alloc is not None:
            return alloc(tuple(shape), dtype)
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    # -- stage functions (static tensors only) ----------------------------------------------------
    def _stage_fn(self, stage: str, slot: int, bucket: int, batch: int) -> Callable[[], None]:
        """The callable that runs ``stage`` on the first ``batch`` rows of slot ``slot``'s buffers.

        Writes only static tensors: vision -> image_tokens, prefix -> the bucket's cache, denoise
        -> actions. ``batch`` is one of spec.batch_sizes (a graph's fixed shape)."""
        m, s, conds = self.model, self._slots[slot], self.conds
        if stage == "vision":
            @torch.no_grad()
            def run() -> None:
                s.image_tokens[:batch].copy_(m.embed_images(s.images[:batch]))
        elif stage == "prefix":
            cache = cache_rows(s.caches[bucket], batch)

            @torch.no_grad()
            def run() -> None:
                m.fill_prefix(cache, s.image_tokens[:batch], s.image_masks[:batch],
                              s.tokens[bucket][:batch], s.token_mask[bucket][:batch])
        elif stage == "denoise" and self.rtc is not None:
            cache = cache_rows(s.caches[bucket], batch)
            # One denoiser per stage key: its autograd-safe cache copy is a static buffer of
            # this (slot, bucket, batch), as a captured graph needs.
            rtc = RTCDenoiser(m, self.rtc)
            p = s.prefix
            prefix = RTCPrefix(p.actions[:batch], p.delay[:batch], p.valid_len[:batch],
                               p.dim_mask[:batch])

            @torch.no_grad()
            def run() -> None:
                s.actions[:batch].copy_(rtc.denoise(cache, s.state[:batch], s.noise[:batch],
                                                    conds, prefix))
        elif stage == "denoise":
            cache = cache_rows(s.caches[bucket], batch)

            @torch.no_grad()
            def run() -> None:
                s.actions[:batch].copy_(m.denoise(cache, s.state[:batch], s.noise[:batch],
                                                  conds))
        else:
            raise ValueError(f"unknown stage {stage!r}")
        return run

    @abc.abstractmethod
    def _run_stage(self, stage: str, slot: int, bucket: int, batch: int) -> None:
        """Run (launch, on CUDA) one stage for the given static configuration."""

    def stage_keys(self) -> list[tuple[str, int, int, int]]:
        """Every (stage, slot, bucket, batch) a prepared backend may run (vision has bucket 0)."""
        keys = []
        for slot in range(len(self._slots)):
            for batch in self.spec.batch_sizes:
                keys.append(("vision", slot, 0, batch))
                for bucket in self.spec.prompt_buckets:
                    keys.append(("prefix", slot, bucket, batch))
                    keys.append(("denoise", slot, bucket, batch))
        return keys

    # -- requests --------------------------------------------------------------------------------
    def infer(self, inputs: ModelInputs) -> InferResult:
        ticket = self.begin_prefix(inputs)
        self.begin_denoise(ticket)
        return self.collect(ticket)

    def begin_prefix(self, inputs: ModelInputs) -> Ticket:
        """Upload the request and launch vision + prefix (async on CUDA, on the prefix stream)."""
        if not self.prepared:
            raise RuntimeError(f"{self.name} backend is not prepared")
        t0 = time.perf_counter()
        spec = self.spec
        rows = self._check(inputs)
        bucket = spec.bucket_for(inputs.num_valid_tokens())
        batch = spec.batch_for(rows)
        slot_id = self._next_slot
        if self._busy[slot_id]:
            raise RuntimeError(f"{self.name}: every buffer slot has a request in flight; "
                               f"collect() one first ({len(self._slots)} slot(s), "
                               f"pipeline={spec.pipeline})")
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        self._busy[slot_id] = True
        slot = self._slots[slot_id]
        ticket = Ticket(slot_id, bucket, batch, rows, t0)
        try:
            if self._cuda:
                self._begin_prefix_cuda(ticket, slot, inputs)
            else:
                self._begin_prefix_cpu(ticket, slot, inputs)
        except BaseException:
            self._busy[slot_id] = False
            raise
        return ticket

    def begin_denoise(self, ticket: Ticket) -> None:
        """Launch the denoising loop of a ticket (after its prefix, on the denoise stream)."""
        slot = self._slots[ticket.slot]
        try:
            if self._cuda:
                stream = self._streams["denoise"]
                if stream is not self._streams["prefix"]:
                    stream.wait_event(slot.events["prefix"])
                with self._rt.stream(stream):
                    slot.events["denoise0"].record(stream)
                    self._run_stage("denoise", ticket.slot, ticket.bucket, ticket.batch)
                    slot.events["denoise"].record(stream)
                    slot.host_actions.copy_(slot.actions, non_blocking=True)
                    slot.events["download"].record(stream)
            else:
                t = time.perf_counter()
                self._run_stage("denoise", ticket.slot, ticket.bucket, ticket.batch)
                ticket.host_ms["denoise"] = _ms(t)
        except BaseException:
            self._busy[ticket.slot] = False
            raise
        ticket.denoise_started = True

    def ready(self, ticket: Ticket) -> bool:
        """True when ``collect(ticket)`` would not block."""
        if not self._cuda:
            return True
        return self._slots[ticket.slot].events["download"].query()

    def collect(self, ticket: Ticket) -> InferResult:
        """Wait for a ticket's actions; returns host copies and the stage timing."""
        if not ticket.denoise_started:
            raise RuntimeError("collect() before begin_denoise()")
        slot = self._slots[ticket.slot]
        self._busy[ticket.slot] = False
        if self._cuda:
            ev = slot.events
            ev["download"].synchronize()
            actions = slot.host_actions[:ticket.rows].clone()
            timing = {"upload": ev["start"].elapsed_time(ev["upload"]),
                      "vision": ev["upload"].elapsed_time(ev["vision"]),
                      "prefix": ev["vision"].elapsed_time(ev["prefix"]),
                      "denoise": ev["denoise0"].elapsed_time(ev["denoise"]),
                      "download": ev["denoise"].elapsed_time(ev["download"])}
        else:
            actions = slot.actions[:ticket.rows].clone()
            timing = dict(ticket.host_ms)
            timing["download"] = 0.0
        timing["total"] = _ms(ticket.t0)
        return InferResult(actions, timing, ticket.bucket, ticket.batch)

    # -- internals --------------------------------------------------------------------------------
    def _check(self, x: ModelInputs) -> int:
        cfg, spec = self.config, self.spec
        rows = x.batch_size
        s = cfg.vision.image_size
        expect = {"images": (rows, spec.num_cameras, cfg.vision.num_channels, s, s),
                  "image_masks": (rows, spec.num_cameras), "state": (rows, cfg.action_dim)}
        if x.noise is not None:
            expect["noise"] = (rows, cfg.action_horizon, cfg.action_dim)
        for name, shape in expect.items():
            got = tuple(getattr(x, name).shape)
            if got != shape:
                raise ValueError(f"ModelInputs.{name} has shape {got}, expected {shape} for "
                                 f"{spec.num_cameras} camera(s)")
        if x.tokens.shape != x.token_mask.shape or x.tokens.shape[0] != rows:
            raise ValueError(f"tokens {tuple(x.tokens.shape)} / token_mask "
                             f"{tuple(x.token_mask.shape)} must both be ({rows}, L)")
        if not 0 < rows <= spec.max_batch:
            raise ValueError(f"batch of {rows} rows; this backend serves 1..{spec.max_batch}")
        if x.prefix is not None:
            if self.rtc is None:
                raise ValueError("ModelInputs.prefix: given, but the backend is prepared "
                                 "without RTC (EngineSpec.rtc enabled)")
            if len(x.prefix) != rows:
                raise ValueError(f"ModelInputs.prefix: expected {rows} rows (one per "
                                 f"observation, None for none), found {len(x.prefix)}")
        return rows

    def _load_prefix(self, slot: _Slot, x: ModelInputs, rows: int) -> None:
        """RTC: the request's previous chunks into the slot's static prefix (every other row
        empty, so padded rows and rows without a previous chunk get no guidance)."""
        if slot.prefix is None:
            return
        given = list(x.prefix) if x.prefix is not None else [None] * rows
        slot.prefix.load_(given + [None] * (slot.prefix.delay.shape[0] - rows))

    def _fill(self, dst: dict[str, torch.Tensor], x: ModelInputs, bucket: int, rows: int) -> None:
        """Copy a request into the first ``rows`` rows of ``dst`` (device buffers on CPU, pinned
        staging on CUDA). Tokens are cut (or zero-padded) to the bucket: exact, since positions
        past the last valid token are padding that nothing valid attends to."""
        dst["images"][:rows].copy_(x.images)
        dst["image_masks"][:rows].copy_(x.image_masks)
        dst["state"][:rows].copy_(x.state)
        if x.noise is not None:
            dst["noise"][:rows].copy_(x.noise)
        n = min(bucket, x.tokens.shape[1])
        tok, tmask = dst["tokens"], dst["token_mask"]
        tok[:rows, :n].copy_(x.tokens[:, :n])
        tmask[:rows, :n].copy_(x.token_mask[:, :n])
        if n < bucket:
            tok[:rows, n:].zero_()
            tmask[:rows, n:].zero_()

    def _begin_prefix_cpu(self, ticket: Ticket, slot: _Slot, x: ModelInputs) -> None:
        t = time.perf_counter()
        dst = {"images": slot.images, "image_masks": slot.image_masks, "state": slot.state,
               "noise": slot.noise, "tokens": slot.tokens[ticket.bucket],
               "token_mask": slot.token_mask[ticket.bucket]}
        self._fill(dst, x, ticket.bucket, ticket.rows)
        self._load_prefix(slot, x, ticket.rows)
        if x.noise is None:
            slot.noise[:ticket.rows].normal_(generator=self._generator)
        ticket.host_ms["upload"] = _ms(t)
        for stage in ("vision", "prefix"):
            t = time.perf_counter()
            self._run_stage(stage, ticket.slot, ticket.bucket if stage != "vision" else 0,
                            ticket.batch)
            ticket.host_ms[stage] = _ms(t)

    def _begin_prefix_cuda(self, ticket: Ticket, slot: _Slot, x: ModelInputs) -> None:
        ev, bucket, rows = slot.events, ticket.bucket, ticket.rows
        # The pinned staging of this slot may still feed an earlier async upload.
        ev["upload"].synchronize()
        st = slot.staging
        staging = {"images": st["images"], "image_masks": st["image_masks"],
                   "state": st["state"], "noise": st["noise"], "tokens": st[f"tokens{bucket}"],
                   "token_mask": st[f"token_mask{bucket}"]}
        self._fill(staging, x, bucket, rows)
        stream = self._streams["prefix"]
        if stream is not self._streams["denoise"]:
            # This slot's cache / inputs may still be read by its previous denoise.
            stream.wait_event(ev["download"])
        with self._rt.stream(stream):
            ev["start"].record(stream)
            for name in ("images", "image_masks", "state"):
                getattr(slot, name)[:rows].copy_(staging[name][:rows], non_blocking=True)
            if x.noise is not None:
                slot.noise[:rows].copy_(staging["noise"][:rows], non_blocking=True)
            else:
                slot.noise[:rows].normal_(generator=self._generator)
            slot.tokens[bucket][:rows].copy_(staging["tokens"][:rows], non_blocking=True)
            slot.token_mask[bucket][:rows].copy_(staging["token_mask"][:rows],
                                                 non_blocking=True)
            self._load_prefix(slot, x, rows)  # (small, synchronous host copies)
            ev["upload"].record(stream)
            self._run_stage("vision", ticket.slot, 0, ticket.batch)
            ev["vision"].record(stream)
            self._run_stage("prefix", ticket.slot, bucket, ticket.batch)
            ev["prefix"].record(stream)

    def warmup_inputs(self, rows: int | None = None, bucket: int | None = None) -> ModelInputs:
        """Deterministic dummy request (all cameras valid, ``bucket`` valid tokens)."""
        cfg, spec = self.config, self.spec
        rows = rows or spec.max_batch
        bucket = bucket or spec.prompt_buckets[-1]
        return dummy_inputs(cfg, rows, spec.num_cameras, bucket, seed=spec.seed)


def dummy_inputs(cfg, rows: int, num_cameras: int, num_tokens: int, *,
                 prompt_len: int | None = None, seed: int = 0,
                 with_noise: bool = True) -> ModelInputs:
    """Random model-level inputs: ``num_tokens`` valid tokens right-padded to ``prompt_len``."""
    g = torch.Generator().manual_seed(seed)
    s, L = cfg.vision.image_size, prompt_len or cfg.max_token_len
    tokens = torch.randint(1, cfg.lm.vocab_size, (rows, L), generator=g)
    token_mask = torch.arange(L)[None, :].expand(rows, L) < num_tokens
    return ModelInputs(
        images=torch.rand(rows, num_cameras, cfg.vision.num_channels, s, s, generator=g) * 2 - 1,
        image_masks=torch.ones(rows, num_cameras, dtype=torch.bool),
        tokens=torch.where(token_mask, tokens, 0),
        token_mask=token_mask.clone(),
        state=torch.randn(rows, cfg.action_dim, generator=g),
        noise=(torch.randn(rows, cfg.action_horizon, cfg.action_dim, generator=g)
               if with_noise else None),
    )


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def select_rows(inputs: ModelInputs, rows: Sequence[int] | slice) -> ModelInputs:
    """A request made of some rows of another (tests / batching)."""
    out = {f.name: None if getattr(inputs, f.name) is None else getattr(inputs, f.name)[rows]
           for f in dataclasses.fields(inputs) if f.name != "prefix"}
    if inputs.prefix is not None:
        idx = range(len(inputs.prefix))[rows] if isinstance(rows, slice) else rows
        out["prefix"] = tuple(inputs.prefix[i] for i in idx)
    return ModelInputs(**out)


def _precision_name(model: Pi0Model) -> str:
    """The registry's numeric-format name of a prepared model (fp8: FP8 linears present)."""
    if any(type(mod).__name__.lower().startswith("fp8") for mod in model.modules()):
        return "fp8"
    return "bfloat16" if model.dtype == torch.bfloat16 else "float32"
