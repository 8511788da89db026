"""Several nodes, proven on one machine: `rlpipe stage --nodes 2 --node-rank i` started on two
"nodes" of one rank each (DeepSpeed's no-SSH mode, both on 127.0.0.1) trains exactly what one node
of two ranks trains."""

from __future__ import annotations

import os
import subprocess

import torch
from cli_runs import RLPIPE, rlpipe, sets
from safetensors.torch import load_file

from stages.runtime.distributed import free_port
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest

SFT = [
    "wandb.mode=disabled", "task.train_size=200", "task.heldout_size=8", "generation.max_new_tokens=16",
    "sft.steps=4", "sft.save_every=2", "sft.batch_size=8", "sft.optim.micro_batch_size=4",
]  # fmt: skip


def weights(root, run_id: str) -> dict[str, torch.Tensor]:
    final = RunLayout(Location(str(root)), run_id).final("sft", "policy")
    return load_file(os.path.join(final.path, "model.safetensors"))


def test_two_nodes_of_one_rank_train_what_one_node_of_two_ranks_trains(tmp_path):
    root = tmp_path / "runs"
    one_node = rlpipe("stage", "sft", "--run-id", "one", "--storage", str(root), "--nproc", "2", *sets(SFT))
    assert one_node.returncode == 0, one_node.stdout[-2000:] + one_node.stderr[-2000:]

    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                RLPIPE,
                "stage",
                "sft",
                "--run-id",
                "two",
                "--storage",
                str(root),
                "--nodes",
                "2",
                "--node-rank",
                str(i),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                *sets(SFT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-2000:] for out in outputs)
    assert read_manifest(RunLayout(Location(str(root)), "two").manifest("sft")) is not None
    one, two = weights(root, "one"), weights(root, "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_node_rank_outside_the_nodes_is_one_line(tmp_path):
    proc = rlpipe(
        "stage", "sft", "--run-id", "x", "--storage", str(tmp_path), "--nodes", "2", "--node-rank", "2"
    )
    assert (
        proc.returncode == 1 and proc.stderr.strip() == "error: node rank 2 is not one of the 2 nodes (0..1)"
    )
