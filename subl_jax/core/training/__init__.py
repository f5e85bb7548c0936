"""Training pieces shared by every study type."""
