"""Checkpoint side files (pi0_ros.model.assets): tokenizer discovery and the transformers route,
norm-stats discovery, LeRobot processor-step checks and `rtc_config`.

No network: the Hugging Face and openpi caches are pointed at tmp dirs; the transformers
tokenizer directories are written here from the fixture's SentencePiece model.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from pi0_ros import processing as P
from pi0_ros.model import CheckpointError
from pi0_ros.model import assets as A

FIXTURES = Path(__file__).parent / "fixtures"
PRE = FIXTURES / "openpi_preprocess"
LEROBOT = FIXTURES / "lerobot_tiny_pi05"
HF_REPO = "models--google--paligemma-3b-pt-224"


@pytest.fixture(autouse=True)
def _no_user_caches(tmp_path, monkeypatch):
    """Never read the real ~/.cache: the caches live under tmp_path/cache."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache" / "hf"))
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "cache" / "openpi"))


@pytest.fixture(scope="module")
def strings():
    return json.loads((PRE / "strings.json").read_text())


def _hf_dir(path: Path, broken: bool = False) -> Path:
    """A transformers tokenizer directory (tokenizer.json, no tokenizer.model) made from the
    fixture tokenizer; ``broken``: the `GemmaTokenizer(vocab_file=)` one that maps to <unk>."""
    from transformers import GemmaTokenizer

    if broken:
        tok = GemmaTokenizer(vocab_file=str(PRE / "tokenizer.model"))
    else:
        tok = GemmaTokenizer.from_pretrained(str(PRE), add_bos_token=True)
    tok.save_pretrained(str(path))
    assert not (path / "tokenizer.model").exists()
    return path


def _lerobot_without_tokenizer(tmp_path: Path) -> Path:
    ckpt = tmp_path / "lerobot"
    shutil.copytree(LEROBOT, ckpt)
    (ckpt / "tokenizer.model").unlink()  # a real LeRobot checkpoint carries none
    return ckpt


# -- tokenizer discovery ----------------------------------------------------------------------
def test_find_tokenizer_locations(tmp_path):
    ckpt = tmp_path / "run" / "ckpt"
    (ckpt / "assets").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        A.find_tokenizer(ckpt)
    msg = str(err.value)
    for place in (ckpt, ckpt.parent, ckpt / "assets", tmp_path / "cache/openpi/big_vision"):
        assert str(place / "tokenizer.model") in msg
    assert "huggingface-cli download google/paligemma-3b-pt-224 tokenizer.model" in msg

    shutil.copy(PRE / "tokenizer.model", ckpt / "assets" / "tokenizer.model")
    assert A.find_tokenizer(ckpt) == ckpt / "assets" / "tokenizer.model"
    shutil.copy(PRE / "tokenizer.model", ckpt.parent / "tokenizer.model")
    assert A.find_tokenizer(ckpt) == ckpt.parent / "tokenizer.model"
    shutil.copy(PRE / "tokenizer.model", ckpt / "tokenizer.model")
    assert A.find_tokenizer(ckpt) == ckpt / "tokenizer.model"
    other = tmp_path / "tok.model"
    shutil.copy(PRE / "tokenizer.model", other)
    assert A.find_tokenizer(ckpt, other) == other
    assert A.find_tokenizer(None, tmp_path / "run") == ckpt.parent / "tokenizer.model"
    hf = _hf_dir(tmp_path / "hf")
    assert A.find_tokenizer(ckpt, hf) == hf  # configured wins over the checkpoint's own file


def test_configured_tokenizer_is_used_or_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(PRE / "tokenizer.model", ckpt)
    with pytest.raises(FileNotFoundError, match="configured tokenizer .*nope.model: no such"):
        A.find_tokenizer(ckpt, tmp_path / "nope.model")  # never falls back to another file
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="configured tokenizer directory .*empty holds "
                       "none of .*tokenizer.json.*huggingface-cli download"):
        A.find_tokenizer(ckpt, tmp_path / "empty")


