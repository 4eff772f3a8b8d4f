import subprocess
import sys

from tests.conftest import REPO, cli_env, launch, run_captured, run_cli


def test_doctor_reports_what_it_sees():
    result = run_cli("doctor", env={"DISTSENT_ALLOCATOR": "auto"})
    for fact in ("torch", "process-group backends", "gloo", "rank mapping", "DeepSpeed ops", "W&B", "GiB free"):
        assert fact in result.stdout
    # This machine has tcmalloc (make install adds it as root) and no GPU driver.
    assert "DISTSENT_ALLOCATOR=auto: train runs on libtcmalloc" in result.stdout
    assert "ok: nothing here stops a run" in result.stdout
    # DS_ACCELERATOR=cpu is distsent's own setting on a CPU machine, not a launcher's.
    assert "launcher variables      none (single process)" in result.stdout
    assert "log.wandb=false" in result.stdout and "all-MiniLM-L6-v2 (packaged, no Hub needed)" in result.stdout


def test_doctor_finds_what_would_stop_the_run_at_its_start(tmp_path):
    """A data file that is not there from this folder, or a Hub model offline and uncached:
    train stops on either at once; doctor said "ok"."""
    missing = run_cli("doctor", "data.dataset=files", f"data.train_file={tmp_path / 'absent.csv'}", check=False)
    assert missing.returncode == 1 and f"data.train_file={tmp_path / 'absent.csv'}: file not found" in missing.stdout
    typo = run_cli("doctor", f"model.name={tmp_path / 'my_model'}", check=False)
    assert typo.returncode == 1 and "neither a local folder nor a Hub id" in typo.stdout
    offline = run_cli("doctor", "model.name=someone/not-cached-model", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert offline.returncode == 1
    assert "model.name=someone/not-cached-model: a Hub id not in the local cache, and HF_HUB_OFFLINE" in offline.stdout
    # The model's line agrees with the problem: nothing is downloaded offline.
    assert "not cached, and offline: cannot be downloaded" in offline.stdout
    assert "downloaded at start" not in offline.stdout


def test_a_run_folder_given_as_the_model_is_named_by_doctor_and_train(tmp_path):
    # A run folder holds its model in best/ and final/; transformers failed on it with a
    # traceback about a tokenizer backend.
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    expected = f"model.name={run}: a folder without a model (no config.json); did you mean {run / 'best'}?"
    doctor = run_cli("doctor", f"model.name={run}", check=False)
    assert doctor.returncode == 1 and expected in doctor.stdout, doctor.stdout
    train = run_cli("train", f"model.name={run}", f"output_dir={tmp_path / 'out'}", check=False)
    assert train.returncode == 2 and expected in train.stderr and "Traceback" not in train.stderr, train.stderr


def test_doctor_names_an_unset_wandb_mode_as_unset():
    env = {key: value for key, value in cli_env().items() if key != "WANDB_MODE"}
    result = subprocess.run(
        [sys.executable, "-m", "distsent", "doctor"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert "WANDB_MODE=(not set: wandb's default, online)" in result.stdout, result.stdout
    bogus = run_cli("doctor", env={"WANDB_MODE": "ofline"}, check=False)
    assert bogus.returncode == 1 and "WANDB_MODE=ofline: wandb takes online, offline" in bogus.stdout, bogus.stdout


def test_doctor_never_prints_the_api_key():
    env = {**cli_env(), "WANDB_API_KEY": "secret-key-value-123"}
    result = subprocess.run(
        [sys.executable, "-m", "distsent", "doctor"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert "API key set" in result.stdout and "secret-key-value-123" not in result.stdout + result.stderr


def test_doctor_fails_on_a_configuration_that_cannot_work():
    env = {**cli_env(), "WORLD_SIZE": "2", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    result = subprocess.run(
        [sys.executable, "-m", "distsent", "doctor"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "MASTER_ADDR is not set" in result.stdout


def test_doctor_under_the_launcher_shows_each_rank():
    result = launch("ddp.yaml", 2, "doctor")
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout


def test_debug_launch_keeps_the_gpu_the_scheduler_assigned(tmp_path):
    """`srun --gpus=1` hands over, say, GPU 5; the single-GPU launch file must not move the
    run to GPU 0, someone else's on a cluster without device cgroups."""
    script = tmp_path / "show.py"
    script.write_text("import os\nprint('visible:', os.environ.get('CUDA_VISIBLE_DEVICES'))\n")
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(REPO / "launch" / "accelerate" / "single_gpu.yaml"), str(script)),
    ]
    result = run_captured(command, env={**cli_env(), "CUDA_VISIBLE_DEVICES": "5"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "visible: 5" in result.stdout
