"""pi0-ros-infer: run a checkpoint on model-level inputs offline (check a checkpoint by hand).

    pi0-ros-infer --checkpoint DIR --inputs INPUTS.safetensors --num-steps 10 \
        --output OUT.safetensors [--dtype float32|bfloat16] [--device cpu|cuda] [--geometry G.json]

INPUTS holds, in the layout of the openpi fixtures: ``image.<camera>`` [B,3,S,S] float in [-1, 1],
``image_mask.<camera>`` [B] bool, ``tokenized_prompt`` [B,L] int, ``tokenized_prompt_mask``
[B,L] bool, ``state`` [B,A] and optionally ``noise`` [B,H,A] (drawn from --seed when absent).
Cameras are taken in the order of the checkpoint config (``geometry.cameras``), else openpi's
(base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb); OUT receives ``actions`` [B,H,A] float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pi0_ros.tools.checkpoint_args import add_checkpoint_options, checkpoint_kwargs


def _load_inputs(path: Path, cameras, config) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    raw = load_file(str(path))
    need = [f"image.{c}" for c in cameras] + [f"image_mask.{c}" for c in cameras] + [
        "tokenized_prompt", "tokenized_prompt_mask", "state"]
    missing = [k for k in need if k not in raw]
    if missing:
        raise SystemExit(f"error: {path} lacks {missing} (cameras from the checkpoint config: "
                         f"{list(cameras)}; found keys {sorted(raw)})")
    images = torch.stack([raw[f"image.{c}"].float() for c in cameras], dim=1)
    s = config.vision.image_size
    if images.shape[2:] != (3, s, s):
        raise SystemExit(f"error: images must be [B,3,{s},{s}] for this checkpoint, found "
                         f"{list(images.shape[:1]) + list(images.shape[2:])}")
    state = raw["state"].float()
    if state.shape[-1] < config.action_dim:  # zero-pad to the model's state width (openpi)
        state = torch.nn.functional.pad(state, (0, config.action_dim - state.shape[-1]))
    return {
        "images": images,
        "image_masks": torch.stack([raw[f"image_mask.{c}"].bool() for c in cameras], dim=1),
        "tokens": raw["tokenized_prompt"].long(),
        "token_mask": raw["tokenized_prompt_mask"].bool(),
        "state": state,
        "noise": raw.get("noise"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi0-ros-infer", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--inputs", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_checkpoint_options(parser)  # --geometry FILE.json, --embedding (shared by every CLI)
    parser.add_argument("--seed", type=int, default=0, help="noise seed when INPUTS has none")
    args = parser.parse_args(argv)
    if args.num_steps <= 0:
        parser.error(f"--num-steps must be positive, got {args.num_steps}")

    from pi0_ros.model import CheckpointError, load_checkpoint
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    try:
        model, config = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                        **checkpoint_kwargs(args))
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    batch = {k: (v.to(args.device) if v is not None else None)
             for k, v in _load_inputs(args.inputs, config.cameras, config).items()}
    generator = None
    if batch["noise"] is None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    t1 = time.perf_counter()
    actions = model.sample_actions(**batch, num_steps=args.num_steps, generator=generator)
    if actions.is_cuda:
        torch.cuda.synchronize()
    infer_s = time.perf_counter() - t1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({"actions": actions.float().cpu().contiguous()}, str(args.output))
    kind = "pi0.5" if config.pi05 else "pi0"
    print(f"loaded {kind} checkpoint {args.checkpoint} ({args.dtype}, {args.device}) "
          f"in {load_s * 1e3:.1f} ms")
    print(f"inference: batch {actions.shape[0]}, {len(config.cameras)} cameras, "
          f"{args.num_steps} steps in {infer_s * 1e3:.1f} ms")
    print(f"wrote actions {list(actions.shape)} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