def test_lerobot_tokenizer_from_caches(tmp_path):
    ckpt = _lerobot_without_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        A.find_tokenizer(ckpt)
    msg = str(err.value)
    repo = tmp_path / "cache" / "hf" / "hub" / HF_REPO
    assert f"{repo}/snapshots/* (google/paligemma-3b-pt-224 not in the Hugging Face cache)" in msg
    for place in (ckpt / "tokenizer.model", ckpt.parent / "tokenizer.json",
                  ckpt / "assets" / "paligemma_tokenizer.model",
                  tmp_path / "cache/openpi/big_vision/paligemma_tokenizer.model"):
        assert str(place) in msg

    openpi = tmp_path / "cache" / "openpi" / "big_vision" / "paligemma_tokenizer.model"
    openpi.parent.mkdir(parents=True)
    shutil.copy(PRE / "tokenizer.model", openpi)
    assert A.find_tokenizer(ckpt) == openpi
    # The HF cache snapshot refs/main points at comes before openpi's cache.
    _hf_dir(repo / "snapshots" / "aaa")
    _hf_dir(repo / "snapshots" / "bbb")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb\n")
    assert A.find_tokenizer(ckpt) == repo / "snapshots" / "bbb"
    shutil.copy(PRE / "tokenizer.model", repo / "snapshots" / "bbb")
    assert A.find_tokenizer(ckpt) == repo / "snapshots" / "bbb" / "tokenizer.model"


@pytest.mark.parametrize("finder", [A.find_tokenizer, A.find_norm_stats])
def test_checkpoint_dir_errors_say_so(tmp_path, finder):
    with pytest.raises(CheckpointError, match="checkpoint directory .*missing does not exist"):
        finder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint directory .*empty is empty"):
        finder(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoint .*file is not a directory"):
        finder(tmp_path / "file")


# -- the transformers route -------------------------------------------------------------------
def _encode_calls(strings):
    for sample in strings["samples"]:
        for conf in ("pi0", "pi05", "pi05_nostate"):
            for call in sample[conf]["encode_calls"]:
                yield call["text"], bool(call["kwargs"].get("add_bos", False)), call["ids"]


@pytest.mark.parametrize("with_spm", [False, True], ids=["tokenizer.json", "+tokenizer.model"])
def test_transformers_tokenizer_matches_sentencepiece(tmp_path, strings, with_spm):
    hf = _hf_dir(tmp_path / "hf")
    if with_spm:  # then the loader also cross-checks against SentencePiece itself
        shutil.copy(PRE / "tokenizer.model", hf)
    tok = A.TransformersTokenizer(hf)
    calls = list(_encode_calls(strings))
    assert len(calls) >= 20
    for text, add_bos, ids in calls:
        assert tok.encode(text, add_bos=add_bos) == ids, text
    assert tok.get_piece_size() == 512


@pytest.mark.parametrize("conf,max_len,discrete", [("pi0", 48, False), ("pi05", 200, True),
                                                  ("pi05_nostate", 200, False)])
def test_prompt_tokenizer_on_transformers_dir(tmp_path, conf, max_len, discrete):
    """openpi's full text pipeline through the transformers route: the fixture's token ids."""
    from safetensors.numpy import load_file

    ref = load_file(str(PRE / "preprocess.safetensors"))
    samples = json.loads((PRE / "strings.json").read_text())["samples"]
    hf = _hf_dir(tmp_path / "hf")
    tok = P.PromptTokenizer(hf, max_len, discrete_state=discrete)
    assert tok.path == hf and tok.vocab_size == 512
    norm = P.Normalizer.from_json(PRE / "norm_stats.json", use_quantiles=True)
    for i, sample in enumerate(samples):
        ids, mask = tok.encode(sample["prompt"], norm.normalize(ref["text.state_raw"][i]))
        np.testing.assert_array_equal(ids, ref[f"text.{conf}.tokenized_prompt"][i])
        np.testing.assert_array_equal(mask, ref[f"text.{conf}.tokenized_prompt_mask"][i])


def test_broken_transformers_tokenizer_is_refused(tmp_path):
    bad = _hf_dir(tmp_path / "bad", broken=True)
    with pytest.raises(ValueError, match=r"only <unk>.*broken tokenizer"):
        A.TransformersTokenizer(bad)
    with pytest.raises(ValueError, match="only <unk>"):
        P.PromptTokenizer(bad, 48)  # the same guard on the Policy's path


def test_transformers_tokenizer_disagreeing_with_its_sentencepiece_file(tmp_path):
    import sentencepiece

    hf = _hf_dir(tmp_path / "hf")
    model = io.BytesIO()  # another (tiny) SentencePiece vocabulary next to tokenizer.json
    lines = ["pick up the red block and put it in the bowl", "Task: open it, State: 1 2 3;"]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 50), model_writer=model, vocab_size=40, model_type="bpe",
        user_defined_symbols=["\n"], pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    (hf / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"transformers gives \[.*\] for .*SentencePiece "
                       r"\(tokenizer.model\) \[.*\]"):
        A.TransformersTokenizer(hf)


