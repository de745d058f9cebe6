"""Nothing lost, every bad input one clear line (issue 14): checkpoints hold only weights whose loss
was seen finite; a kill at any point of a checkpoint write leaves one to resume from; a resume or
sample refuses a checkpoint of another model or run; an existing run is never silently replaced;
bad arguments are refused up front in one line; the validation loss is the same on any world size.

The shared train.py is exercised through gpt2's copy (tests/test_copies.py keeps the others equal)."""

import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from registry import MODELS
from train_helpers import ROOT, losses, metrics, run_in_process, run_ranks, train_args

SPEC = MODELS[0]
infra = SPEC.infra  # checkpoint writing and finding


def stop_message(*args):
    """The one line train.py stops with (SystemExit), for the given arguments."""
    with pytest.raises(SystemExit) as stopped:
        run_in_process(SPEC, *args)
    message = str(stopped.value.code)
    assert isinstance(stopped.value.code, str) and "\n" not in message, repr(message)
    return message


# --- 1. the last good checkpoint is good ---------------------------------------------------------


def test_the_named_checkpoint_resumes_after_a_divergence(toy_data, tmp_path):
    """A huge lr blows the weights up. The stop names a checkpoint, and that checkpoint, resumed with
    a sane lr, trains on with finite losses (before: it held the blown-up update, and gave nan)."""
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 10, "--ckpt-every", 1)
    run_in_process(SPEC, *args, "--stop-after", 2)
    message = stop_message(*args, "--resume", "--lr", "1e12", "--grad-clip", "0")
    named = re.search(
        r"loss is (?:nan|inf) at step (\d+): stopping without updating; "
        r"the last good checkpoint is (\S+) \(step (\d+)\)",
        message,
    )
    assert named, message
    assert named[2] == str(tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["meta"]["step"] == int(named[3]) < int(named[1])
    resumed = run_in_process(SPEC, *args, "--resume", "--stop-after", 2)
    assert len(losses(resumed)) == 2 and all(loss < 10 for loss in losses(resumed)), losses(resumed)


def test_a_non_finite_gradient_norm_stops_before_the_update(toy_data, tmp_path, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def inf_on_the_second_step(params, max_norm):
        calls.append(1)
        norm = clip(params, max_norm)
        return norm * float("inf") if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_on_the_second_step)
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 5, "--ckpt-every", 1)
    message = stop_message(*args)
    assert message.startswith("gradient norm is inf at step 1 "), message
    assert message.endswith(f"the last good checkpoint is {tmp_path / 'ckpt.pt'} (step 1)")  # step 1's loss was finite
    assert [r["step"] for r in metrics(tmp_path)] == [1]  # no update after the bad gradient


# --- 2. crash-safe checkpoint replacement ------------------------------------------------------


def make_checkpoint_dir(path, step, complete=True):
    """A stand-in for a DCP directory: a shard file, and meta.pt once complete."""
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        torch.save({"step": step}, path / "meta.pt")
    return path


def step_of(path):
    return torch.load(path / "meta.pt", weights_only=True)["step"]


class Killed(Exception):
    pass


def kill_at(monkeypatch, n):
    """Make the n-th file-system change (os.replace or shutil.rmtree, counted together) not happen:
    the process 'dies' just before it."""
    count = [0]

    def wrap(real):
        def change(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                raise Killed
            return real(*args, **kwargs)

        return change

    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))


# The states a checkpoint directory can be found in, each one a kill can leave behind.
START_STATES = {
    "clean": lambda ckpt: make_checkpoint_dir(ckpt, 1),
    "stale .old (killed while removing it)": lambda ckpt: (
        make_checkpoint_dir(ckpt, 1),
        make_checkpoint_dir(ckpt.with_name("ckpt_dcp.old"), 0, False),
    ),
    "only .old (killed between the renames)": lambda ckpt: make_checkpoint_dir(ckpt.with_name("ckpt_dcp.old"), 1),
    "no checkpoint yet": lambda ckpt: None,
}


