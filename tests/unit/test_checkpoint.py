"""Checkpoint folders: complete-or-absent, newest lookup across phases, keep last + best k."""

from __future__ import annotations

import json
import zipfile

import torch

from trainer.checkpoint import TrainState, prune, torch_save_without_crc32
from trainer.run_folder import STATE_FILE, best_checkpoint, complete_checkpoints, newest_checkpoint


def _fake(folder, phase_index, total_step, val_top1):
    folder.mkdir(parents=True)
    state = {**TrainState(phase_index=phase_index, total_step=total_step).state_dict(), "val_top1": val_top1}
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def test_incomplete_and_temporary_folders_are_never_picked(tmp_path):
    ckpts = tmp_path / "run" / "main" / "checkpoints"
    _fake(ckpts / "step_00000010", 0, 10, 0.5)
    _fake(ckpts / ".tmp-step_00000020", 0, 20, None)  # killed while writing
    (ckpts / "step_00000030").mkdir()  # no trainer_state.json: not complete
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000010"]
    assert newest_checkpoint(tmp_path / "run").name == "step_00000010"


def test_newest_checkpoint_prefers_later_phases(tmp_path):
    run = tmp_path / "run"
    _fake(run / "warm" / "checkpoints" / "step_00000500", 0, 500, 0.4)
    _fake(run / "full" / "checkpoints" / "step_00000510", 1, 510, 0.3)
    assert newest_checkpoint(run).parent.parent.name == "full"
    assert newest_checkpoint(tmp_path / "empty") is None


def test_prune_keeps_newest_and_best_k(tmp_path):
    ckpts = tmp_path / "checkpoints"
    scores = {10: 0.2, 20: 0.9, 30: 0.5, 40: 0.7, 50: None}
    for step, score in scores.items():
        _fake(ckpts / f"step_{step:08d}", 0, step, score)
    prune(ckpts, keep_best_k=2)
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000020", "step_00000040", "step_00000050"]
    assert best_checkpoint(ckpts).name == "step_00000020"
    prune(ckpts, keep_best_k=0)
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000050"]


def test_checkpoint_files_skip_torch_saves_crc32_which_torch_load_never_checks(tmp_path):
    weights = {"w": torch.arange(100_000, dtype=torch.float32)}
    # Why: a flipped byte in a file torch.save wrote with its CRCs loads without a word.
    with_crc = tmp_path / "with_crc.bin"
    torch.save(weights, with_crc)
    data = bytearray(with_crc.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with_crc.write_bytes(bytes(data))
    assert not torch.equal(torch.load(with_crc)["w"], weights["w"])

    without = tmp_path / "without.bin"
    assert torch.serialization.get_crc32_options()
    with torch_save_without_crc32():
        torch.save(weights, without)
    assert torch.serialization.get_crc32_options()  # the setting is put back
    assert torch.equal(torch.load(without)["w"], weights["w"])
    with zipfile.ZipFile(without) as archive:
        assert archive.testzip() is not None  # no CRCs written: unzip's check fails, torch.load does not care
