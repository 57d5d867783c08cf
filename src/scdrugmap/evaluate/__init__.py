"""The evaluation room: splits, metrics, the job grid with its executors, and the results store."""
