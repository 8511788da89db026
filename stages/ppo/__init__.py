"""The PPO stage: the recipe (`recipe`), one step (`step`: `batch`, `update`, `metrics`) and its models (`engines`)."""
