"""Training: the loop, schedules, checkpoints and the run that ties data, model and artifact together."""
