"""push_to_hub.py / `modeling_gpt2_scratch.hub`: a run becomes a Hub repository that loads with the Auto classes.

Offline: the run is a tiny one written by `make_tiny_run` (the one place that knows the run layout), and uploads go
to `tests/hub_stub.py`, a stand-in for the Hub on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from hub_stub import NO_AUTH_NEEDED, HubStub, StubRepo, route  # tests/ is on sys.path (pytest's rootdir import)
from huggingface_hub import ModelCard
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

import push_to_hub
from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, hub
from modeling_gpt2_scratch.configuration_gpt2_scratch import MIN_TRANSFORMERS_VERSION
from modeling_gpt2_scratch.hub import _results_rows, read_run_info, resolve_source, stage_folder, upload_folder_to_hub
from modeling_gpt2_scratch.tokenization import get_hf_tokenizer
from modeling_gpt2_scratch.training import TrainState

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
REPO_ID = "alice/tiny-gpt2-scratch"
TOKEN = "hf_FakeTokenForTheHubStub0123456789"
CHECKPOINT_STEP = 4
STEPS = 8
BATCH_TOKENS = 4096
SECRET_DIR = "/home/alice/private-corpus"  # a local path in the run's config: must not reach the card
DROPPED_ENV = (
    "PYTHONPATH",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


# --- the tiny run ----------------------------------------------------------------------------------------------------


@dataclass
class TinyRun:
    """A run folder in `train_accelerate.py`'s layout, and the logits its two models give on `ids`."""

    run_dir: Path
    checkpoint_dir: Path
    ids: torch.Tensor
    final_logits: torch.Tensor
    checkpoint_logits: torch.Tensor
    summary: dict


