"""The trainer under `accelerate launch` with two CPU processes (gloo): what a several-GPU run goes through.

Both processes must end every checkpoint with bit-identical weights (state.json records one digest per
process, and the trainer refuses to write a checkpoint when they differ), and a second launch with
`--resume` must continue from the saved step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_trainer import TINY, fresh_model_dir, model_state, tiny_data  # noqa: F401  (tiny_data: a fixture)

from napari_mris_train import trainer
from napari_mris_train.checkpoint import load_checkpoint

pytest.importorskip("accelerate", reason="accelerate is not installed: the distributed trainer cannot be launched")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(recipe: Path, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `napari-mris-train train` on two CPU processes.

    `--multi_gpu` picks accelerate's torchrun launcher; ACCELERATE_USE_CPU makes its processes CPU ones that
    talk over gloo (`--cpu` alone starts a single process unless MPI is set up).
    """
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port()), "-m", "napari_mris_train.cli", "train", "--config", str(recipe)),
        *("--data", str(root), "--out", str(out), "--steps", "4", "--quiet", *extra),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def checkpoint_info(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / trainer.LAST)[1]


def test_two_processes_train_the_same_weights_and_resume(tiny_data, tmp_path):  # noqa: F811
    root, tokenizers = tiny_data
    out = fresh_model_dir(tokenizers, tmp_path)
    recipe = yaml.safe_load(TINY.read_text())
    recipe["train"]["stem_warmup_steps"] = 3  # each process warms the stem up; the main one's is kept
    config = tmp_path / "tiny_warm.yaml"
    config.write_text(yaml.safe_dump(recipe))
    launch(config, root, out, "--stop-after", "2")
    first = checkpoint_info(out)
    assert first["step"] == 2 and first["data_position"] == 2 * 4 * 2  # two processes, four examples each
    assert len(first["replicas"]) == 2 and len(set(first["replicas"])) == 1
    assert first["replicas"][0] == trainer.weights_digest(model_state(out))  # the digest is of the saved weights
    launch(config, root, out, "--resume")
    second = checkpoint_info(out)
    assert second["step"] == 4 and len(second["replicas"]) == 2 and len(set(second["replicas"])) == 1
    assert second["replicas"] != first["replicas"]  # the resumed steps trained
    log = [json.loads(line) for line in (out / trainer.LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # one line per step: the main process logs
    assert [r["stem_warmup_step"] for r in log if "stem_warmup_step" in r] == [3]  # not again on --resume
    assert any("val_selection" in r for r in log) and (out / "model.safetensors").is_file()
