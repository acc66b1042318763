"""instructrl: the InstructGPT recipe (SFT, reward model, PPO-ptx) for anyone."""

__version__ = "0.1.0"
