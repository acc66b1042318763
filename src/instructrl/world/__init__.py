"""The built-in instruction world: tasks, the pretraining corpus and the simulated labeler."""
