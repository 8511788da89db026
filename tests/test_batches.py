"""Global batch sizes laid out on any number of ranks: derived accumulation, one-line errors that
name the keys and the settings that work, and runs stored before global batch sizes still open."""

from __future__ import annotations

import pytest

from stages.config.batches import BatchLayout, batch_layout, check_batch_layouts, stage_layouts
from stages.config.pipeline import PipelineConfig, load_config, upgrade_stored_config
from stages.config.section import ConfigError
from stages.lifecycle.runs import open_run, resolve_config


def test_the_layout_by_hand():
    # 48 rows over 2 ranks: 24 each; a cap of 8 rows per forward -> 3 accumulated micro-batches
    assert batch_layout("s", 48, 2, "s.micro", 8, "s.rows 48") == BatchLayout(24, 8, 3)
    # a cap above the share: one micro-batch of the whole share
    assert batch_layout("s", 48, 4, "s.micro", 64, "s.rows 48") == BatchLayout(12, 12, 1)
    with pytest.raises(
        ConfigError, match=r"^s: s.rows 48 does not split over 5 ranks; nearest that work: s.rows 45 or 50$"
    ):
        batch_layout("s", 48, 5, "s.micro", 8, "s.rows 48", "s.rows")
    with pytest.raises(
        ConfigError,
        match=r"24 rows per rank per optimizer step on 2 ranks, which s.micro 10 does not divide; values that work: 8 or 12$",
    ):
        batch_layout("s", 48, 2, "s.micro", 10, "s.rows 48")


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_the_default_recipe_lays_out_on_1_to_8_ranks_with_the_same_global_batches(ranks):
    config = load_config()
    check_batch_layouts(config, ranks)
    sft = stage_layouts(config, "sft", ranks)["optim"]
    assert sft.rows_per_rank * ranks == config.sft.batch_size == 32
    ppo = stage_layouts(config, "ppo", ranks)
    rows = config.ppo.prompts_per_step * config.ppo.samples_per_prompt // config.ppo.minibatches
    for layout in ppo.values():  # policy and separate critic: the same rows, each engine's own micro-batches
        assert layout.rows_per_rank * ranks == rows == 64
        assert layout.micro_batch_size * layout.grad_accum_steps == layout.rows_per_rank
    warmup = stage_layouts(config, "critic_warmup", ranks)["optim"]
    assert warmup.rows_per_rank * ranks * config.critic_warmup.minibatches == 32 * 4


def test_ppo_accumulates_when_the_share_exceeds_a_micro_batch():
    config = load_config(
        None, ["ppo.policy_optim.micro_batch_size=16", "ppo.critic_optim.micro_batch_size=32"]
    )
    layouts = stage_layouts(config, "ppo", 2)  # 128 rows / 2 minibatches / 2 ranks = 32 per rank
    assert layouts["policy_optim"] == BatchLayout(32, 16, 2)
    assert layouts["critic_optim"] == BatchLayout(32, 32, 1)
    assert set(stage_layouts(load_config(None, ["ppo.advantage_estimator=grpo"]), "ppo", 2)) == {
        "policy_optim"
    }


@pytest.mark.parametrize(
    "overrides, ranks, message",
    [
        (["ppo.prompts_per_step=30"], 4, "ppo: ppo.prompts_per_step 30 does not split over 4 ranks; nearest that work: 28 or 32"),
        (["critic_warmup.minibatches=5"], 2, "critic_warmup: critic_warmup.prompts_per_step 32 x samples_per_prompt 4 are 64 rows per rank, which critic_warmup.minibatches 5 does not divide; values that work: 4 or 8"),
        (["sft.optim.micro_batch_size=12"], 1, "sft: sft.batch_size 32 gives 32 rows per rank per optimizer step on 1 rank, which sft.optim.micro_batch_size 12 does not divide; values that work: 8 or 16"),
        (["reward_model.batch_size=30"], 4, "reward_model: reward_model.batch_size 30 does not split over 4 ranks; nearest that work: reward_model.batch_size 28 or 32"),
    ],
)  # fmt: skip
def test_a_layout_that_does_not_divide_is_one_line_naming_keys_values_ranks_and_what_works(
    overrides, ranks, message
):
    config = load_config(None, overrides)
    with pytest.raises(ConfigError) as caught:
        check_batch_layouts(config, ranks)
    assert str(caught.value) == message


