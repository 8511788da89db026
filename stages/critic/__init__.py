"""The critic: how it is built, its update (shared by critic warmup and PPO), its diagnostics."""
