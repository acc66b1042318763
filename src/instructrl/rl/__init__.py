"""Components of PPO, one file per part of the loop: the typed rollout and the passes that fill
it (steps 1-2), the update epochs (step 5), the rollout metrics (step 6), which episodes each
iteration holds and their seeds, and the KL controller."""