def test_disabled_stages_and_rows_from_another_run_are_not_checked():
    config = load_config(
        None, ["ppo.prompts_per_step=30", "ppo.enabled=false", "critic_warmup.rollouts_from=/x"]
    )
    check_batch_layouts(config, 4)
    check_batch_layouts(config, 4, ["ppo"])  # disabled: the flows do not run it
    with pytest.raises(ConfigError, match="ppo.prompts_per_step 30"):
        check_batch_layouts(load_config(None, ["ppo.prompts_per_step=30"]), 4, ["ppo"])


def test_a_run_stored_before_global_batch_sizes_opens_with_the_batches_it_ran_with(tmp_path):
    """Its per-rank micro x accumulation (on the one rank such recipes ran on) becomes the global batch."""
    config = load_config(None, [f"storage.root={tmp_path}", "run_id=old"])
    stored = config.model_dump(mode="json")
    for stage in ("sft", "reward_model"):
        del stored[stage]["batch_size"]
        stored[stage]["optim"] |= {"micro_batch_size": 8, "grad_accum_steps": 3}
    del stored["critic_warmup"]["minibatches"]
    stored["critic_warmup"]["optim"] |= {"micro_batch_size": 16, "grad_accum_steps": 2}  # 128 rows / 32
    for name in ("policy_optim", "critic_optim"):
        stored["ppo"][name]["grad_accum_steps"] = 1
    with pytest.raises(ConfigError, match="unknown config key 'sft.optim.grad_accum_steps'"):
        PipelineConfig.model_validate(stored) if False else load_config(
            None, ["sft.optim.grad_accum_steps=2"]
        )
    upgraded = PipelineConfig.model_validate(upgrade_stored_config(stored))
    assert (upgraded.sft.batch_size, upgraded.reward_model.batch_size) == (24, 24)
    assert upgraded.critic_warmup.minibatches == 4 and upgraded.ppo == config.ppo
    open_run(config)  # then make its record look like an old version's
    from storage.layout import RunLayout
    from storage.manifests import read_pipeline_record, write_pipeline_record

    layout = RunLayout(config.storage.root_location(), "old")
    write_pipeline_record(layout, stored, config_hash="old")
    assert read_pipeline_record(layout)["config"]["sft"]["optim"]["grad_accum_steps"] == 3
    reopened, existed = resolve_config(None, [], run_id="old", storage=str(tmp_path))
    assert existed and reopened.sft.batch_size == 24 and reopened.critic_warmup.minibatches == 4


def test_rlpipe_run_and_config_refuse_a_layout_before_any_stage_starts(tmp_path):
    from cli_runs import rlpipe

    bad = ["--nproc", "4", "--set", "ppo.prompts_per_step=30"]
    line = "error: ppo: ppo.prompts_per_step 30 does not split over 4 ranks; nearest that work: 28 or 32"
    run = rlpipe("run", "--storage", str(tmp_path), "--run-id", "r", *bad)
    assert run.returncode == 1 and run.stderr.strip() == line
    assert not (tmp_path / "r").exists()  # nothing was written, no stage started
    config = rlpipe("config", *bad)
    assert config.returncode == 1 and config.stderr.strip() == line
    assert rlpipe("config", "--nproc", "8").returncode == 0


def test_a_vllm_recipe_validates_on_eight_ranks():
    from cli_runs import rlpipe

    proc = rlpipe("config", "--set", "generation.backend=vllm", "--set", "ppo.tis_cap=2.0", "--nproc", "8")
    assert proc.returncode == 0, proc.stderr
    assert '"backend": "vllm"' in proc.stdout
