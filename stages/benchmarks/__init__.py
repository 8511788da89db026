"""`rlpipe bench ...`: speed measured and printed, never asserted (GAE, PPO update vs. TRL, storage, generation)."""
