"""LeRobot checkpoints as LeRobot >= 0.5 writes them: the embedding the model uses (untied
`embed_tokens` / `lm_head`), the processor steps pi0_ros implements, `rtc_config`.

The untied fixtures are made here from `lerobot_tiny_pi05` (tmp dir): LeRobot >= 0.5 keeps
`...language_model.embed_tokens.weight` and `...paligemma.lm_head.weight` as two parameters, and
fine-tuning moves only `embed_tokens` (the one read at inference), so the stored `lm_head` is a
stale copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pi0_ros.model import CheckpointError, load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
OPENPI = FIXTURES / "openpi_tiny_pi05"
LEROBOT = FIXTURES / "lerobot_tiny_pi05"
GEOMETRY = LEROBOT / "fixture.json"

P = "paligemma_with_expert.paligemma."
LM_HEAD = P + "lm_head.weight"
EMBED = P + "model.language_model.embed_tokens.weight"
FINE_TUNE_STEP = 0.05  # size of the change made to embed_tokens (as a fine-tune would)
SAME_ATOL = 1e-6  # the model with the untied checkpoint vs the same weights set by hand
MEANINGFUL = 1e-3  # the stale lm_head must change actions by more than this (else no test)

torch.set_grad_enabled(False)


def _untie(src: Path, dst: Path, prefix: str, *, equal: bool = False) -> torch.Tensor:
    """Copy checkpoint `src` to `dst`, storing `embed_tokens` next to `lm_head`, changed by a
    fine-tune-like step unless ``equal``; -> the stored embed_tokens."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    lm_head = tensors[prefix + LM_HEAD]
    g = torch.Generator().manual_seed(0)
    embed = lm_head.clone() if equal else (
        lm_head + FINE_TUNE_STEP * torch.randn(lm_head.shape, generator=g))
    tensors[prefix + EMBED] = embed.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return embed


def _batch(config):
    inputs = load_file(str(OPENPI / "inputs.safetensors"))
    return dict(
        images=torch.stack([inputs[f"image.{c}"] for c in config.cameras], dim=1),
        image_masks=torch.stack([inputs[f"image_mask.{c}"] for c in config.cameras], dim=1),
        tokens=inputs["tokenized_prompt"].long(), token_mask=inputs["tokenized_prompt_mask"],
        state=inputs["state"], noise=inputs["noise"], num_steps=3)


# -- the embedding --------------------------------------------------------------------------------
def test_untied_lerobot_checkpoint_uses_embed_tokens(tmp_path):
    embed = _untie(LEROBOT, tmp_path / "ft", "model.")
    model, config = load_checkpoint(tmp_path / "ft", geometry=GEOMETRY)
    torch.testing.assert_close(model.embed_tokens.weight, embed, rtol=0, atol=0)

    # End to end: the same actions as the original weights with embed_tokens set by hand ...
    reference, _ = load_checkpoint(LEROBOT, geometry=GEOMETRY)
    stale = reference.sample_actions(**_batch(config))
    reference.embed_tokens.weight.copy_(embed)
    expected = reference.sample_actions(**_batch(config))
    actions = model.sample_actions(**_batch(config))
    assert (actions - expected).abs().max().item() <= SAME_ATOL
    # ... and the stale lm_head would have given visibly different ones.
    assert (stale - expected).abs().max().item() > MEANINGFUL


def test_untied_openpi_layout_is_ambiguous(tmp_path):
    embed = _untie(OPENPI, tmp_path / "c", "")
    with pytest.raises(CheckpointError, match=r"two different token embeddings, "
                       r"'.*lm_head.weight' and '.*embed_tokens.weight' \(max \|diff\| .*\).*"
                       r"embedding='embed_tokens'"):
        load_checkpoint(tmp_path / "c")
    model, _ = load_checkpoint(tmp_path / "c", embedding="embed_tokens")
    torch.testing.assert_close(model.embed_tokens.weight, embed, rtol=0, atol=0)
    model, _ = load_checkpoint(tmp_path / "c", embedding="lm_head")
    lm_head = load_file(str(OPENPI / "model.safetensors"))[LM_HEAD]
    torch.testing.assert_close(model.embed_tokens.weight, lm_head, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="embedding='output'.*expected one of"):
        load_checkpoint(tmp_path / "c", embedding="output")


def test_tied_copies_in_openpi_layout_load(tmp_path):
    embed = _untie(OPENPI, tmp_path / "c", "", equal=True)
    model, _ = load_checkpoint(tmp_path / "c")
    torch.testing.assert_close(model.embed_tokens.weight, embed, rtol=0, atol=0)


