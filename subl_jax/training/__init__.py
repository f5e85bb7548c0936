"""Training pieces shared by every study type: optimizers and schedules."""