def _logits(model: GPT2ScratchForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits.contiguous()


def make_tiny_run(run_dir: Path) -> TinyRun:
    """Write a tiny run: final/ (save_pretrained + tokenizer), a save_state-like checkpoint, the run's JSON files,
    metrics.jsonl and loss.png. The checkpoint's keys carry torch.compile's prefix and no tied LM head, as
    `accelerator.save_state` of a compiled model writes them."""
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    checkpoint_model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL))
    checkpoint_dir = run_dir / "checkpoints" / f"step_{CHECKPOINT_STEP:07d}"
    checkpoint_dir.mkdir(parents=True)
    state = {f"_orig_mod.{k}": v.clone() for k, v in checkpoint_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, checkpoint_dir / "model.safetensors")
    checkpoint_model.config.save_pretrained(checkpoint_dir)
    torch.save({"state": {}}, checkpoint_dir / "optimizer.bin")

    torch.manual_seed(1)
    final_model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**SMALL))
    final_model.save_pretrained(run_dir / "final")
    get_hf_tokenizer(model_max_length=SMALL["n_positions"]).save_pretrained(run_dir / "final")

    run_config = {
        "model": SMALL,
        "data": {"dataset": "karpathy/tiny_shakespeare", "dataset_config": None, "shards_dir": f"{SECRET_DIR}/x"},
        "training": {
            "micro_batch_size": 8,
            "seq_len": 64,
            "total_batch_tokens": BATCH_TOKENS,
            "max_steps": STEPS,
            "max_lr": 6e-4,
            "warmup_steps": 2,
            "weight_decay": 0.1,
            "seed": 1337,
            "mixed_precision": "no",
            "data_dir": f"{SECRET_DIR}/shards",
            "log_every": 1,
        },
    }
    metrics = [
        {"step": s, "tokens": s * BATCH_TOKENS, "train_loss": 11.0 - 0.5 * s, "lr": 6e-4, "grad_norm": 1.0}
        | {"elapsed": 925.75 * s}  # training seconds, resumes included
        | ({"val_loss": 11.2 - 0.5 * s} if s % CHECKPOINT_STEP == 0 else {})
        for s in range(1, STEPS + 1)
    ]
    summary = {
        "steps": STEPS,
        "tokens_seen": STEPS * BATCH_TOKENS,
        "final_val_loss": 7.2345,
        "final_train_loss": 7.0,
        "wall_clock_seconds": 3723.0,
        "num_processes": 2,
        "device": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3",
        "mixed_precision": "bf16",
        "torch_version": torch.__version__,
        "transformers_version": "5.24.0",
    }
    (run_dir / "run_config.json").write_text(json.dumps(run_config))
    (run_dir / "run_summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([row["tokens"] for row in metrics], [row["train_loss"] for row in metrics])
    fig.savefig(run_dir / "loss.png")
    plt.close(fig)
    return TinyRun(
        run_dir, checkpoint_dir, ids, _logits(final_model, ids), _logits(checkpoint_model, ids), summary=summary
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    return make_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def staged(tiny_run, tmp_path_factory) -> Path:
    """The run staged in the default (scratch) format."""
    out = tmp_path_factory.mktemp("staged") / "repo"
    stage_folder(tiny_run.run_dir, out, REPO_ID)
    return out


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no PYTHONPATH, no real token or endpoint, no offline mode."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV and not k.startswith("HF_OIDC")}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


# --- staging ---------------------------------------------------------------------------------------------------------


def test_staged_folder_holds_the_hub_files(staged):
    names = {p.name for p in staged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "loss.png"} <= names
    assert {"configuration_gpt2_scratch.py", "modeling_gpt2_scratch.py"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    config = json.loads((staged / "config.json").read_text())
    assert config["model_type"] == "gpt2_scratch"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2_scratch.GPT2ScratchForCausalLM"


def test_staged_tokenizer_config_holds_no_loader_options(staged):
    config = json.loads((staged / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config) and config["tokenizer_class"] == "GPT2Tokenizer"


def test_staged_text_files_hold_no_local_paths(staged, tiny_run):
    for path in staged.iterdir():
        if path.suffix in (".json", ".md", ".py"):
            text = path.read_text()
            assert str(tiny_run.run_dir) not in text and SECRET_DIR not in text, path.name


@pytest.mark.slow
def test_staged_folder_loads_and_generates_in_fresh_offline_process(staged, tiny_run, tmp_path, run_without_repo):
    torch.save({"ids": tiny_run.ids, "logits": tiny_run.final_logits}, tmp_path / "expected.pt")
    result = run_without_repo(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        path = {str(staged)!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        assert type(model).__name__ == "GPT2ScratchForCausalLM", type(model)
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        inputs = tokenizer("Hello world", return_tensors="pt")
        assert inputs.input_ids.tolist() == [[15496, 995]]
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert out.shape == (1, 7), out.shape
        generator = pipeline("text-generation", model=path, trust_remote_code=True)
        text = generator("Hello world", max_new_tokens=4, do_sample=False)[0]["generated_text"]
        assert text.startswith("Hello world") and len(text) > len("Hello world")
        print("OK")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_model_card_holds_metadata_and_run_numbers(staged, tiny_run):
    card = ModelCard.load(staged / "README.md")
    assert card.data.license == "mit"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.language == "en"
    assert "and is meant for English text." in card.text
    assert card.data.datasets == ["karpathy/tiny_shakespeare"]
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()  # trained from scratch
    assert {"gpt2", "gpt2-scratch", "custom_code"} <= set(card.data.tags)
    text = card.text
    assert f"{tiny_run.summary['tokens_seen']:,}" in text  # tokens seen
    assert "7.2345" in text  # final val loss
    assert "2 x NVIDIA H100 80GB HBM3" in text and "bf16" in text and "1h 02m 03s" in text  # hardware, time
    assert "`max_lr` | 0.0006" in text and "`total_batch_tokens` | 4096" in text  # hyperparameters
    assert "<details>" in text and "`log_every` | 1" in text and "`data_dir` | `shards` (local)" in text
    assert "karpathy/tiny_shakespeare" in text and "`x` (local)" in text  # data, local path reduced to its name
    assert "![" in text and "(loss.png)" in text
    assert f'AutoTokenizer.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text  # it reads config.json
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert f'pipeline("text-generation", model="{REPO_ID}", trust_remote_code=True)' in text
    version = MIN_TRANSFORMERS_VERSION
    needs = f'# the model\'s code needs transformers>={version}: pip install -U "transformers>={version}"'
    assert f"```python\n{needs}\nfrom transformers import" in text  # the first line of the usage snippet
    assert "## Limitations" in text and "## Model" in text and "| layers | 2 |" in text


def test_bare_export_gets_a_card_with_unknowns(tiny_run, tmp_path):
    shutil.copytree(tiny_run.run_dir / "final", tmp_path / "export")
    files = stage_folder(tmp_path / "export", tmp_path / "repo", REPO_ID)
    assert "loss.png" not in {f.path for f in files}
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.datasets is None and card.data.license == "mit"
    assert "| tokens seen | unknown |" in card.text and "hyperparameters unknown" in card.text
    assert "![" not in card.text


def test_checkpoint_input_stages_the_checkpoint_model(tiny_run, tmp_path):
    source = resolve_source(tiny_run.checkpoint_dir)
    assert source.kind == "checkpoint" and source.step == CHECKPOINT_STEP and source.run_dir == tiny_run.run_dir
    stage_folder(source, tmp_path / "repo", REPO_ID)
    model = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "repo")
    assert torch.equal(_logits(model, tiny_run.ids), tiny_run.checkpoint_logits)
    text = ModelCard.load(tmp_path / "repo" / "README.md").text
    # the numbers of the checkpoint's step (from metrics.jsonl), not those of the end of the run
    assert f"checkpoint at step {CHECKPOINT_STEP}" in text
    assert f"| tokens seen | {CHECKPOINT_STEP * BATCH_TOKENS:,} |" in text
    assert "| final validation loss | 9.2000" in text and "7.2345" not in text
    assert "| training time | 1h 01m 43s |" in text  # elapsed at step 4: 3703 s


def test_a_checkpoints_loss_curve_stops_at_its_step(tiny_run, tmp_path, monkeypatch):
    """The run's loss.png shows all 8 steps; a checkpoint's repository gets the curve drawn up to its step 4."""
    drawn = []
    plot = hub.plot_losses
    monkeypatch.setattr(
        hub, "plot_losses", lambda rows, path: drawn.append([r["step"] for r in rows]) or plot(rows, path)
    )
    stage_folder(resolve_source(tiny_run.checkpoint_dir), tmp_path / "checkpoint", REPO_ID)
    assert drawn == [list(range(1, CHECKPOINT_STEP + 1))]
    staged_png = (tmp_path / "checkpoint" / "loss.png").read_bytes()
    assert staged_png.startswith(b"\x89PNG") and staged_png != (tiny_run.run_dir / "loss.png").read_bytes()
    assert "(loss.png)" in (tmp_path / "checkpoint" / "README.md").read_text()
    stage_folder(tiny_run.run_dir, tmp_path / "final", REPO_ID)  # the final model: the run's own curve, copied
    assert drawn == [list(range(1, CHECKPOINT_STEP + 1))]
    assert (tmp_path / "final" / "loss.png").read_bytes() == (tiny_run.run_dir / "loss.png").read_bytes()


def test_run_without_final_uses_its_latest_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.checkpoint_dir, run / "checkpoints" / "step_0000002")
    shutil.copytree(tiny_run.checkpoint_dir, run / "checkpoints" / "step_0000010")
    source = resolve_source(run)
    assert source.kind == "checkpoint" and source.step == 10 and source.model_dir.name == "step_0000010"


def test_a_run_whose_final_was_left_mid_replace_publishes_that_final(tiny_run, tmp_path, caplog):
    """A crash between the trainer's two renames leaves `final/` as `.tmp-old-final`: publishing the run restores it,
    rather than falling back to a checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    os.replace(run / "final", run / ".tmp-old-final")
    (run / ".tmp-final").mkdir()  # the new export, which had not yet taken the name
    with caplog.at_level(logging.WARNING):
        source = resolve_source(run)
    assert source.kind == "export" and source.model_dir == run.resolve() / "final"
    assert any(r.message.startswith(f"restored {run.resolve() / 'final'}") for r in caplog.records)
    os.replace(run / "final", run / ".tmp-old-final")  # and when RUN/final itself is given
    assert resolve_source(run / "final").model_dir == run.resolve() / "final"


def test_training_time_is_the_training_loops_over_every_resume(tiny_run, tmp_path):
    """`run_summary.json`'s `training_seconds` (the loop's, over every resume) before `wall_clock_seconds`, which
    runs from before 2026-11-26 alone recorded: the last process's, setup included."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("final", "checkpoints"))
    assert read_run_info(run).training_seconds is None  # an older run: the card shows its wall clock (above)
    summary = json.loads((run / "run_summary.json").read_text()) | {"training_seconds": 7406.0}
    (run / "run_summary.json").write_text(json.dumps(summary))
    info = read_run_info(run)
    assert (info.training_seconds, info.wall_clock_seconds) == (7406.0, 3723.0)
    rows = dict(_results_rows(info))
    assert rows["training time"] == "2h 03m 26s"


def test_a_checkpoint_between_logged_steps_names_the_step_of_its_train_loss(tmp_path):
    rows = [{"step": step, "tokens": 10 * step, "train_loss": 9.0 - step} for step in (1, 2, 3, 5)]  # 4: not logged
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = dict(_results_rows(read_run_info(tmp_path, step=4)))
    assert results["final train loss"] == "6.0000 (at step 3)" and results["optimizer steps"] == "4"
    assert dict(_results_rows(read_run_info(tmp_path)))["final train loss"] == "4.0000"  # the run's: step 5


def test_flags_take_underscores_too_as_the_trainers_do():
    args = push_to_hub.parse_args(
        ["run", "--repo_id", "a/b", "--dry_run", "--local_dir", "d", "--commit_message", "m"]
    )
    assert (args.repo_id, args.dry_run, args.local_dir, args.commit_message) == ("a/b", True, "d", "m")


def test_read_run_info_tolerates_missing_and_broken_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens": 10, "train_loss": 3.5}\n{"step": 2, "tok')
    info = read_run_info(tmp_path)
    assert (info.steps, info.tokens_seen, info.final_train_loss) == (1, 10, 3.5)
    assert info.final_val_loss is None and info.wall_clock_seconds is None and info.loss_curve is None


def test_gpt2_format_is_a_plain_gpt2lmheadmodel_with_the_same_logits(tiny_run, tmp_path):
    files = {f.path for f in stage_folder(tiny_run.run_dir, tmp_path / "repo", REPO_ID, fmt="gpt2")}
    assert not any(name.endswith(".py") for name in files)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "generation_config.json"} <= files
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "repo").eval()
    with torch.no_grad():
        logits = hf(tiny_run.ids).logits
    assert (logits - tiny_run.final_logits).abs().max().item() <= 1e-4
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert "trust_remote_code" not in card.text and "custom_code" not in card.data.tags
    assert "transformers>=" not in card.text and "```python\nfrom transformers import" in card.text  # GPT-2's own code
    assert f'pipeline("text-generation", model="{REPO_ID}")' in card.text
    assert f"| parameters | {hf.num_parameters():,} |" in card.text  # GPT-2's 50,257 rows, not the padded 50,304


# --- upload ----------------------------------------------------------------------------------------------------------


def _assert_token_only_in_authorization(hub: HubStub) -> None:
    places = {where for _, where in hub.token_locations(TOKEN)}
    assert places == {"authorization"}, places
    served = [r for r in hub.requests if route(r.method, urlsplit(r.target).path)[1] is not None]
    assert served
    for request in served:
        if route(request.method, urlsplit(request.target).path)[0] not in NO_AUTH_NEEDED:
            assert request.header("Authorization") == f"Bearer {TOKEN}", request.target


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_upload_sends_every_file_and_the_token_only_in_authorization(staged, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # plain HTTP + LFS, which the stub serves
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with HubStub(TOKEN) as hub:
        repo_url, commit_url = upload_folder_to_hub(staged, REPO_ID, token=TOKEN, endpoint=hub.url)
        upload_folder_to_hub(staged, REPO_ID, token=TOKEN, endpoint=hub.url)  # again: the repo exists (409)
    assert repo_url == f"{hub.url}/{REPO_ID}" and commit_url.startswith(f"{hub.url}/{REPO_ID}/commit/")
    local = {p.name: p.read_bytes() for p in staged.iterdir()}
    assert hub.files(REPO_ID) == local
    assert local["model.safetensors"] in hub.lfs_objects.values() and local["loss.png"] in hub.lfs_objects.values()
    assert len(hub.repos[REPO_ID].commits) == 2 and not hub.repos[REPO_ID].private
    _assert_token_only_in_authorization(hub)


@pytest.mark.slow
def test_cli_uploads_to_a_branch_of_a_private_repo(tiny_run, tmp_path):
    with HubStub(TOKEN) as hub:
        env = _clean_env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"))
        command = [sys.executable, str(REPO_ROOT / "push_to_hub.py"), str(tiny_run.run_dir), "--repo-id", REPO_ID]
        command += ["--private", "--revision", "dev", "--commit-message", "tiny run", "--local-dir", "staged"]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    assert "HTTP Request" not in result.stderr  # the HTTP client's per-request log lines stay off
    repo = hub.repos[REPO_ID]
    assert repo.private and repo.commits == ["tiny run"] and repo.branches["main"] == {}
    staged = {p.name: p.read_bytes() for p in (tmp_path / "staged").iterdir()}
    assert hub.files(REPO_ID, "dev") == staged
    assert all(TOKEN.encode() not in content for content in staged.values())
    assert f"{hub.url}/{REPO_ID}" in result.stdout and "model.safetensors" in result.stdout
    _assert_token_only_in_authorization(hub)


@pytest.mark.slow
def test_inherited_push_to_hub_uploads_a_loadable_repository(tmp_path):
    script = textwrap.dedent(
        f"""
        from modeling_gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
        from modeling_gpt2_scratch.tokenization import get_hf_tokenizer

        model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**{SMALL!r}))
        model.push_to_hub({REPO_ID!r}, private=True, commit_message="from push_to_hub")
        get_hf_tokenizer(model_max_length=model.config.n_positions).push_to_hub({REPO_ID!r})
        """
    )
    with HubStub(TOKEN) as hub:
        env = _clean_env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO_ROOT))
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.files(REPO_ID)
    expected = {"model.safetensors", "config.json", "configuration_gpt2_scratch.py", "modeling_gpt2_scratch.py"}
    assert expected | {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert "AutoModelForCausalLM" in json.loads(files["config.json"])["auto_map"]
    assert hub.repos[REPO_ID].private and hub.repos[REPO_ID].commits[0] == "from push_to_hub"
    _assert_token_only_in_authorization(hub)


def test_dry_run_stages_and_lists_without_network_or_token(tiny_run, tmp_path, monkeypatch, capsys):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.chdir(tmp_path)
    with HubStub(TOKEN) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        status = push_to_hub.main([str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", "out"])
    out = capsys.readouterr().out
    assert status == 0 and hub.requests == []
    assert "Dry run" in out and "model.safetensors" in out and "README.md" in out and "total" in out
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_license_flag_goes_into_the_card(tiny_run, tmp_path):
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    assert push_to_hub.main([*argv, "--license", "apache-2.0"]) == 0
    assert ModelCard.load(tmp_path / "out" / "README.md").data.license == "apache-2.0"


# --- errors ----------------------------------------------------------------------------------------------------------


def _run_main_expect_error(argv: list[str], capsys) -> str:
    assert push_to_hub.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--repo-id", REPO_ID, "--dryrun"], "unrecognized arguments: --dryrun: did you mean --dry_run?"),
        (["--repo-id", REPO_ID, "--format", "hf"], "argument --format: invalid choice: 'hf' (choose from"),
        ([], "the following arguments are required: --repo-id/--repo_id"),
    ],
)
def test_a_mistyped_flag_or_value_is_one_line_naming_it(tmp_path, capsys, flags, message):
    """They came below argparse's usage block; a typo'd flag named no flag to use instead."""
    assert push_to_hub.main([str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.endswith(" (see --help)\n") and err.count("\n") == 1, err


def test_missing_folder_is_an_error(tmp_path, capsys):
    line = _run_main_expect_error([str(tmp_path / "nope"), "--repo-id", REPO_ID, "--dry-run"], capsys)
    assert "does not exist" in line and "nope" in line


def test_folder_that_is_not_a_run_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    line = _run_main_expect_error([str(tmp_path), "--repo-id", REPO_ID, "--dry-run"], capsys)
    assert "is not a gpt2-scratch run" in line


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("checkpoints/.tmp-step_0000006", "is an unfinished save"),
        (".tmp-final", "is an unfinished save"),
        ("checkpoints/.tmp-old-step_0000004", "is a step_0000004 that a replacing save set aside"),
    ],
)
def test_a_trainers_temporary_folder_is_an_error_before_staging(tiny_run, tmp_path, capsys, name, message):
    """A save cut short before its rename holds config.json and weights, as `--resume` refuses it: it was staged
    as the run's final model, with the run's last numbers in its card."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    model_dir = tiny_run.run_dir / ("final" if name.endswith("final") else f"checkpoints/step_{CHECKPOINT_STEP:07d}")
    shutil.copytree(model_dir, run_dir / name)
    argv = [str(run_dir / name), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error(argv, capsys)
    assert line.startswith(f"error: {run_dir / name} {message}") and not (tmp_path / "out").exists(), line


@pytest.mark.parametrize("repo_id", ["no-namespace", "alice/bad..name", "alice/a/b", "-alice/x", "alice/x y"])
def test_invalid_repo_id_is_an_error(tiny_run, repo_id, capsys):
    line = _run_main_expect_error([str(tiny_run.run_dir), f"--repo-id={repo_id}", "--dry-run"], capsys)
    assert "Invalid --repo-id" in line and "USER/NAME" in line


@pytest.mark.parametrize(
    "revision", ["my branch", "v1..2", "-x", "exp/.hidden", "refs/pr/abc", "x.lock", "a:b", "refs/heads/dev"]
)
def test_invalid_revision_is_an_error_before_the_repository_is_created(tiny_run, revision, monkeypatch, capsys):
    """The Hub refused such a name in `create_branch`, after `create_repo` had made the repository."""
    with HubStub(TOKEN) as hub:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        line = _run_main_expect_error([str(tiny_run.run_dir), "--repo-id", REPO_ID, f"--revision={revision}"], capsys)
        with pytest.raises(ValueError, match="Invalid --revision"):
            upload_folder_to_hub(tiny_run.run_dir, REPO_ID, token=TOKEN, endpoint=hub.url, revision=revision)
    assert line.startswith(f"error: Invalid --revision {revision!r}: a branch name") and "refs/pr/N" in line
    assert hub.requests == [] and REPO_ID not in hub.repos


def test_no_token_is_an_error_that_says_how_to_log_in(tiny_run, tmp_path, monkeypatch, capsys):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    line = _run_main_expect_error([str(tiny_run.run_dir), "--repo-id", REPO_ID], capsys)
    assert "hf auth login" in line and "HF_TOKEN" in line


@pytest.mark.parametrize("where", ["HF_TOKEN", "hf auth login"])
def test_a_token_the_hub_refuses_is_one_line_saying_where_it_came_from(tiny_run, tmp_path, monkeypatch, capsys, where):
    """A 401 printed the HTTP client's message alone, with no word of which token was sent or how to fix it."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    if where == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    else:  # the file `hf auth login` writes
        (tmp_path / "token").write_text("hf_revoked")
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with HubStub(TOKEN) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        line = _run_main_expect_error([str(tiny_run.run_dir), "--repo-id", REPO_ID], capsys)
    assert "401 Unauthorized" in line and "the Hub refused the token: " in line and "hf_revoked" not in line
    if where == "HF_TOKEN":
        assert line.endswith(
            "set HF_TOKEN to a valid token with write access, or unset it to use the one `hf auth login` saves."
        )
    else:
        assert line.endswith("run `hf auth login` with a valid token that has write access, or set HF_TOKEN to one.")
    assert REPO_ID not in hub.repos  # nothing was created


def test_offline_mode_is_an_error_before_staging(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error(argv, capsys)
    assert "HF_HUB_OFFLINE" in line and "--dry-run" in line and not (tmp_path / "out").exists()


def test_non_empty_local_dir_is_an_error(tiny_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("not ours")
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error(argv, capsys)
    assert "is not an empty folder" in line and "delete this one" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_a_local_dir_that_is_a_file_is_an_error_that_says_so(tiny_run, tmp_path, capsys):
    (tmp_path / "out").write_text("not ours")
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error(argv, capsys)
    assert line.endswith(f"{tmp_path / 'out'} is a file, not a folder: pass a new or empty folder to stage into.")
    assert (tmp_path / "out").read_text() == "not ours"


def test_a_local_dir_that_cannot_be_created_is_an_error_naming_it_and_the_flag(tiny_run, tmp_path, capsys):
    """Read-only storage, or a file on its path: was a bare "error: [Errno 20] Not a directory: '...'"."""
    (tmp_path / "file").write_text("not ours")
    out = tmp_path / "file" / "out"
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(out)]
    line = _run_main_expect_error(argv, capsys)
    fix = "pass a folder you can write to with --local-dir."
    assert line == f"error: Cannot stage into {out} (Not a directory): {fix}"


def test_a_local_dir_staged_before_is_staged_again(tiny_run, staged, tmp_path, capsys):
    """A retry after a failed upload (or a push after a --dry-run) reuses its --local-dir; a folder that holds
    anything else besides an earlier staging is left alone."""
    shutil.copytree(staged, tmp_path / "out")  # scratch format: code files and all
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    assert push_to_hub.main([*argv, "--format", "gpt2"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"
    assert not list((tmp_path / "out").glob("*.py"))  # nothing of the earlier staging is left
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "delete this one" in _run_main_expect_error(argv, capsys)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and (tmp_path / "out" / "README.md").is_file()


def test_a_staged_folder_pushed_with_itself_as_local_dir_is_an_error_that_keeps_it(staged, tmp_path, capsys):
    """An earlier staging is a model folder too: pushing it with `--local-dir` on itself must not wipe it first."""
    shutil.copytree(staged, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    argv = [str(tmp_path / "out"), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error(argv, capsys)
    assert "is the model folder being published" in line and "--local-dir" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


# --- re-pushes, provenance, noisy or broken input --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_a_re_push_leaves_nothing_stale(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    scratch, gpt2 = tmp_path / "scratch", tmp_path / "gpt2"
    stage_folder(tiny_run.run_dir, scratch, REPO_ID)
    stage_folder(tiny_run.run_dir, gpt2, REPO_ID, fmt="gpt2")
    with HubStub(TOKEN) as hub:
        upload_folder_to_hub(scratch, REPO_ID, token=TOKEN, endpoint=hub.url)
        assert "modeling_gpt2_scratch.py" in hub.files(REPO_ID)
        upload_folder_to_hub(gpt2, REPO_ID, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO_ID) == {p.name: p.read_bytes() for p in gpt2.iterdir()}  # no remote code left behind


def test_private_with_an_existing_public_repo_is_an_error_before_any_upload(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStub(TOKEN) as hub:
        hub.repos[REPO_ID] = StubRepo(private=False, branches={"main": {"README.md": b"public"}})
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        line = _run_main_expect_error([str(tiny_run.run_dir), "--repo-id", REPO_ID, "--private"], capsys)
    assert f"{REPO_ID} already exists and is public" in line and "nothing was uploaded" in line
    assert "update_repo_settings" in line and "drop --private" in line
    repo = hub.repos[REPO_ID]
    assert not repo.private and repo.commits == [] and repo.branches == {"main": {"README.md": b"public"}}
    assert not [r for r in hub.requests if "/preupload/" in r.target or "/commit/" in r.target]


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_an_upload_that_fails_midway_is_a_one_line_error_and_keeps_the_staging(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """The storage refuses the weights after the repository was created: huggingface_hub wraps that in a
    RuntimeError ("Error while uploading ..."), as hf_xet does its failures; nothing is committed."""
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStub(TOKEN) as hub:
        monkeypatch.setattr(hub, "lfs_upload", lambda body, oid: (403, {"error": "Request has expired"}))
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--local-dir", str(tmp_path / "out")]
        assert push_to_hub.main(argv) == 1
    err = capsys.readouterr().err  # with the upload's progress bars, which the CLI keeps
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    assert "nothing was committed" in line and "Request has expired" in line and TOKEN not in line
    assert hub.repos[REPO_ID].commits == [] and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_fine_tuned_run_on_a_local_corpus_says_so_and_shows_file_names_only(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    config["model"]["init_from"] = "openai-community/gpt2"
    config["data"] = {"dataset": "data/my_corpus", "dataset_source": "local"}  # relative: not a path here
    config["training"] |= {"output_dir": "C:\\Users\\alice\\runs\\q", "data_dir": "D:/data/alice/shards"}
    (run_dir / "run_config.json").write_text(json.dumps(config))
    stage_folder(run_dir, tmp_path / "repo", REPO_ID)
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and "fine-tuned from `openai-community/gpt2`" in card.text
    assert "trained from scratch" not in card.text
    assert card.data.datasets is None and "huggingface.co/datasets/data" not in card.text
    assert "a local corpus (`my_corpus`)" in card.text
    assert "Users" not in card.text and "D:/data" not in card.text  # Windows paths become their last name
    assert "`q` (local)" in card.text and "`shards` (local)" in card.text


def test_a_run_fine_tuned_from_gpt2s_old_id_names_its_repository_and_the_relation(tiny_run, tmp_path):
    """`--init_from gpt2` loads through the Hub's redirect; the card's `base_model` is the repository's own id
    (openai-community/gpt2, since the Hub moved the canonical repositories), with `base_model_relation: finetune`."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    config["model"] |= {"init_from": "gpt2", "init_from_source": "hub"}
    (run_dir / "run_config.json").write_text(json.dumps(config))
    stage_folder(run_dir, tmp_path / "repo", REPO_ID)
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and card.data.base_model_relation == "finetune"
    assert "fine-tuned from `openai-community/gpt2`" in card.text


@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "empty-folder"])
@pytest.mark.parametrize("fails", ["weights", "tokenizer"])
def test_a_full_disk_while_staging_is_a_one_line_error_naming_the_folder(
    tiny_run, tmp_path, monkeypatch, capsys, fails, existed
):
    """What safetensors and tokenizers raise on a full disk (seen on a full tmpfs): it was a traceback. The staging
    cut short is removed (the folder too, where the call made it), so the same command works once there is space:
    the weights it had written made the folder neither empty nor a staging, and the retry was refused."""
    import tokenizers
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        if fails == "weights":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise Exception("No space left on device (os error 28)")  # tokenizers' Rust code: a bare Exception

    target = (GPT2ScratchForCausalLM, "save_pretrained") if fails == "weights" else (tokenizers.Tokenizer, "save")
    monkeypatch.setattr(*target, disk_full)
    out = tmp_path / "out"
    if existed:
        out.mkdir()
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(out)]
    line = _run_main_expect_error(argv, capsys)
    assert line.startswith(f"error: Staging into {out} failed (") and "No space left on device" in line, line
    assert line.endswith("is its disk full? Free space there, or stage on another disk with --local-dir."), line
    assert (list(out.iterdir()) == []) if existed else not out.exists()
    monkeypatch.undo()  # space again: the same command stages
    assert push_to_hub.main(argv) == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize("damage", ["tokenizer.json cut short", "tokenizer_config.json not a mapping"])
def test_corrupt_tokenizer_files_are_a_one_line_error_naming_them(tiny_run, tmp_path, capsys, damage):
    """A bare JSON error naming no file, or an AttributeError traceback, before."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    name = damage.split()[0]
    path = run_dir / "final" / name
    path.write_text(path.read_text()[:300] if "cut short" in damage else "[]")
    line = _run_main_expect_error([str(run_dir), "--repo-id", REPO_ID, "--dry-run"], capsys)
    assert line.startswith(f"error: Cannot load the tokenizer in {run_dir / 'final' / 'tokenizer.json'} and "), line
    assert line.endswith("Export the run again, or delete both (the trainer's tokenizer is GPT-2's, which is then "
                         "staged afresh)."), line  # fmt: skip


def test_gpt2s_ranks_not_found_is_their_own_one_line_error_not_a_full_disk(tiny_run, tmp_path, capsys, monkeypatch):
    """A folder without tokenizer files gets GPT-2's tokenizer afresh; offline without tiktoken's cache, that error
    was rewritten as "Staging ... failed (...): is its disk full?", whose fix does not help."""
    from modeling_gpt2_scratch.tokenization import EncodingFilesNotFoundError

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (run_dir / "final" / name).unlink()
    message = "Cannot load GPT-2's BPE ranks for tiktoken: not in tiktoken's cache. Set TIKTOKEN_CACHE_DIR."

    def no_ranks(**kwargs):
        raise EncodingFilesNotFoundError(message)

    monkeypatch.setattr(hub, "get_hf_tokenizer", no_ranks)
    line = _run_main_expect_error([str(run_dir), "--repo-id", REPO_ID, "--dry-run"], capsys)
    assert line == f"error: {message}"


def test_a_damaged_byte_in_metrics_costs_its_line_only(tiny_run, tmp_path):
    """metrics.jsonl with a byte that is not UTF-8 (disk damage): the other lines still make the card's numbers;
    the whole push stopped on a UnicodeDecodeError naming no file."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 999, "train_loss": 1.0, "note": "\xc3')
    assert hub._read_metrics(run_dir / "metrics.jsonl") == hub._read_metrics(tiny_run.run_dir / "metrics.jsonl")
    stage_folder(run_dir, tmp_path / "repo", REPO_ID)
    assert (tmp_path / "repo" / "README.md").is_file()


def test_corrupt_weights_are_a_one_line_error(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    weights = run_dir / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    line = _run_main_expect_error([str(run_dir), "--repo-id", REPO_ID, "--dry-run"], capsys)
    assert "Cannot load the weights" in line and "corrupt" in line


@pytest.mark.parametrize("content", ['{"model_type": "gpt2_scr', "[]"], ids=["cut-short", "not-an-object"])
def test_a_broken_config_json_is_a_one_line_error_that_names_it(tiny_run, tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    (run_dir / "final" / "config.json").write_text(content)
    line = _run_main_expect_error([str(run_dir), "--repo-id", REPO_ID, "--dry-run"], capsys)
    assert str(run_dir / "final") in line


@pytest.mark.parametrize(
    "change, problem",
    [({"n_layer": 3}, "missing: transformer.h.2."), ({"n_layer": 1}, "unexpected: transformer.h.1."),
     ({"n_positions": 128}, "shape mismatches: transformer.wpe.weight (64, 32) vs (128, 32)")],
)  # fmt: skip
def test_an_export_whose_weights_do_not_match_its_config_is_a_one_line_error(
    tiny_run, tmp_path, capsys, change, problem
):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    config_path = run_dir / "final" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | change))
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' own root: it does not propagate further
    try:
        line = _run_main_expect_error([str(run_dir), "--repo-id", REPO_ID, "--dry-run"], capsys)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "do not match its config.json" in line and problem in line
    assert not [message for message in logged if "LOAD REPORT" in message]  # the table would repeat the line


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "run-from-before-the-record"])
def test_a_run_fine_tuned_from_a_relative_local_folder_has_no_base_model(tiny_run, tmp_path, recorded):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    config["model"]["init_from"] = "models/gpt2-local"  # relative to where training ran: the run's parent here
    if recorded:
        config["model"]["init_from_source"] = "local"  # what train_accelerate.py writes: no folder needed to tell
    else:
        (tmp_path / "models" / "gpt2-local").mkdir(parents=True)
    (run_dir / "run_config.json").write_text(json.dumps(config))
    stage_folder(run_dir, tmp_path / "repo", REPO_ID)
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.base_model is None and "fine-tuned from `gpt2-local` (local)" in card.text
    assert "models/gpt2-local" not in card.content


def test_a_local_corpus_card_leaves_out_the_splits_the_pipeline_ignored(tiny_run, tmp_path):
    """Local files form one stream with --val_fraction held out: --split, --val_split and --dataset_config were
    not used."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    local = {"dataset": "corpus/shakespeare.txt", "dataset_source": "local", "val_fraction": 0.1}
    config["data"].update(local, split="train", val_split="validation", dataset_config="sample-10BT")
    (run_dir / "run_config.json").write_text(json.dumps(config))
    stage_folder(run_dir, tmp_path / "repo", REPO_ID)
    text = ModelCard.load(tmp_path / "repo" / "README.md").text
    assert "`shakespeare.txt` (local)" in text and "| `val_fraction` | 0.1 |" in text
    assert "`val_split`" not in text and "`split`" not in text and "sample-10BT" not in text


def test_a_checkpoint_between_logged_steps_takes_its_numbers_from_its_trainer_state(tiny_run, tmp_path):
    """A stop-signal checkpoint at step 13 of a run logging every 10 steps: metrics.jsonl has no row at 13, but the
    checkpoint's TrainState (`custom_checkpoint_2.pkl`, after the scheduler's and the loader's) has its numbers."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    rows = [{"step": s, "tokens": s * BATCH_TOKENS, "train_loss": 5.0, "elapsed": 10.0 * s} for s in (1, 10, 20)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "run_summary.json").write_text(json.dumps(tiny_run.summary | {"steps": 20}))
    checkpoint = run_dir / "checkpoints" / "step_0000013"
    shutil.copytree(tiny_run.checkpoint_dir, checkpoint)
    torch.save({"last_epoch": 13, "saved_on": datetime.date(2026, 1, 1)}, checkpoint / "custom_checkpoint_0.pkl")
    torch.save({"split": "train", "epoch": 0, "batch_in_epoch": 13}, checkpoint / "custom_checkpoint_1.pkl")
    state = TrainState(step=13, tokens=13 * 3000, elapsed=123.4)  # resumed with another batch size: not 13 x 4096
    torch.save(state.state_dict(), checkpoint / "custom_checkpoint_2.pkl")
    stage_folder(checkpoint, tmp_path / "repo", REPO_ID)
    text = (tmp_path / "repo" / "README.md").read_text()
    assert "| optimizer steps | 13 |" in text and "| tokens seen | 39,000 |" in text
    assert "| training time | 2m 03s |" in text


@pytest.mark.parametrize("saved_state", [True, False], ids=["with-trainer-state", "without"])
def test_a_checkpoint_renamed_inside_the_run_gets_its_own_numbers_not_the_runs(tiny_run, tmp_path, saved_state):
    """`RUN/best`, a copy of `checkpoints/step_4`: no `step_N` name to tell its step, and its card showed the end of
    the run's numbers (8 steps, validation loss 7.2345) and loss curve."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(tiny_run.checkpoint_dir, run_dir / "best")
    if saved_state:
        state = TrainState(step=CHECKPOINT_STEP, tokens=CHECKPOINT_STEP * BATCH_TOKENS, elapsed=3703.0)
        torch.save(state.state_dict(), run_dir / "best" / "custom_checkpoint_0.pkl")
    files = {f.path for f in stage_folder(run_dir / "best", tmp_path / "repo", REPO_ID)}
    text = ModelCard.load(tmp_path / "repo" / "README.md").text
    assert "7.2345" not in text and "| optimizer steps | 8 |" not in text
    assert "| hardware | 2 x NVIDIA H100 80GB HBM3 |" in text  # the run's, whatever the step
    if saved_state:
        assert f"checkpoint at step {CHECKPOINT_STEP}" in text and "| final validation loss | 9.2000" in text
        assert f"| tokens seen | {CHECKPOINT_STEP * BATCH_TOKENS:,} |" in text and "loss.png" in files
    else:
        assert "| optimizer steps | unknown |" in text and "| final validation loss | unknown |" in text
        assert "loss.png" not in files and "![" not in text


def test_staged_patterns_cover_every_file_staging_writes(staged, tiny_run, tmp_path):
    """`STAGED_PATTERNS` (what a push may delete) is derived from what staging writes: both formats, and the shards
    and index that `save_pretrained` writes for a larger model."""
    stage_folder(tiny_run.run_dir, tmp_path / "gpt2", REPO_ID, fmt="gpt2")
    GPT2ScratchForCausalLM.from_pretrained(staged).save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    names = {p.name for folder in (staged, tmp_path / "gpt2", tmp_path / "sharded") for p in folder.iterdir()}
    assert any(name.startswith("model-00001-of-") for name in names) and "model.safetensors.index.json" in names
    assert [name for name in names if not any(fnmatch.fnmatchcase(name, p) for p in hub.STAGED_PATTERNS)] == []


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_a_push_deletes_only_stale_files_of_the_kinds_it_writes_and_logs_them(staged, monkeypatch, caplog):
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    stale = {"model-00001-of-00002.safetensors": b"old", "model-00002-of-00002.safetensors": b"old"}
    stale |= {"model.safetensors.index.json": b"{}", "config.json": b"{}"}  # config.json: replaced, not deleted
    kept = {".gitattributes": b"*.safetensors filter=lfs\n", "notes.md": b"mine", "eval/results.json": b"{}"}
    with HubStub(TOKEN) as hub:
        hub.repos[REPO_ID] = StubRepo(private=False, branches={"main": stale | kept})
        with caplog.at_level("INFO", logger="modeling_gpt2_scratch.hub"):
            upload_folder_to_hub(staged, REPO_ID, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO_ID) == {p.name: p.read_bytes() for p in staged.iterdir()} | kept
    deleted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Deleting")]
    assert len(deleted) == 1 and "model-00002-of-00002.safetensors, model.safetensors.index.json" in deleted[0]
    assert "config.json" not in deleted[0] and "notes.md" not in deleted[0]


def test_the_cards_usage_snippets_name_a_branch_other_than_main(tiny_run, tmp_path):
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    assert push_to_hub.main([*argv, "--revision", "step-500"]) == 0
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert f'AutoTokenizer.from_pretrained("{REPO_ID}", revision="step-500", trust_remote_code=True)' in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", revision="step-500", trust_remote_code=True)' in text
    assert f'pipeline("text-generation", model="{REPO_ID}", revision="step-500", trust_remote_code=True)' in text
    assert f'GPT2ScratchForCausalLM.from_pretrained("{REPO_ID}", revision="step-500")' in text
    stage_folder(tiny_run.run_dir, tmp_path / "main", REPO_ID, revision="main")
    assert "revision=" not in (tmp_path / "main" / "README.md").read_text()


def test_the_cards_usage_snippets_name_no_pull_requests_ref(tiny_run, tmp_path):
    stage_folder(tiny_run.run_dir, tmp_path / "pr", REPO_ID, revision="refs/pr/3")  # merged into main, it stays
    text = (tmp_path / "pr" / "README.md").read_text()
    assert "revision=" not in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text


@pytest.mark.parametrize("license_id", ["", "mit license", " mit"])
def test_an_empty_license_or_one_with_whitespace_is_an_error(tiny_run, tmp_path, capsys, license_id):
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error([*argv, f"--license={license_id}"], capsys)
    assert f"Invalid --license {license_id!r}" in line and "apache-2.0" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("license_id", ["gpl-4.0", "MIT", "proprietary"])
def test_a_license_the_hub_does_not_list_is_an_error_before_staging(tiny_run, tmp_path, capsys, license_id):
    """The Hub checks a card's `license` against its list of ids when README.md is committed (after create_repo):
    an id it does not list is refused here, with `other` as the way to name any other license."""
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error([*argv, "--license", license_id], capsys)
    assert f"Invalid --license {license_id!r}" in line and "--license other with --license-name" in line
    assert ("use 'mit'" in line) == (license_id == "MIT") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("license_id", ["intel-research", "llama4", "fair-noncommercial-research-license"])
def test_the_hubs_newer_license_ids_go_into_the_card(tiny_run, tmp_path, license_id):
    """The Hub's license table (HUB_LICENSES_URL) has ids that huggingface.js's `License` type lacks: Intel's
    research license (hub-docs#1502), Llama 4's (hub-docs#1692), FAIR's noncommercial research one (hub-docs#1708)."""
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    assert push_to_hub.main([*argv, "--license", license_id]) == 0
    assert ModelCard.load(tmp_path / "out" / "README.md").data.license == license_id


@pytest.mark.parametrize(
    "extra, error",
    [
        ([], "--license other needs --license-name"),
        (["--license-name", "my license"], "--license other needs --license-name"),
        (["--license-name", "my-license-1.0"], "--license other needs --license-link"),
        (["--license-name", "my-license-1.0", "--license-link", "LICENSE"], "--license other needs --license-link"),
    ],
)
def test_license_other_without_a_name_and_a_link_is_an_error(tiny_run, tmp_path, capsys, extra, error):
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    line = _run_main_expect_error([*argv, "--license", "other", *extra], capsys)
    assert line.startswith(f"error: {error}") and not (tmp_path / "out").exists()


def test_license_other_puts_its_name_and_link_in_the_card(tiny_run, tmp_path, capsys):
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    link = "https://example.com/my-license"
    assert (
        push_to_hub.main([*argv, "--license", "other", "--license-name", "my-license-1.0", "--license-link", link])
        == 0
    )
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert (data.license, data.license_name, data.license_link) == ("other", "my-license-1.0", link)
    line = _run_main_expect_error([*argv, "--license", "mit", "--license-name", "my-license-1.0"], capsys)
    assert "go with --license other" in line


def test_language_flag_goes_into_the_card(tiny_run, tmp_path, capsys):
    """The card said `language: en` whatever the corpus: --language names the training data's language(s)."""
    argv = [str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", str(tmp_path / "out")]
    assert push_to_hub.main([*argv, "--language", "fr,de"]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.language == ["fr", "de"] and "meant for English text" not in card.text
    assert "made for English text" in card.text  # GPT-2's tokenizer
    line = _run_main_expect_error([*argv, "--language", "French"], capsys)
    assert "Invalid --language 'French'" in line and "ISO 639" in line


def test_no_connection_is_an_error_that_names_the_endpoint(tiny_run, monkeypatch, capsys):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    line = _run_main_expect_error([str(tiny_run.run_dir), "--repo-id", REPO_ID], capsys)
    assert f"Cannot reach the Hub at {endpoint}" in line and "HF_ENDPOINT" in line and TOKEN not in line


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_a_push_to_a_pull_requests_ref_creates_no_branch(staged, monkeypatch, caplog):
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with HubStub(TOKEN) as hub, caplog.at_level("INFO", logger="modeling_gpt2_scratch.hub"):
        hub.repos[REPO_ID] = StubRepo(private=False, branches={"main": {}, "refs/pr/1": {"README.md": b"draft"}})
        upload_folder_to_hub(staged, REPO_ID, token=TOKEN, endpoint=hub.url, revision="refs/pr/1")
    assert "(pull request refs/pr/1)" in caplog.text and "branch refs/pr" not in caplog.text
    assert hub.files(REPO_ID, "refs/pr/1") == {p.name: p.read_bytes() for p in staged.iterdir()}
    assert hub.files(REPO_ID) == {} and not [r for r in hub.requests if "/branch/" in r.target]


@pytest.mark.parametrize("status", [401, 404])  # the Hub answers 401 where it hides whether a repository exists
def test_a_push_to_a_pull_request_of_no_repository_creates_nothing(staged, monkeypatch, status):
    """`create_repo` ran first and made an empty public repository, then the upload to its `refs/pr/1` failed."""
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with HubStub(TOKEN) as hub:
        if status == 401:  # as the real Hub answers a missing (or hidden) repository's info
            monkeypatch.setattr(
                hub, "repo_info", lambda body, repo, revision=None: (401, {"error": "Repository Not Found"})
            )
        with pytest.raises(ValueError, match=r"^--revision refs/pr/1: there is no repository alice/tiny-gpt2-scratch"):
            upload_folder_to_hub(staged, REPO_ID, token=TOKEN, endpoint=hub.url, revision="refs/pr/1")
    assert hub.repos == {} and not [r for r in hub.requests if r.method == "POST"]


def test_local_dir_expands_the_home_folder(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert push_to_hub.main([str(tiny_run.run_dir), "--repo-id", REPO_ID, "--dry-run", "--local-dir", "~/staged"]) == 0
    assert (tmp_path / "home" / "staged" / "README.md").is_file() and not (tmp_path / "~").exists()
    assert f"in {tmp_path / 'home' / 'staged'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "n, text",
    [
        (950, "950"),
        (1_000, "1.0k"),
        (999_949, "999.9k"),
        (999_950, "1.0M"),
        (124_475_904, "124.5M"),
        (999_950_000, "1.0B"),
    ],
)
def test_the_model_cards_counts_carry_to_the_next_unit(n, text):
    assert hub._format_count(n) == text
