"""The study pipeline (job `study`): stages, evaluation and report."""
