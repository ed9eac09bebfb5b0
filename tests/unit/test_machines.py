"""Each machine's path of the run folder: its own --run-dir (mounts may differ), the main process's otherwise."""

from __future__ import annotations

from pathlib import Path

from trainer.machines import local_run_folder


def test_a_machine_names_the_run_folder_and_the_checkpoint_by_its_own_run_dir():
    main_run, main_ckpt = Path("/mnt/a/runs/x"), Path("/mnt/a/runs/x/main/checkpoints/step_00000004")
    assert local_run_folder(main_run, main_ckpt, "/shared/runs/x", "auto") == (Path("/shared/runs/x"), Path("/shared/runs/x/main/checkpoints/step_00000004"))
    assert local_run_folder(main_run, None, "/shared/runs/x", None) == (Path("/shared/runs/x"), None)


def test_without_run_dir_or_with_a_resume_path_every_machine_takes_the_main_process_s_paths():
    main_run, main_ckpt = Path("runs/quickstart-20261204-170000"), Path("runs/quickstart-20261204-170000/main/checkpoints/step_00000004")
    assert local_run_folder(main_run, main_ckpt, None, "auto") == (main_run, main_ckpt)
    assert local_run_folder(main_run, main_ckpt, "/elsewhere", str(main_ckpt)) == (main_run, main_ckpt)
