"""pi0-ros-demo and its material (pi0_ros.tools.make_demo): deterministic, self-contained, and the
whole demo runs to the end on a short bag."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pi0_ros.tools import demo, make_demo

ROOT = Path(__file__).resolve().parents[1]
DEMO_SECONDS = 2.0  # short bag for CI
CLI_TIMEOUT = 300  # s: interpreter + torch import + replay on a loaded 2-core runner


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_tokenizer_is_the_fixture():
    assert make_demo.TOKENIZER.read_bytes() == (
        ROOT / "test" / "fixtures" / "openpi_preprocess" / "tokenizer.model").read_bytes()


def test_checkpoint_is_byte_identical_and_loads(tmp_path):
    a = make_demo.make_checkpoint(tmp_path / "a")
    b = make_demo.make_checkpoint(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["assets/demo/norm_stats.json", "config.json",
                                       "model.safetensors", "tokenizer.model"]
    for f in files:
        assert _digest(a / f) == _digest(b / f), f
    other = make_demo.make_checkpoint(tmp_path / "c", make_demo.DemoSpec(seed=1))
    assert _digest(other / "model.safetensors") != _digest(a / "model.safetensors")
    from pi0_ros.model import load_checkpoint

    model, config = load_checkpoint(a, device="cpu", dtype="float32")
    assert config.pi05 and config.cameras == ("base_0_rgb", "left_wrist_0_rgb")
    assert config.action_horizon == make_demo.DemoSpec.action_horizon


def test_bag_messages_are_deterministic():
    spec = make_demo.DemoSpec(duration=1.0)
    store = make_demo.typestore()

    def digest():
        h = hashlib.sha256()
        for stamp, topic, typ, msg in make_demo.bag_messages(spec):
            h.update(f"{stamp}{topic}{typ}".encode())
            h.update(bytes(store.serialize_cdr(msg, typ)))
        return h.hexdigest()

    assert digest() == digest()
    counts = Counter(topic for _, topic, _, _ in make_demo.bag_messages(spec))
    assert counts[spec.joint_states_topic] == 101
    assert counts[spec.exterior_topic] == counts[spec.wrist_topic] == 31
    assert counts[spec.prompt_topic] == 1


def test_synthetic_motion_stays_inside_the_norm_stats():
    t = np.linspace(0, 60, 6001)
    q = make_demo.joint_positions(t)
    stats = make_demo.norm_stats(make_demo.DemoSpec())["norm_stats"]["state"]
    assert np.all(q >= np.array(stats["q01"]) - 1e-6)
    assert np.all(q <= np.array(stats["q99"]) + 1e-6)
    # velocities are the derivative of the positions
    dq = np.gradient(q, t, axis=0)
    np.testing.assert_allclose(dq[1:-1], make_demo.joint_velocities(t)[1:-1], atol=2e-3)


def test_frames_move():
    q0, q1 = make_demo.joint_positions(np.array([0.0, 1.0]))
    for frame, size in ((make_demo.exterior_frame, (320, 240)), (make_demo.wrist_frame,
                                                                   (224, 224))):
        a, b = frame(q0, size), frame(q1, size)
        assert a.shape == (size[1], size[0], 3) and a.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0


def test_demo_runs_to_the_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--duration", str(DEMO_SECONDS)]) == 0
    text = capsys.readouterr().out
    for line in ("output bag:", "report:", "plots:", "chunks"):
        assert line in text
    assert (out / "replay" / "bag" / "metadata.yaml").is_file()
    assert (out / "replay" / "report.md").is_file()
    assert len(list((out / "replay" / "plots").glob("*.png"))) == 8
    # A second run reuses the material (same bytes) and reproduces the actions.
    weights = out / "checkpoint" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    first = (out / "replay" / "chunks.npz").read_bytes()
    assert demo.main(["--out", str(out), "--duration", str(DEMO_SECONDS), "--no-plots"]) == 0
    assert weights.stat().st_mtime_ns == mtime
    with np.load(out / "replay" / "chunks.npz") as b, np.load(_write(tmp_path, first)) as a:
        assert a["actions"].tobytes() == b["actions"].tobytes()


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "first.npz"
    path.write_bytes(data)
    return path


def test_demo_cli_module(tmp_path):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pi0_ros.tools.demo", "--out", str(tmp_path / "d"), "--duration",
         "1", "--no-plots"], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "report:" in proc.stdout


def test_demo_rejects_bad_duration(capsys):
    assert demo.main(["--out", "/nonexistent/never", "--duration", "0"]) == 2
    assert "duration" in capsys.readouterr().err


@pytest.mark.parametrize("storage", ("sqlite3", "mcap"))
def test_make_demo_cli(tmp_path, storage, capsys):
    assert make_demo.main([str(tmp_path / "m"), "--duration", "0.5", "--storage", storage]) == 0
    assert "bag:" in capsys.readouterr().out
    meta = (tmp_path / "m" / "bag" / "metadata.yaml").read_text()
    assert storage in meta


# ---------------------------------------------------------------------------------------------
# issue 13, item 11: output a newcomer reads right


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_demo.make_demo(tmp_path_factory.mktemp("material"),
                               make_demo.DemoSpec(duration=DEMO_SECONDS))


def test_plots_have_units_and_a_colourbar(material, tmp_path, monkeypatch):
    """Axis units (rad for the arm, m for the Panda finger), chunk colours explained by a
    colourbar, and the random weights said on the plot."""
    import matplotlib.pyplot as plt

    from pi0_ros.tools import replay

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    replay.run_offline(material["bag"], material["params"], tmp_path, seed=0,
                       units=make_demo.JOINT_UNITS)
    assert len(figures) == 8
    labels = {}
    for fig in figures:
        main, bar = fig.axes  # the plot and its colourbar
        labels[main.get_title().split(":")[0]] = main.get_ylabel()
        assert bar.get_ylabel() == "chunk: observation time [s]"
        assert "random weights" in main.get_title()
    assert labels["panda_joint1"] == "position [rad]"
    assert labels["panda_finger_joint1"] == "position [m]"


def test_demo_output_says_weights_are_random_and_lists_info_apart(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--duration", str(DEMO_SECONDS), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "weights are random" in captured.out
    assert "silent" not in captured.out + captured.err  # no start-up 'silent input' warning
    report = (out / "replay" / "report.md").read_text()
    assert "weights are random" in report.split("## Inference")[0]
    dropped = report.split("## Dropped and rejected inputs")[1].split("\n## ")[0]
    assert "mixed_camera_sizes" not in dropped
    info = report.split("## Informational (not drops)")[1].split("\n## ")[0]
    assert "| mixed_camera_sizes |" in info and "resized with padding" in info


def test_executor_rejections_logged_once_and_explained(material, tmp_path, capsys, caplog):
    """Chunks arriving after their horizon (here: a simulated 0.9 s latency > 0.75 s of actions)
    are rejected as all_past: logged once, not once per chunk, and the summary says the
    inference latency exceeded the chunk horizon."""
    from pi0_ros.tools import replay

    with caplog.at_level("WARNING", logger="pi0_ros.control.executor"):
        rc = replay.main([str(material["bag"]), "--config", str(material["params"]),
                          "--output", str(tmp_path), "--latency", "0.9", "--no-plots",
                          "--quiet"])
    assert rc == 0
    lines = [r.getMessage() for r in caplog.records if "chunk rejected" in r.getMessage()]
    past = [line for line in lines if "all_past" in line]
    assert len(past) == 1, lines  # one line per reason (feedback_timeout at the bag's end too)
    assert len(lines) == len(set(line.split(" (")[0] for line in lines)), lines
    assert "inference latency exceeded the chunk horizon" in past[0]
    out = capsys.readouterr().out
    assert "executor rejected" in out and "all_past x" in out
    assert "inference latency exceeded the chunk horizon" in out
    report = (tmp_path / "report.md").read_text()
    assert "inference latency exceeded the chunk horizon (0.75 s)" in report
