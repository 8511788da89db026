"""The reward_model stage through `rlpipe stage`, on the tiny model (SFT disabled to save time)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_runs import RLPIPE, rlpipe, sets
from kill_points import kill_in_turn
from safetensors.torch import load_file

from stages.config.pipeline import load_config
from stages.data.preferences import preference_pairs_from_problems
from stages.data.tasks import task_problems
from stages.models.tiny import tiny_model_path
from storage.checkpoints import committed_steps
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest
from storage.metrics import read_metrics

# Task pairs straight from the tiny model: 8 steps of 16 pairs (enough to move every weight).
FAST = [
    "wandb.mode=disabled",
    "sft.enabled=false",
    "task.train_size=200",
    "task.heldout_size=40",
    "reward_model.train_pairs=128",
    "reward_model.heldout_pairs=24",
    "reward_model.steps=8",
    "reward_model.save_every=4",
    "reward_model.log_every=1",
    "reward_model.batch_size=16",
    "reward_model.optim.micro_batch_size=8",  # 2 micro-batches accumulated per step
    "reward_model.optim.warmup_steps=2",
]
# Pairs with a signal the random tiny model learns in a few steps: a worked answer over a non-answer.
EASY_STEPS = 16
EASY = [
    "wandb.mode=disabled",
    "sft.enabled=false",
    "reward_model.prompt_field=question",
    "reward_model.chosen_field=good",
    "reward_model.rejected_field=bad",
    "reward_model.heldout_pairs=32",
    f"reward_model.steps={EASY_STEPS}",
    f"reward_model.save_every={EASY_STEPS}",
    "reward_model.log_every=1",
    "reward_model.batch_size=16",
    "reward_model.optim.micro_batch_size=16",
    "reward_model.optim.lr=0.003",
    "reward_model.optim.schedule=constant",
]


def final_weights(layout: RunLayout) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(layout.final("reward_model", "reward_model").path, "model.safetensors"))


def heldout_scores(model_dir: str, pairs, tokenizer) -> tuple[float, float, float]:
    """(pairwise accuracy, mean chosen score, mean rejected score) with transformers alone: its own
    sequence-classifier forward, one unpadded sequence at a time (score = logit of the last token)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    assert model.config.num_labels == 1

    def score(prompt: str, response: str) -> float:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids += tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    chosen, rejected = (
        [score(p.prompt, p.chosen) for p in pairs],
        [score(p.prompt, p.rejected) for p in pairs],
    )
    n = len(pairs)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n, sum(chosen) / n, sum(rejected) / n


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run on task pairs, shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    proc = rlpipe("stage", "reward_model", "--run-id", "base", "--storage", str(root), *sets(FAST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return RunLayout(Location(str(root)), "base")


@pytest.fixture(scope="module")
def easy_pairs(tmp_path_factory):
    """A local `save_to_disk` dataset (one split, own column names): 144 rows, the last 32 held out."""
    import datasets

    config = load_config(overrides=["task.train_size=144"])
    problems = task_problems(config.task, "train")
    rows = {
        "question": [f"Question: {p.question}\nAnswer:\n" for p in problems],
        "good": [p.solution for p in problems],
        "bad": ["I do not know."] * len(problems),
    }
    path = tmp_path_factory.mktemp("pairs") / "easy"
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path, rows


def test_completes_with_a_manifest_and_an_export_transformers_scores_alone(finished_run):
    layout = finished_run
    manifest = read_manifest(layout.manifest("reward_model"))
    final = layout.final("reward_model", "reward_model")
    assert manifest is not None and manifest.outputs == {"reward_model": str(final)}
    assert set(manifest.inputs) == {"init"} and manifest.inputs["init"].uri.startswith("tiny:")
    assert manifest.metrics["heldout_pairs"] == 24 and manifest.metrics["train_pairs"] == 128
    # transformers alone, on the export, reproduces the stage's held-out scores (read at the EOS).
    from transformers import AutoTokenizer

    config = load_config(overrides=FAST)
    pairs = preference_pairs_from_problems(task_problems(config.task, "test"), config.seed)[:24]
    tokenizer = AutoTokenizer.from_pretrained(final.path)
    _, chosen, rejected = heldout_scores(final.path, pairs, tokenizer)
    assert chosen == pytest.approx(manifest.metrics["heldout_chosen_score"], abs=1e-4)
    assert rejected == pytest.approx(manifest.metrics["heldout_rejected_score"], abs=1e-4)


def test_training_moves_every_weight_and_the_loss_is_finite(finished_run):
    layout = finished_run
    initial = load_file(str(tiny_model_path(load_config().tiny_model) / "model.safetensors"))
    trained = final_weights(layout)
    backbone = [name for name in initial if name.startswith("model.")]
    assert backbone and all(not torch.equal(initial[name], trained[name]) for name in backbone)
    assert trained["score.weight"].shape[0] == 1
    rows = [r for r in read_metrics(layout.metrics("reward_model")) if "reward_model/loss" in r]
    losses = [r["reward_model/loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(losses))) and all(0 < x < 5 for x in losses)
    assert committed_steps(layout.checkpoints("reward_model")) == [4, 8]


def test_rerun_of_a_complete_stage_is_skipped(finished_run):
    layout = finished_run
    before = layout.manifest("reward_model").read_text()
    proc = rlpipe("stage", "reward_model", "--run-id", "base", "--storage", layout.root.uri)
    assert proc.returncode == 0 and "skipped" in proc.stdout
    assert layout.manifest("reward_model").read_text() == before


def test_killed_at_every_point_in_turn_resumes_to_the_same_result(finished_run, tmp_path):
    """kill -9 after the first commit, then in an optimizer step (step 6: 2 micro-batches per step,
    counted from the resume at step 4), then on the manifest rename; the final rerun matches."""
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "killed")
    command = [RLPIPE, "stage", "reward_model", "--run-id", "killed", "--storage", str(root)]
    points = ["after_commit", "train:3", "manifest:1"]
    committed = kill_in_turn([*command, *sets(FAST)], command, layout, "reward_model", points)
    assert committed == [[4], [4], [4, 8]]

    rerun = rlpipe("stage", "reward_model", "--run-id", "killed", "--storage", str(root))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert read_manifest(layout.manifest("reward_model")) is not None
    steps = [r["step"] for r in read_metrics(layout.metrics("reward_model")) if "reward_model/loss" in r]
    assert steps == list(range(1, 9))  # steps after the resumed checkpoint replaced, not duplicated
    base, resumed = final_weights(finished_run), final_weights(layout)
    assert base.keys() == resumed.keys() and all(torch.equal(base[k], resumed[k]) for k in base)


def test_pairs_from_a_local_dataset_are_learned_and_recorded(easy_pairs, tmp_path):
    path, rows = easy_pairs
    root = tmp_path / "runs"
    overrides = [*EASY, f"reward_model.pairs_from={path}"]
    proc = rlpipe("stage", "reward_model", "--run-id", "hf", "--storage", str(root), *sets(overrides))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout = RunLayout(Location(str(root)), "hf")
    manifest = read_manifest(layout.manifest("reward_model"))
    assert manifest.inputs["pairs"].uri == str(path) and manifest.inputs["init"].uri.startswith("tiny:")
    # No test split: the last 32 rows are held out, the 112 before them trained on.
    assert manifest.metrics["train_pairs"] == 112 and manifest.metrics["heldout_pairs"] == 32

    from transformers import AutoTokenizer

    from stages.data.records import PreferencePair
    from stages.models.loading import init_reward_model

    heldout = [PreferencePair(*row) for row in zip(rows["question"], rows["good"], rows["bad"], strict=True)][
        -32:
    ]
    tiny = str(tiny_model_path(load_config().tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)  # the stage's seed: the very RM it started from
    untrained = tmp_path / "untrained"
    init_reward_model(tiny).save_pretrained(untrained)
    before, *_ = heldout_scores(str(untrained), heldout, tokenizer)
    after, *_ = heldout_scores(layout.final("reward_model", "reward_model").path, heldout, tokenizer)
    assert after == manifest.metrics["heldout_accuracy"]
    assert after >= 0.9 and after >= before + 0.3, (before, after)


def test_a_missing_pairs_column_fails_with_one_line(easy_pairs, tmp_path):
    path, _ = easy_pairs
    overrides = [*EASY, f"reward_model.pairs_from={path}", "reward_model.chosen_field=nope"]
    proc = rlpipe("stage", "reward_model", "--run-id", "bad", "--storage", str(tmp_path), *sets(overrides))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "no field 'nope'" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert read_manifest(RunLayout(Location(str(tmp_path)), "bad").manifest("reward_model")) is None


def test_a_test_split_is_used_as_held_out_when_the_dataset_has_one(tmp_path):
    import datasets

    from stages.reward_model import _load_pairs

    def split(tag: str, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"prompt": [f"{tag} {i}" for i in range(n)], "chosen": ["a"] * n, "rejected": ["b"] * n}
        )

    datasets.DatasetDict({"train": split("train", 10), "test": split("test", 4)}).save_to_disk(
        tmp_path / "dd"
    )
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in split("row", 10).to_list()))
    config = load_config(
        overrides=["reward_model.heldout_pairs=3", f"reward_model.pairs_from={tmp_path / 'dd'}"]
    )
    train, heldout = _load_pairs(config)
    assert [p.prompt for p in heldout] == ["test 0", "test 1", "test 2"] and len(train) == 10
    config = load_config(overrides=["reward_model.heldout_pairs=3", f"reward_model.pairs_from={jsonl}"])
    train, heldout = _load_pairs(config)
    assert [p.prompt for p in heldout] == ["row 7", "row 8", "row 9"] and len(train) == 7


def test_optim_overrides_keep_the_stage_defaults_and_cosine_spans_the_steps():
    default = load_config().reward_model.optim
    rm = load_config(
        overrides=["reward_model.optim.micro_batch_size=8", "reward_model.steps=40"]
    ).reward_model
    assert rm.optim.micro_batch_size == 8 and (rm.optim.lr, rm.optim.warmup_steps) == (1e-3, 10)
    assert default.schedule == rm.optim.schedule == "cosine" and default.total_steps == 800
    assert rm.optim.total_steps == 40  # derived from steps: never a stale default
    stale = load_config(overrides=["reward_model.optim.total_steps=50"]).reward_model.optim
    assert stale.total_steps == 800