@pytest.mark.parametrize("kill", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("start", START_STATES)
def test_a_directory_swap_killed_at_any_point_leaves_a_checkpoint(start, kill, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt_dcp"
    START_STATES[start](ckpt)
    before = infra.find_checkpoint(ckpt)
    new = make_checkpoint_dir(infra.temp_path(ckpt), 2)
    if kill:
        kill_at(monkeypatch, kill)
    with contextlib.suppress(Killed):
        infra.replace_dir(new, ckpt)
    monkeypatch.undo()
    found = infra.find_checkpoint(ckpt)  # what a resume would load
    assert found is not None or before is None
    if found is not None:
        assert step_of(found) in ({1, 2} if before else {2})
    # the next save works from whatever was left, and leaves exactly one checkpoint
    infra.replace_dir(make_checkpoint_dir(infra.temp_path(ckpt), 3), ckpt)
    assert step_of(infra.find_checkpoint(ckpt)) == 3 and not ckpt.with_name("ckpt_dcp.old").exists()


def test_a_file_write_killed_before_its_rename_keeps_the_old_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    infra.write_file(ckpt, {"step": 1})
    targets = []

    def killed_replace(src, dst):
        targets.append(src)
        raise Killed

    monkeypatch.setattr(os, "replace", killed_replace)
    for _ in range(2):
        with pytest.raises(Killed):
            infra.write_file(ckpt, {"step": 2})
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True) == {"step": 1}
    assert targets[0] != targets[1]  # unique temp names: two runs in one directory never share one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # the temp file is removed


def test_fsdp_resumes_from_the_checkpoint_a_killed_swap_left(toy_data, tmp_path):
    """End to end on one FSDP rank: ckpt_dcp moved to ckpt_dcp.old (and a half-written temp
    directory) is what a kill between the renames leaves; --resume finds it and cleans up."""
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 3, "--parallel", "fsdp")
    run_ranks(SPEC, *args, "--stop-after", 2, nproc=1)
    os.replace(tmp_path / "ckpt_dcp", tmp_path / "ckpt_dcp.old")
    make_checkpoint_dir(tmp_path / "ckpt_dcp.0123456789abcdef.tmp", 5, complete=False)
    run_ranks(SPEC, *args, "--resume", nproc=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt_dcp", "loss.png", "metrics.jsonl"]
    assert step_of(tmp_path / "ckpt_dcp") == 3
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [1, 2, 3]


# --- 3. the stored config is compared ----------------------------------------------------------


def test_resume_and_generate_refuse_another_model_or_run(toy_data, tmp_path, capsys):
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 4)
    run_in_process(SPEC, *args, "--stop-after", 1)
    # n_head 4 -> 2 keeps every tensor's shape: without the check it would silently train another model
    message = stop_message(*args, "--resume", "--set", "n_head=2", "--batch-size", 2)
    assert message == (
        f"--resume: {tmp_path / 'ckpt.pt'} was trained with other settings: n_head 4 -> 2, "
        "batch_size 4 -> 2, total_batch_tokens 64 -> 32; pass the same values, or start a new run in another --out-dir"
    )
    message = stop_message(*args, "--generate", "--set", "n_head=2", "--prompt", "!")
    assert message.startswith(f"--generate: {tmp_path / 'ckpt.pt'} holds a model with another Config: n_head 4 -> 2;")
    # the schedule may change on resume (a lower lr after a divergence, a longer run), and says so
    capsys.readouterr()
    run_in_process(SPEC, *args, "--resume", "--lr", "1e-3", "--max-steps", 5, "--stop-after", 1)
    assert "resuming with changed settings: lr 0.003 -> 0.001, max_steps 4 -> 5" in capsys.readouterr().out


# --- 4. an existing run is never silently replaced ---------------------------------------------


