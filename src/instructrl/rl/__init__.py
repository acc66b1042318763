"""Components of PPO: the rollout container and the passes that fill it, the KL controller."""