def test_embedding_stored_once_under_either_name(tmp_path):
    """LeRobot 0.4.4 / openpi store it once (as lm_head); a file with only embed_tokens loads."""
    ckpt = tmp_path / "c"
    shutil.copytree(LEROBOT, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model." + EMBED] = tensors.pop("model." + LM_HEAD)
    save_file(tensors, str(ckpt / "model.safetensors"))
    model, _ = load_checkpoint(ckpt, geometry=GEOMETRY)
    torch.testing.assert_close(model.embed_tokens.weight, tensors["model." + EMBED])


# -- the CLIs that load a checkpoint: one set of checkpoint options -------------------------------
def _cli_mains():
    from pi0_ros.tools import bench, export, infer

    return {"pi0-ros-bench": bench.main, "pi0-ros-infer": infer.main,
            "pi0-ros-export": export.main}


@pytest.mark.parametrize("prog", ["pi0-ros-bench", "pi0-ros-infer", "pi0-ros-export"])
def test_every_cli_takes_the_checkpoint_options(prog, capsys):
    with pytest.raises(SystemExit) as done:
        _cli_mains()[prog](["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "FILE.json" in out and "--geometry" in out
    assert "--embedding {embed_tokens,lm_head}" in out


def _bench(tmp_path, *extra):
    from pi0_ros.tools import bench

    return bench.main([*extra, "--device", "cpu", "--iters", "1", "--warmup", "0", "--steps", "1",
                       "--peak-tflops", "1", "--peak-gbps", "10", "--json",
                       str(tmp_path / "b.json")])


def test_bench_checkpoint_with_geometry_file(tmp_path):
    assert _bench(tmp_path, "--checkpoint", str(LEROBOT), "--geometry", str(GEOMETRY)) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["config"]["checkpoint"] == str(LEROBOT) and data["config"]["pi05"]
    assert data["runs"][0]["finite"]


def test_bench_checkpoint_errors_are_messages(tmp_path):
    # LeRobot's config names gemma_2b: without the override the tensors disagree -> a message
    # that points at the option the bench now has (not a traceback).
    with pytest.raises(SystemExit, match=r"pi0-ros-bench: error: .*has shape .*--geometry "
                                         r"FILE.json"):
        _bench(tmp_path, "--checkpoint", str(LEROBOT))
    with pytest.raises(SystemExit, match="pi0-ros-bench: error: checkpoint .*nope does not"):
        _bench(tmp_path, "--checkpoint", str(tmp_path / "nope"))
    with pytest.raises(SystemExit) as bad:  # argparse errors: exit status 2
        _bench(tmp_path, "--checkpoint", str(LEROBOT), "--geometry", "pi05")
    assert bad.value.code == 2
    with pytest.raises(SystemExit) as bad:
        _bench(tmp_path, "--geometry", str(GEOMETRY))
    assert bad.value.code == 2
    with pytest.raises(SystemExit) as bad:
        _bench(tmp_path, "--checkpoint", str(LEROBOT), "--geometry", str(tmp_path / "no.json"))
    assert bad.value.code == 2


def test_infer_and_export_pass_the_embedding_choice(tmp_path, capsys):
    from pi0_ros.tools import export, infer

    embed = _untie(OPENPI, tmp_path / "c", "")
    args = ["--checkpoint", str(tmp_path / "c"), "--inputs", str(OPENPI / "inputs.safetensors"),
            "--num-steps", "1", "--output", str(tmp_path / "a.safetensors")]
    assert infer.main(args) == 2
    assert "two different token embeddings" in capsys.readouterr().err
    assert infer.main(args + ["--embedding", "embed_tokens"]) == 0
    parsed = export.build_parser().parse_args(["--checkpoint", str(tmp_path / "c"), "--out",
                                               str(tmp_path / "x"), "--embedding",
                                               "embed_tokens", "--geometry", str(GEOMETRY)])
    model, _ = export._load_model(parsed)
    torch.testing.assert_close(model.embed_tokens.weight, embed, rtol=0, atol=0)


# -- a LeRobot checkpoint without tokenizer.model, end to end -----------------------------------
def test_policy_on_lerobot_checkpoint_with_cached_hf_tokenizer(tmp_path, monkeypatch):
    """LeRobot folders carry no tokenizer: the Policy finds the transformers tokenizer in the
    Hugging Face cache and gives the same actions as with the SentencePiece file."""
    import numpy as np
    from transformers import GemmaTokenizer

    from pi0_ros.policy import Policy

    pre = FIXTURES / "openpi_preprocess"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "openpi"))
    ckpt = tmp_path / "lerobot"
    shutil.copytree(LEROBOT, ckpt)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="PaliGemma tokenizer not found.*"
                       "models--google--paligemma-3b-pt-224.*huggingface-cli download"):
        Policy.from_checkpoint(ckpt, geometry=GEOMETRY)
    snapshot = tmp_path / "hf" / "hub" / "models--google--paligemma-3b-pt-224" / "snapshots" / "0"
    GemmaTokenizer.from_pretrained(str(pre), add_bos_token=True).save_pretrained(str(snapshot))

    cached = Policy.from_checkpoint(ckpt, geometry=GEOMETRY)
    local = Policy.from_checkpoint(ckpt, geometry=GEOMETRY, tokenizer=pre / "tokenizer.model")
    assert cached.tokenizer.path == snapshot and local.tokenizer.path == pre / "tokenizer.model"
    g = np.random.default_rng(0)
    obs = {"observation/image": g.integers(0, 256, (120, 160, 3), dtype=np.uint8),
           "observation/wrist_image": g.integers(0, 256, (98, 98, 3), dtype=np.uint8),
           "observation/state": g.uniform(-1, 1, 8).astype(np.float32),
           "prompt": "pick up the red block and put it in the bowl"}
    noise = g.standard_normal((50, 32)).astype(np.float32)
    a = cached.infer(obs, noise=noise)["actions"]
    b = local.infer(obs, noise=noise)["actions"]
    np.testing.assert_array_equal(a, b)
    for pol in (cached, local):
        pol.close()