def test_an_existing_run_is_resumed_or_refused_never_replaced(toy_data, tmp_path):
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 4)
    run_in_process(SPEC, *args, "--stop-after", 2)
    assert stop_message(*args) == (
        f"{tmp_path} already holds a run ({tmp_path / 'ckpt.pt'}): continue it with --resume, or pass another --out-dir"
    )
    # rows a killed run wrote after its last checkpoint are dropped on resume, not duplicated
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 99.0}\n{"step": 4, "lo')
    run_in_process(SPEC, *args, "--resume")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and 99.0 not in losses(rows)


# --- 5. bad inputs: each is refused up front, in one line --------------------------------------

# What a newcomer might type, and the line train.py answers with (on stderr, exit status 1).
# {out} is the run's --out-dir; {llama} a Hugging Face directory holding a Llama model.
BAD_INPUTS = [
    ("--total-batch-tokens -128", "--total-batch-tokens -128: must be at least 1 (see --help)"),
    ("--total-batch-tokens 100", "--total-batch-tokens 100 is not a multiple of batch-size x seq-len x processes = 64"),
    ("--batch-size 0", "--batch-size 0: must be at least 1 (see --help)"),
    ("--batch-size four", "argument --batch-size: invalid int value: 'four' (see --help)"),
    ("--seq-len 100", "--seq-len 100 is longer than the model's block_size 64"),
    ("--eval-steps 0", "--eval-steps 0: must be at least 1 (see --help)"),
    ("--log-every 0", "--log-every 0: must be at least 1 (see --help)"),
    ("--top-k 0", "--top-k 0: must be at least 1 (see --help)"),
    ("--max-steps 0", "--max-steps 0: must be at least 1 (see --help)"),
    ("--max-steps -3", "--max-steps -3: must be at least 1 (see --help)"),
    ("--stop-after 0", "--stop-after 0: must be at least 1 (see --help)"),
    ("--temperature -1", "--temperature -1.0: must be 0 or more (see --help)"),
    ("--lr nan", "--lr nan: must be a positive number (see --help)"),
    ("--min-lr-ratio 2", "--min-lr-ratio 2.0: must be between 0 and 1 (see --help)"),
    ("--beta2 1", "--beta2 1.0: must be at least 0 and below 1 (see --help)"),
    ("--set n_layers=2", "--set 'n_layers=2': expected FIELD=VALUE with FIELD one of"),
    ("--set n_layer=two", "--set 'n_layer=two': 'two' is not a valid int"),
    ("--parallel ddp", "--parallel ddp needs torchrun, e.g. torchrun --nproc_per_node 2"),
    ("--resume", "no checkpoint at {out}/ckpt.pt to resume from"),
    ("--generate", "no checkpoint at {out}/ckpt.pt to sample from"),
    ("--data-dir {out}/nowhere", "{out}/nowhere: data directory not found (looked for shards *_train_*.bin in it)"),
    ("--set vocab_size=50", "toy_train_000000.bin: token id 95 is outside the model's vocabulary of 50"),
    ("--tokenizer no-such-tokenizer", "--tokenizer: unknown tokenizer 'no-such-tokenizer'"),
    ("--sample-tokens 5 --prompt hello", "--prompt 'hello' has token id 31373, outside the model's vocabulary of 97"),
    (
        "--init-from {llama} --set n_layer=2",
        "--init-from takes the architecture from its config.json: drop --preset and --set",
    ),
    (
        "--init-from {llama} --preset tiny",
        "--init-from takes the architecture from its config.json: drop --preset and --set",
    ),
    ("--init-from {llama}", "--init-from {llama} holds a 'llama' checkpoint; this is gpt2's loader: use llama31."),
    ("--init-from {out}", "--init-from {out}: no config.json there (a checkpoint directory holds config.json and"),
    ("--init-from gpt2", "--init-from gpt2: no config.json there (a checkpoint directory holds"),  # the package dir
    ("--init-from openai-community/gpt2", "not a local directory; a Hugging Face hub name must be downloaded first"),
]


@pytest.mark.parametrize(("given", "answer"), BAD_INPUTS, ids=[given for given, _ in BAD_INPUTS])
def test_bad_input_is_one_line(given, answer, toy_data, tmp_path):
    places = {"out": tmp_path, "llama": tmp_path / "llama"}
    if "{llama}" in given:
        MODELS[1].build().save_pretrained(places["llama"])
    args = train_args(SPEC, toy_data, tmp_path, "--max-steps", 2)
    if "--init-from" in given:
        args = [a for a in args if not a.startswith("--set=")]
    assert answer.format(**places) in stop_message(*args, *given.format(**places).split())


def run_script(*args, torchrun=False):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *launcher, f"{SPEC.package}/train.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_user_error_is_one_line_on_stderr_without_traceback(toy_data, tmp_path):
    done = run_script(*train_args(SPEC, toy_data, tmp_path), "--data-dir", tmp_path / "nowhere")
    assert (
        done.returncode == 1
        and done.stderr == f"{tmp_path / 'nowhere'}: data directory not found (looked for shards *_train_*.bin in it)\n"
    )


def test_under_torchrun_a_user_error_is_printed_once(toy_data, tmp_path):
    done = run_script(*train_args(SPEC, toy_data, tmp_path), "--parallel", "ddp", "--eval-steps", 0, torchrun=True)
    ours = [line for line in done.stderr.splitlines() if "--eval-steps 0: must be at least 1" in line]
    assert done.returncode != 0 and len(ours) == 1, done.stderr
    assert f'{SPEC.package}/train.py", line' not in done.stderr, done.stderr  # torchrun's own traceback only


# --- 6. the validation loss does not depend on the world size ----------------------------------


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_validation_loss_is_the_same_on_any_world_size(parallel, toy_data, tmp_path):
    """1 process and 2 ranks evaluate the same tokens. 3 batches do not split evenly over 2 ranks:
    under FSDP every rank must still run the same number of forwards."""
    steps = ["--max-steps", 2, "--eval-steps", 3, "--total-batch-tokens", 2 * 4 * 16]
    single = run_in_process(SPEC, *train_args(SPEC, toy_data, tmp_path / "one", *steps))
    run_ranks(SPEC, *train_args(SPEC, toy_data, tmp_path / "two", *steps), "--parallel", parallel)
    val = [[r["val_loss"] for r in rows if "val_loss" in r] for rows in (single, metrics(tmp_path / "two"))]
    assert len(val[0]) == 1 and val[1] == pytest.approx(val[0], abs=1e-6)


# --- a randomised kill loop (slow) -------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(toy_data, tmp_path):
    """SIGKILL the script at random moments (mid-step, mid-checkpoint-write, mid-start-up), resume
    each time from whatever it left, and end with exactly the losses of a run never killed."""
    import random
    import time

    args = train_args(SPEC, toy_data, tmp_path / "killed", "--max-steps", 40, "--ckpt-every", 1)
    # every run is a subprocess with one thread: the same kernels and summation order as the killed ones
    whole_args = train_args(SPEC, toy_data, tmp_path / "whole", "--max-steps", 40)
    assert run_script(*whole_args).returncode == 0
    whole = losses(metrics(tmp_path / "whole"))
    rng = random.Random(0)
    for _ in range(6):
        resume = ["--resume"] if infra.find_checkpoint(tmp_path / "killed" / "ckpt.pt") else []
        cmd = [sys.executable, f"{SPEC.package}/train.py", *args, *resume]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 10.0))
        proc.kill()
        proc.wait()
    done = run_script(*args, "--resume" if infra.find_checkpoint(tmp_path / "killed" / "ckpt.pt") else "--seed=1337")
    assert done.returncode == 0, done.stderr
    assert losses(metrics(tmp_path / "killed")) == whole