def test_unloadable_transformers_dir(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="transformers could not load the tokenizer in"):
        P.PromptTokenizer(tmp_path, 48)


# -- norm stats discovery ---------------------------------------------------------------------
def test_find_norm_stats(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        A.find_norm_stats(ckpt)
    assert "assets" in str(err.value) and "policy_preprocessor.json" in str(err.value)
    for asset in ("libero", "droid"):
        (ckpt / "assets" / asset).mkdir(parents=True)
        shutil.copy(PRE / "norm_stats.json", ckpt / "assets" / asset / "norm_stats.json")
        if asset == "libero":
            assert A.find_norm_stats(ckpt) == (
                "openpi", ckpt / "assets" / "libero" / "norm_stats.json")
    with pytest.raises(ValueError, match="several assets"):
        A.find_norm_stats(ckpt)
    assert A.find_norm_stats(ckpt, "droid")[1] == ckpt / "assets" / "droid" / "norm_stats.json"
    assert A.find_norm_stats(ckpt, PRE / "norm_stats.json")[1] == PRE / "norm_stats.json"
    with pytest.raises(FileNotFoundError, match="aloha"):
        A.find_norm_stats(ckpt, "aloha")
    assert A.find_norm_stats(LEROBOT) == ("lerobot", LEROBOT)


# -- LeRobot processor steps ------------------------------------------------------------------
def _edit_pipeline(ckpt: Path, name: str, edit) -> None:
    path = ckpt / name
    pipeline = json.loads(path.read_text())
    edit(pipeline["steps"])
    path.write_text(json.dumps(pipeline))


def _copy(tmp_path) -> Path:
    ckpt = tmp_path / "lerobot"
    shutil.copytree(LEROBOT, ckpt)
    return ckpt


def test_fixture_pipelines_are_accepted():
    found = A.read_lerobot_processors(LEROBOT)
    assert found.steps["preprocessor"] == (
        "rename_observations_processor", "to_batch_processor", "normalizer_processor",
        "pi05_prepare_state_tokenizer_processor_step", "tokenizer_processor", "device_processor")
    assert found.steps["postprocessor"] == ("unnormalizer_processor", "device_processor")
    assert found.modes == {"state": "quantile", "actions": "quantile"}
    assert found.tokenizer_name == "google/paligemma-3b-pt-224"
    assert found.tokenizer_max_length == 200 and found.rtc is None


def test_lerobot_06_pipeline_with_disabled_relative_actions(tmp_path):
    """LeRobot >= 0.5.1 inserts relative / absolute action steps (disabled by default)."""
    ckpt = _copy(tmp_path)
    _edit_pipeline(ckpt, "policy_preprocessor.json", lambda steps: steps.insert(2, {
        "registry_name": "relative_actions_processor",
        "config": {"enabled": False, "exclude_joints": ["gripper"], "action_names": None}}))
    _edit_pipeline(ckpt, "policy_postprocessor.json", lambda steps: steps.insert(1, {
        "registry_name": "absolute_actions_processor", "config": {"enabled": False}}))
    found = A.read_lerobot_processors(ckpt)
    assert "relative_actions_processor" in found.steps["preprocessor"]
    assert "absolute_actions_processor" in found.steps["postprocessor"]


@pytest.mark.parametrize("case,file,edit,message", [
    ("unknown step", "policy_preprocessor.json",
     lambda steps: steps.insert(3, {"registry_name": "image_crop_resize_processor",
                                    "config": {"crop_params_dict": {}}}),
     r"policy_preprocessor.json: preprocessor step 3 'image_crop_resize_processor': unknown "
     r"step .*it would be skipped"),
    ("rename_map", "policy_preprocessor.json",
     lambda steps: steps[0]["config"].update(rename_map={"observation.images.top":
                                                          "observation.images.base_0_rgb"}),
     r"preprocessor step 0 'rename_observations_processor': rename_map .*images.top"),
    ("relative actions", "policy_postprocessor.json",
     lambda steps: steps.insert(1, {"registry_name": "absolute_actions_processor",
                                    "config": {"enabled": True}}),
     r"postprocessor step 1 'absolute_actions_processor': enabled=true: relative actions"),
    ("unknown action step", "policy_postprocessor.json",
     lambda steps: steps.insert(1, {"registry_name": "map_delta_action_to_robot_action",
                                    "config": {}}),
     r"postprocessor step 1 'map_delta_action_to_robot_action': unknown step"),
])
def test_unsupported_steps_refuse_to_load(tmp_path, caplog, case, file, edit, message):
    ckpt = _copy(tmp_path)
    _edit_pipeline(ckpt, file, edit)
    with pytest.raises(CheckpointError, match=message + r".*allow_unknown_processor_steps"):
        A.read_lerobot_processors(ckpt)
    with pytest.raises(CheckpointError, match=message):
        P.Normalizer.from_lerobot(ckpt)  # the Policy's path
    with caplog.at_level(logging.WARNING, logger="pi0_ros.model.assets"):
        norm = P.Normalizer.from_lerobot(ckpt, allow_unknown_processor_steps=True)
    assert norm.modes == {"state": "quantile", "actions": "quantile"}
    assert any("skipped (allow_unknown_processor_steps=True)" in r.message
               for r in caplog.records)


def test_image_normalization_refused(tmp_path):
    ckpt = _copy(tmp_path)
    _edit_pipeline(ckpt, "policy_preprocessor.json",
                   lambda steps: steps[2]["config"]["norm_map"].update(VISUAL="MEAN_STD"))
    with pytest.raises(CheckpointError, match="images normalized with 'MEAN_STD'"):
        A.read_lerobot_processors(ckpt)


def test_rtc_config_read_and_logged(tmp_path, caplog):
    ckpt = _copy(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["rtc_config"] = {"enabled": True, "prefix_attention_schedule": "EXP",
                         "max_guidance_weight": 5.0, "execution_horizon": 8, "debug": False,
                         "debug_maxlen": 100}
    (ckpt / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.INFO, logger="pi0_ros.model.assets"):
        found = A.read_lerobot_processors(ckpt)
    assert found.rtc == A.RTCConfig(enabled=True, prefix_attention_schedule="EXP",
                                    max_guidance_weight=5.0, execution_horizon=8)
    assert any("rtc_config RTCConfig(enabled=True" in r.getMessage() for r in caplog.records)
    raw["rtc_config"] = {"execution_horizon": "soon"}
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="rtc_config .*soon"):
        A.read_lerobot_processors(ckpt)
    raw["rtc_config"] = [1]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="rtc_config must be an object or null"):
        A.read_lerobot_processors(ckpt)
