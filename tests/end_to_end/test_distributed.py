"""Two real processes through `accelerate launch` (gloo on CPU): DDP, sharding and eval counted once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, run_recipe, two_cpu_launcher
from sklearn.metrics import balanced_accuracy_score, f1_score


def test_two_cpu_processes_train_in_lockstep(tmp_path, tiny_imagenet, run_env):
    launcher = two_cpu_launcher(29517)
    env = {**run_env, "ACCELERATE_USE_CPU": "1"}
    run_dir = tmp_path / "ddp"
    sets = FAST + ["phases.0.epochs=2", "phases.0.ema_decay=0.9", "phases.0.batch_size_per_device=5"]
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=env, sets=sets, launcher=launcher)
    assert done.returncode == 0, done.stderr[-4000:]

    info = json.loads((run_dir / "run.json").read_text())
    # A launch that silently ran one process would say NO / 1 here.
    assert info["distributed_type"] == "MULTI_CPU" and info["num_processes"] == 2
    checksums = info["phases"]["main"]["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert len(info["data_checksums"]) == 2 and info["data_checksums"][0] == info["data_checksums"][1]

    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:
        assert record["val_samples"] == 24  # 24 val images over 2 ranks in batches of 5: padding dropped
        assert 0 <= record["train_top1"] <= 1
    # Macro F1 and balanced accuracy come from the confusion gathered from both ranks: the same as
    # scikit-learn's on the (true, predicted) pairs eval.json's confusion holds.
    confusion = np.array(json.loads((run_dir / "main" / "eval.json").read_text())["model"]["confusion"])
    assert confusion.sum() == 24
    pairs = np.argwhere(np.ones_like(confusion)).repeat(confusion.ravel(), axis=0)
    assert history[-1]["val_macro_f1"] == pytest.approx(f1_score(pairs[:, 0], pairs[:, 1], average="macro"))
    assert history[-1]["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(pairs[:, 0], pairs[:, 1]))
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    # 96 images / 2 ranks = 48 each → 9 batches of 5 per epoch: every rank steps together.
    assert steps[-1]["total_step"] == 18


def _check_as_rank(rank: int, root: str, cache: str, store: str, out: str) -> None:
    """One of two gloo processes: the cold check, then the warm one, counting the files this rank reads."""
    import hashlib
    import pickle

    import torch.distributed as dist

    import loaders.header_table as header_table
    from loaders.headers import file_headers
    from loaders.sources import image_folder_splits
    from trainer.data import run_processes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    read: list[str] = []

    def counted(paths, **kwargs):
        read.extend(paths)
        return file_headers(paths, **kwargs)

    header_table.file_headers = counted
    train, val = image_folder_splits(root)
    paths = list(train.files) + list(val.files)
    results = []
    for _ in range(2):  # two starts, the second after the first has finished (its cache written)
        dist.barrier()
        read.clear()
        table, report = header_table.check_files(paths, root, run_processes(), Path(cache))
        digest = hashlib.sha256(table.sizes.tobytes() + table.formats.tobytes() + table.modes.tobytes() + repr(sorted(table.bad.items())).encode())
        results.append({"read": list(read), "checked": report.checked, "table": digest.hexdigest()})
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


def test_two_processes_share_out_the_structure_check(tmp_path, bad_folder):
    import pickle

    import torch.multiprocessing as mp

    cache = tmp_path / "headers" / "bad.npz"
    mp.spawn(_check_as_rank, args=(str(bad_folder), str(cache), str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    cold, warm = zip(*(pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)))
    # Cold: each rank read its own half of the 72 files, and both got the whole, identical table.
    assert [len(c["read"]) for c in cold] == [36, 36] and not set(cold[0]["read"]) & set(cold[1]["read"])
    assert cold[0]["checked"] == cold[1]["checked"] == 72 and cold[0]["table"] == cold[1]["table"]
    # Warm: the cache the main process wrote serves both; no file is read, the table is the same.
    assert [w["read"] for w in warm] == [[], []] and warm[0]["table"] == warm[1]["table"] == cold[0]["table"]
