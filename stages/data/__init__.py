"""Task data: problems (arith, GSM8K, MATH-500, AIME), prompts, grading, preference pairs, the training task's batches."""
