"""The stage contract and a run's lifecycle: plans and manifests, the stage entry point, the training skeleton (resume, checkpoints, export), where inputs come from, metrics."""
