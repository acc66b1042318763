"""instructrl: the InstructGPT recipe (SFT, reward model, PPO-ptx) for anyone.

From Python (the README's "Using instructrl from Python"): ``config.load_config`` builds a run's
config, ``stages.<stage>.run_<stage>`` runs a stage, ``models.reward`` holds the reward model
(``RewardModel.from_pretrained``, ``score_responses``), ``rlmath`` and ``padding`` the pure math,
``data.inputs`` reads data files (``read_comparisons``), ``world.labeler`` the simulated labeler.
Every other checkpoint loads with transformers' ``AutoModelForCausalLM`` and ``AutoTokenizer``.
"""

__version__ = "0.1.0"
