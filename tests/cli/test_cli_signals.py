"""Ctrl-C and SIGTERM with real signals (issue 26): the CLI, run as a subprocess on a tiny
model saved to a folder, is interrupted in a sweep; the finished steps must be written, the
running step checkpointed in ``OUT/.checkpoints``, the message must say what was written and
how to resume, and the resumed run must give bitwise the numbers of an uninterrupted one.

No timing races: the command is started with ``CAUSALPATCH_CLI_HOLD=STEP:MARKER``
(:data:`causalpatch.cli.sweeps.HOLD_ENV`), so that once step ``STEP`` has checkpointed part
of its cells it writes the file ``MARKER`` and waits for a signal; the test waits for that
file, then sends the signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import _vocab_and_merges, tiny_hf_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from causalpatch.cli.sweeps import CHECKPOINT_DIR, HOLD_ENV, checkpoint_progress
from causalpatch.result import PatchingResult

CLI = [sys.executable, "-m", "causalpatch.cli"]
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
#: Names made single tokens on top of the tiny tokenizer's words (IOI needs at least 3).
NAMES = (" Bob", " Tom", " Sam", " Anna")


def _names_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny test tokenizer (tests/conftest.py) with :data:`NAMES` as whole words."""
    vocab, merges = _vocab_and_merges()
    vocab, merges = dict(vocab), list(merges)
    for word in NAMES:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ ]+| +"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-names")
    tiny_hf_model("llama").save_pretrained(folder, safe_serialization=True)
    _names_tokenizer().save_pretrained(folder)
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != HOLD_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def _interrupt(args: list[str], step: int, sig: int, marker: Path
               ) -> tuple[int, str, str]:
    """Run the CLI held at ``step``; once it has written ``marker``, send ``sig``."""
    proc = subprocess.Popen([*CLI, *args], env=_env(**{HOLD_ENV: f"{step}:{marker}"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not marker.exists():  # waiting for the marker, not for a time
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the command never held (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _same(a: Path, b: Path) -> None:
    """Two result files hold bitwise the same numbers."""
    ra, rb = PatchingResult.from_json(a), PatchingResult.from_json(b)
    assert torch.equal(ra.effect_matrix, rb.effect_matrix), a.name
    assert (ra.clean_metric, ra.corrupted_metric) == (rb.clean_metric, rb.corrupted_metric)
    for name in ("per_pair", "std"):
        ta, tb = getattr(ra, name), getattr(rb, name)
        assert (ta is None) == (tb is None) and (ta is None or torch.equal(ta, tb)), name


IOI_FILES = ("resid_post_by_position", "attn_by_position", "mlp_by_position", "attn_head")


def test_ioi_ctrl_c_writes_finished_steps_and_resumes_to_identical_numbers(tiny_dir, tmp_path):
    args = ["ioi", "--model", str(tiny_dir), "--n", "3", "--threads", "1", "--no-progress"]
    out = tmp_path / "interrupted"
    code, _, stderr = _interrupt([*args, "--out", str(out)], 4, signal.SIGINT,
                                      tmp_path / "held")
    assert code == 130, stderr
    # the three finished steps are written, the fourth (heads: one group of pairs per token
    # length) is checkpointed in part
    assert {p.name for p in out.glob("*.json")} == {f"{n}.json" for n in IOI_FILES[:3]}
    done, cells = checkpoint_progress(out / CHECKPOINT_DIR / "step4_attn_head.json")
    assert 0 < done < cells
    message = " ".join(stderr.split())
    assert "interrupted (SIGINT) after 3 of 4 finished steps" in message
    assert all(str(out / f"{n}.json") in message for n in IOI_FILES[:3])
    assert f"step 4/4 (attn_head per head): {done} of {cells} cells checkpointed" in message
    assert f"resume with: causalpatch ioi --model {tiny_dir}" in message
    assert message.rstrip().endswith("--resume")
    assert "Traceback" not in stderr

    resumed = _run([*args, "--out", str(out), "--resume"])
    assert "resuming" not in resumed.stdout
    assert not (out / CHECKPOINT_DIR).exists()  # removed once every output is written
    reference = tmp_path / "reference"
    _run([*args, "--out", str(reference)])
    for name in IOI_FILES:
        _same(out / f"{name}.json", reference / f"{name}.json")


def test_patch_sigterm_checkpoints_and_a_plain_rerun_resumes(tiny_dir, tmp_path):
    args = ["patch", "--model", str(tiny_dir), "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--correct", " Mary", "--incorrect", " John", "--component", "attn_head",
            "--by-position", "--no-progress", "--threads", "1"]
    out = tmp_path / "interrupted"
    code, _, stderr = _interrupt([*args, "--out", str(out)], 1, signal.SIGTERM,
                                      tmp_path / "held")
    assert code == 143, stderr
    assert not list(out.glob("*.json"))  # nothing had finished
    done, cells = checkpoint_progress(out / CHECKPOINT_DIR / "patch.json")
    assert 0 < done < cells
    message = " ".join(stderr.split())
    assert "interrupted (SIGTERM)" in message and "no result written" in message
    assert f"{done} of {cells} cells checkpointed" in message and "--resume" in message

    rerun = _run([*args, "--out", str(out)])  # the same command resumes by default
    assert "resuming from the checkpoints" in " ".join(rerun.stderr.split())
    reference = tmp_path / "reference"
    _run([*args, "--out", str(reference)])
    _same(out / "result.json", reference / "result.json")


def test_interrupt_with_json_prints_one_document(tiny_dir, tmp_path):
    args = ["patch", "--model", str(tiny_dir), "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--correct", " Mary", "--incorrect", " John", "--component", "attn_head",
            "--by-position", "--json", "--threads", "1", "--out", str(tmp_path / "o")]
    code, stdout, stderr = _interrupt(args, 1, signal.SIGINT, tmp_path / "held")
    assert code == 130, stderr
    data = json.loads(stdout)
    assert data["interrupted"] == "SIGINT" and data["files"] == {}
    assert data["checkpoint"]["path"].endswith("patch.json")
    assert data["resume"].endswith("--resume")


# -- issue 26: --threads everywhere, sae checks before the load, info, patch's terminal output ----
from typer.testing import CliRunner  # noqa: E402

import causalpatch.cli as cli  # noqa: E402

runner = CliRunner()


@pytest.fixture
def tiny_cli(make_tiny_lm, monkeypatch, one_thread):
    tiny = make_tiny_lm("llama")
    monkeypatch.setattr(cli.runtime, "load_model", lambda model, dtype=None: tiny)
    monkeypatch.setattr(cli.model_info, "inspect_model",
                        lambda model, need_kinds=False: cli.ModelInfo.of(tiny))
    return tiny


def test_threads_is_a_global_flag_of_every_command(tiny_cli, monkeypatch, tmp_path):
    group = __import__("typer").main.get_command(cli.app)
    assert cli.hoist_global_flags(group, None, ["patch", "--clean", "x", "--threads", "3"]
                                  ) == ["--threads", "3", "patch", "--clean", "x"]
    assert cli.hoist_global_flags(group, None, ["ioi", "--threads=2"]) == [
        "--threads=2", "ioi"]
    assert cli.hoist_global_flags(group, None, ["sae", "train", "--threads", "2"]) == [
        "sae", "train", "--threads", "2"]  # sae train declares its own
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(cli.runtime, "load_model", lambda model, dtype=None: (
        seen.append(torch.get_num_threads()) or tiny_cli))
    res = runner.invoke(cli.app, ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED,
                                  "--correct", " Mary", "--incorrect", " John", "--layers", "0",
                                  "--out", str(tmp_path), "--threads", "3"])
    assert res.exit_code == 0, res.output
    assert seen == [3] and torch.get_num_threads() == before
    assert os.environ.get("OMP_NUM_THREADS") != "3"  # restored
    res = runner.invoke(cli.app, ["models", "--threads", "0"])
    assert res.exit_code == 2


def test_patch_prints_baselines_and_the_takeaway(tiny_cli, tmp_path):
    res = runner.invoke(cli.app, ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED,
                                  "--correct", " Mary", "--incorrect", " John",
                                  "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    result = PatchingResult.from_json(tmp_path / "result.json")
    assert f"clean {result.clean_metric:.4f}, corrupted {result.corrupted_metric:.4f}" \
        in res.output
    assert result.takeaway().split()[0] in res.output
    assert not (tmp_path / CHECKPOINT_DIR).exists()


def test_info_lists_the_sweep_components(tiny_cli):
    res = runner.invoke(cli.app, ["info", "tiny", "--json"])
    data = json.loads(res.stdout)
    assert data["sweep_components"] == list(cli.SWEEP_COMPONENTS)


@pytest.mark.parametrize("args,fragment", [
    (["--site", "blocks.1.resid_pots"], "Did you mean: blocks.1.resid_post"),
    (["--site", "blocks.x.resid_post"], "must name one layer's site"),
    (["--site", "blocks.99.resid_post"],
     "--site 'blocks.99.resid_post': layer contains 99, out of range: this model has 3 layers"),
    (["--architecture", "relu"], "--architecture"),
])
def test_sae_train_checks_come_before_the_weights_load(tiny_cli, monkeypatch, tmp_path, args,
                                                        fragment):
    def refuse(model, dtype=None):
        raise AssertionError("the weights were loaded before the argument error")

    monkeypatch.setattr(cli.runtime, "load_model", refuse)
    res = runner.invoke(cli.app, ["sae", "train", "--model", "tiny", *args,
                                  "--out", str(tmp_path / "sae")])
    assert res.exit_code == 2, res.output
    assert fragment in res.output
    assert not (tmp_path / "sae" / CHECKPOINT_DIR).exists()  # no checkpoint folder either


def test_sae_info_on_a_bad_folder_fails_without_torch(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    code = (f"import sys\nfrom causalpatch.cli import app\n"
            f"try:\n    app(['sae', 'info', {str(tmp_path)!r}])\nexcept SystemExit as e:\n"
            f"    print('torch' in sys.modules, e.code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert done.stdout.split() == ["False", "2"], done.stderr
    assert "has no sae_weights.safetensors" in " ".join(done.stderr.split())


def test_interrupt_before_a_steps_first_checkpoint_says_it_starts_over(tmp_path, capsys):
    """A signal before the running step has checkpointed anything: the message says the step
    starts over (not "0 of 0 cells checkpointed" in a file that does not exist)."""
    from causalpatch.cli.sweeps import Steps

    steps = Steps(tmp_path / "out", resume=None, as_json=False, total=4)
    steps.prepare()
    steps.running = (3, "mlp by position", steps.folder / "step3_mlp.json")
    steps.signum = signal.SIGTERM
    steps._report({})
    message = " ".join(capsys.readouterr().err.split())
    assert "step 3/4 (mlp by position) had not finished a group of cells yet: it starts over" \
        in message
    assert "0 of 0" not in message and "step3_mlp.json" not in message


def test_sae_train_interrupted_before_its_first_checkpoint_says_it_starts_over(
        tiny_cli, monkeypatch, tmp_path):
    """An interrupt before ``sae train`` has checkpointed anything: the message says the step
    starts over and gives the resuming command; exit 130, no SAE written."""
    import causalpatch.sae.train as sae_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what the CLI's SIGINT/SIGTERM handler raises mid-training

    monkeypatch.setattr(sae_train, "train_sae", interrupted)
    out = tmp_path / "sae"
    res = runner.invoke(cli.app, ["sae", "train", "--model", "tiny", "--site",
                                  "blocks.1.resid_post", "--out", str(out)])
    assert res.exit_code == 130, res.output
    message = " ".join(res.output.split())
    assert "interrupted (SIGINT)" in message and "no result written" in message
    assert "step 1/1 (SAE training) had not checkpointed anything yet: it starts over" \
        in message
    assert "resume with: causalpatch sae train" in message and message.endswith("--resume")
    assert not (out / "cfg.json").exists()


# -- sae train: the training checkpoint under real signals ---------------------------------------
SAE_ARGS = ["--site", "blocks.1.resid_post", "--features", "32", "--k", "4",
            "--tokens", "2000", "--eval-tokens", "300", "--epochs", "3", "--threads", "1",
            "--storage-dtype", "float32"]


def test_sae_train_ctrl_c_checkpoints_epochs_and_resumes_to_the_identical_sae(tiny_dir,
                                                                              tmp_path):
    """SIGINT after the first epoch: the activations and the epoch are checkpointed, the
    message says so and how to resume; ``--resume`` with other settings is refused before any
    compute; ``--resume`` with the same ones writes bitwise the SAE of an uninterrupted run."""
    from safetensors.torch import load_file

    args = ["sae", "train", "--model", str(tiny_dir), *SAE_ARGS]
    out = tmp_path / "interrupted"
    code, _, stderr = _interrupt([*args, "--out", str(out)], 1, signal.SIGINT,
                                 tmp_path / "held")
    assert code == 130, stderr
    ckpt = out / CHECKPOINT_DIR / "sae.json"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "sae.activations.safetensors", "sae.json", "sae.state.safetensors"]
    message = " ".join(stderr.split())
    assert "interrupted (SIGINT) after 0 of 1 finished step" in message
    assert (f"step 1/1 (SAE training): the collected activations and 1 of 3 epochs "
            f"checkpointed in {ckpt}") in message
    assert f"resume with: causalpatch sae train --model {tiny_dir}" in message
    assert message.endswith("--resume") and "Traceback" not in stderr
    assert not (out / "cfg.json").exists()

    other = subprocess.run([*CLI, *args[:-4], "--epochs", "4", *args[-4:], "--out", str(out),
                            "--resume"], env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 2
    assert "epochs: 3 there, 4 here" in " ".join(other.stderr.split())
    assert ckpt.exists()

    resumed = _run([*args, "--out", str(out), "--resume"])
    assert "(epoch 1/3 finished) from the checkpoint" in " ".join(resumed.stderr.split())
    assert not (out / CHECKPOINT_DIR).exists()  # removed once the SAE is written
    reference = tmp_path / "reference"
    _run([*args, "--out", str(reference)])
    got = load_file(out / "sae_weights.safetensors")
    want = load_file(reference / "sae_weights.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "cfg.json").read_text()) == json.loads(
        (reference / "cfg.json").read_text())


def test_sae_interrupt_message_names_steps_within_an_epoch(make_tiny_lm, tmp_path,
                                                            monkeypatch, one_thread):
    """With ``--checkpoint-steps``, a checkpoint taken within an epoch is described by its
    finished epochs and the steps of the running one."""
    from causalpatch.cli.commands.sae import describe_checkpoint, epochs_checkpointed
    from causalpatch.sae.checkpoint import TrainingCheckpoint, checkpoint_status
    from causalpatch.sae.train import train_sae, training_texts

    real = TrainingCheckpoint.save_state

    def save_then_stop(self, state):
        real(self, state)
        if int(state["step"]) == 13:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingCheckpoint, "save_state", save_then_stop)
    path = tmp_path / "sae.json"
    assert describe_checkpoint(path) is None and epochs_checkpointed(path) == (0, 0)
    with pytest.raises(KeyboardInterrupt):
        train_sae(make_tiny_lm("llama"), "blocks.1.resid_post", 32, k=4, train_tokens=1500,
                  eval_tokens=200, context=32, epochs=3, batch_tokens=128,
                  docs=list(training_texts(("known_facts",)))[:200], checkpoint=path,
                  checkpoint_steps=13)
    steps_per_epoch = checkpoint_status(path).steps // 3
    assert 13 - steps_per_epoch > 0  # within the second epoch
    assert epochs_checkpointed(path) == (1, 3)
    assert describe_checkpoint(path) == (f"the collected activations and 1 of 3 epochs, "
                                         f"{13 - steps_per_epoch} steps of epoch 2")
