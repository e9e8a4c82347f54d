"""The trainer, knowing no task: config checks, state, optimizer, evaluation, checkpoints, files, logging
and the loop (each its own module, each importing only the ones below it)."""
